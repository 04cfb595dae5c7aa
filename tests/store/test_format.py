"""Record encoding (exact round trip, checksum catches every flipped byte) and the manifest contract."""

import json

import numpy as np
import pytest
import torch

from detkd.data.views import View
from detkd.store.format import (
    FORMAT_VERSION,
    LevelRecord,
    StoreError,
    decode_record,
    encode_record,
    flatten_record,
    parse_key,
    record_key,
    unflatten_record,
)
from detkd.store.manifest import Manifest, fingerprint


def _arrays():
    g = torch.Generator().manual_seed(0)
    return {
        "p3/v": (torch.randn(5, 16, generator=g) * 30).half(),
        "p3/i": torch.randint(0, 100, (5, 2), generator=g).to(torch.int16),
        "p3/s": torch.rand(5, generator=g).half(),
        "p6/d": torch.randn(4, 3, 2, generator=g).half(),
        "p6/importance": torch.rand(1, 3, 2, generator=g),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i64": torch.tensor([-(2**40), 7]),
        "i32": torch.tensor([[-5]], dtype=torch.int32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),  # numpy input too
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros((0, 64), dtype=torch.float16),
        "big_dim": torch.zeros(300, dtype=torch.uint8),  # a two-byte varint
    }


def test_round_trip_is_exact():
    arrays = _arrays()
    out = decode_record(encode_record(arrays))
    assert sorted(out) == sorted(arrays)
    for name, a in arrays.items():
        expected = torch.as_tensor(a)
        assert out[name].dtype == expected.dtype and out[name].shape == expected.shape, name
        assert torch.equal(out[name], expected), name


def test_encoding_is_deterministic_and_compact():
    arrays = _arrays()
    reordered = dict(reversed(list(arrays.items())))
    assert encode_record(arrays) == encode_record(reordered)
    one = {"0/v": torch.zeros(3, 16, dtype=torch.float16)}
    # 19 bytes preamble + count + (len, "0/v", dtype, ndim, 3, 16) header + 96 data bytes.
    assert len(encode_record(one)) == 19 + 1 + (1 + 3 + 1 + 1 + 1 + 1) + 96


def test_every_flipped_byte_is_detected():
    blob = encode_record(
        {"p3/v": torch.arange(6, dtype=torch.float16).reshape(3, 2), "p3/i": torch.zeros(3, 2, dtype=torch.int16)}
    )
    for pos in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[pos] ^= mask
            with pytest.raises(StoreError, match="'7/s192'"):
                decode_record(bytes(damaged), key="7/s192")


def test_unverified_decode_still_refuses_garbage():
    blob = encode_record({"x": torch.zeros(4)})
    with pytest.raises(StoreError, match="corrupt"):
        decode_record(blob[:-3], verify=False, key="k")
    with pytest.raises(StoreError, match="not a detkd record"):
        decode_record(b"xx", key="k")
    with pytest.raises(StoreError, match="cannot be stored"):
        encode_record({"x": torch.zeros(2, dtype=torch.bfloat16)})


def test_fp16_storage_error_is_within_half_precision_rounding():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([(torch.rand(100_000, generator=g) * 200 - 100), torch.randn(1000, generator=g) * 1e-6])
    stored = decode_record(encode_record({"v": x.half()}))["v"].float()
    assert torch.equal(stored, x.half().float())
    # Round to nearest: relative error <= 2^-11 for normal numbers, absolute <= 2^-25 for subnormals.
    bound = torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25))
    assert ((stored - x).abs() <= bound).all()
    assert (stored - x).abs().max() > 0  # the check is not vacuous


def test_level_records_flatten_and_back():
    levels = {
        "0": LevelRecord(
            yx=torch.zeros(2, 2, dtype=torch.int16), values=torch.ones(2, 4).half(), score=torch.ones(2).half()
        ),
        "p6": LevelRecord(dense=torch.ones(4, 2, 3).half(), extras={"importance": torch.zeros(1, 2, 3)}),
    }
    flat = flatten_record(levels)
    assert sorted(flat) == ["0/i", "0/s", "0/v", "p6/d", "p6/importance"]
    back = unflatten_record(decode_record(encode_record(flat)))
    assert back["0"].num_cells == 2 and not back["0"].is_dense and back["p6"].is_dense
    assert torch.equal(back["p6"].extras["importance"], torch.zeros(1, 2, 3))
    for bad in ("q", "v", "a/b"):
        with pytest.raises(StoreError, match="reserved"):
            flatten_record({"0": LevelRecord(extras={bad: torch.zeros(1)})})


def test_level_record_pickles_inline_and_exactly():
    """Loader workers pickle records: the arrays must travel inside the pickle (no shared-memory
    tensors, one per array, which made stored training slow) and come back bit-exact."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    g = torch.Generator().manual_seed(1)
    rec = LevelRecord(
        yx=torch.randint(0, 9, (7, 2), generator=g).to(torch.int16),
        values=torch.randn(7, 32, generator=g).half(),
        score=torch.rand(7, generator=g).half(),
        extras={"gc": torch.rand(5, generator=g), "bf": torch.rand(3, generator=g).bfloat16()},
    )
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(rec)
    assert rec.values.numpy().tobytes() in buf.getvalue()  # the fp16 values travel in the pickle itself
    back = pickle.loads(buf.getvalue())
    for part, array in rec.arrays().items():
        got = back.arrays()[part]
        assert got.dtype == array.dtype and torch.equal(got, array), part
    assert back.dense is None and sorted(back.extras) == ["bf", "gc"]


def test_keys():
    assert record_key(17, View(size=192, flip=True)) == "17/s192-flip"
    assert parse_key(b"17/s192-flip") == (17, View(size=192, flip=True))
    with pytest.raises(StoreError, match="malformed"):
        parse_key("abc")


def make_manifest(**overrides) -> Manifest:
    fields = dict(
        teacher_hash="a" * 64,
        architecture={"family": "fcos", "backbone": "resnet18", "fpn_channels": 64},
        preprocessing={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "canvas": 192},
        levels=["p3", "p4"],
        strides={"p3": 8, "p4": 16},
        channels={"p3": 64, "p4": 64},
        feature_shapes={"p3": (24, 24), "p4": (12, 12)},
        policy={"name": "nms-ksd", "channel_group": 4},
        views=[View(192).to_dict(), View(192, True).to_dict()],
        dataset_fingerprint="d" * 64,
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_manifest_json_round_trip():
    m = make_manifest()
    back = Manifest.from_json(m.to_json())
    assert back == Manifest.from_dict(json.loads(m.to_json()))
    assert back.to_dict() == m.to_dict() and back.format_version == FORMAT_VERSION
    assert back.feature_shapes == {"p3": [24, 24], "p4": [12, 12]}
    assert back.counts == {"images": 0, "records": 0, "bytes": 0} and back.complete is False


def test_manifest_refuses_bad_json():
    d = make_manifest().to_dict()
    with pytest.raises(StoreError, match="newer"):
        Manifest.from_dict({**d, "format_version": FORMAT_VERSION + 1})
    del d["teacher_hash"]
    with pytest.raises(StoreError, match="teacher_hash"):
        Manifest.from_dict(d)
    with pytest.raises(StoreError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(StoreError, match="strides.*p5"):
        make_manifest(levels=["p3", "p4", "p5"])


def test_identity_ignores_counts_and_timestamps():
    a, b = (
        make_manifest(),
        make_manifest(counts={"images": 3, "records": 6, "bytes": 100}, created="x", complete=True, tool_version="9"),
    )
    assert a.identity_diff(b) == []
    assert a.identity_diff(make_manifest(teacher_hash="b", policy={"name": "dense"})) == ["policy", "teacher_hash"]
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": (1, 2), "b": 1})
