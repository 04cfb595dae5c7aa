"""Record layout: flat cell indices and int8 / int4 values round-trip, older (y, x) records still read."""

import pytest
import torch

from detkd.errors import ConfigError
from detkd.store.codec import (
    decode_levels,
    dequantize,
    encode_levels,
    index_dtype,
    layout_dtypes,
    pack_int4,
    quantize_symmetric,
    unpack_int4,
)
from detkd.store.format import LevelRecord, StoreError, decode_record, encode_record
from detkd.store.select import SelectionPolicy

SHAPES = {"p3": [16, 16], "p4": [8, 8], "big": [200, 200]}


def _record(g: torch.Generator) -> dict[str, LevelRecord]:
    def cells(level, k, c):
        h, w = SHAPES[level]
        flat = torch.randperm(h * w, generator=g)[:k]
        yx = torch.stack([flat // w, flat % w], dim=1).to(torch.int16)
        return LevelRecord(
            yx=yx, values=(torch.randn(k, c, generator=g) * 3).half(), score=torch.rand(k, generator=g).half()
        )

    return {
        "p3": cells("p3", 20, 32),
        "big": cells("big", 7, 8),
        "p4": LevelRecord(dense=torch.randn(8, 5, 6, generator=g).half(), extras={"gi": torch.rand(1, 5, 6)}),
    }


def test_int8_golden_values():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-254.0, 127.0, 1.0, 0.4]])
    q, scale = quantize_symmetric(x, dim=-1)
    # Scales are max|x| / 127 rounded to float16. 2/127 = 0.0157480 lies in [2^-6, 2^-5), where float16
    # steps by 2^-16: 2^-6 + 8 * 2^-16 = 0.0157470703125. Zero vector: 0. 254/127 = 2 exactly.
    assert scale.dtype == torch.float16 and scale.tolist() == [0.0157470703125, 0.0, 2.0]
    # Against the stored scale: 1 -> 63.504 -> 64, -2 -> -127.007 -> clamped -127, 0.5 -> 31.75 -> 32;
    # 127 / 2 = 63.5 and 1 / 2 = 0.5 round half to even: 64 and 0.
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 0]]
    assert dequantize(q, scale, dim=-1).float().tolist()[2] == [-254.0, 128.0, 0.0, 0.0]


def test_int4_golden_values():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0, 0.3, -0.29]])
    q, scale = quantize_symmetric(x, dim=-1, qmax=7)
    # 2 / 7 = 0.285714 lies in [2^-2, 2^-1), where float16 steps by 2^-12: 0.25 + 146 * 2^-12 = 0.28564453125.
    assert scale.tolist() == [0.28564453125]
    # 1 -> 3.5008 -> 4; -2 -> -7.0018 -> clamped -7; 0.5 -> 1.75 -> 2; 0.3 -> 1.05 -> 1; -0.29 -> -1.015 -> -1.
    assert q.tolist() == [[4, -7, 2, 0, 1, -1]]
    # Stored + 8, low nibble first: (4+8) | (-7+8) << 4 = 12 + 16 = 28; (2+8) | 8 << 4 = 138; 9 | 7 << 4 = 121.
    packed = pack_int4(q, dim=-1)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[28, 138, 121]]
    assert torch.equal(unpack_int4(packed, dim=-1), q)


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("qmax", [127, 7])
def test_integer_error_is_at_most_half_a_step(dim, qmax):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 48, generator=g) * torch.logspace(-3, 3, 48)).half()
    q, scale = quantize_symmetric(x, dim=dim, qmax=qmax)
    back = dequantize(q, scale, dim=dim).float()
    step = scale.float().unsqueeze(dim)
    # Half a quantisation step, plus the float16 rounding of the product.
    assert ((back - x.float()).abs() <= step / 2 + x.float().abs() * 2**-11 + 1e-12).all()
    assert (q.abs().amax(dim=dim) == qmax).all()  # the largest element of each vector uses the full range
    assert torch.equal(quantize_symmetric(-x, dim=dim, qmax=qmax)[0], -q)  # symmetric
    if qmax == 7:
        assert torch.equal(unpack_int4(pack_int4(q, dim=dim), dim=dim), q)


def test_index_dtype_is_the_smallest_that_fits():
    assert [index_dtype(n) for n in (1, 256, 257, 2**15, 2**15 + 1)] == [
        torch.uint8,
        torch.uint8,
        torch.int16,
        torch.int16,
        torch.int32,
    ]


@pytest.mark.parametrize("value_dtype", ["float16", "int8", "int4"])
def test_levels_round_trip_through_a_record(value_dtype):
    record = _record(torch.Generator().manual_seed(0))
    arrays = encode_levels(record, feature_shapes=SHAPES, value_dtype=value_dtype)
    assert arrays["p3/j"].dtype == torch.uint8 and arrays["big/j"].dtype == torch.int32
    expected = {"float16": torch.float16, "int8": torch.int8, "int4": torch.uint8}[value_dtype]
    assert arrays["p3/v"].dtype == arrays["p4/d"].dtype == expected
    back = decode_levels(decode_record(encode_record(arrays)), feature_shapes=SHAPES)
    assert sorted(back) == sorted(record)
    for level, rec in record.items():
        out = back[level]
        for name in ("yx", "score"):
            ref = getattr(rec, name)
            assert (ref is None and getattr(out, name) is None) or torch.equal(getattr(out, name), ref)
        assert torch.equal(out.extras.get("gi", torch.zeros(0)), rec.extras.get("gi", torch.zeros(0)))
        ref = rec.values if rec.values is not None else rec.dense
        got = out.values if rec.values is not None else out.dense
        assert got.dtype == torch.float16 and got.shape == ref.shape
        if value_dtype == "float16":
            assert torch.equal(got, ref)
        else:
            dim = -1 if rec.values is not None else 0
            half_step = ref.float().abs().amax(dim=dim, keepdim=True) / (254 if value_dtype == "int8" else 14)
            assert ((got.float() - ref.float()).abs() <= half_step * 1.01 + 1e-3).all()


@pytest.mark.parametrize("value_dtype", ["int8", "int4"])
def test_levels_encoded_together_equal_each_level_alone(value_dtype):
    record = _record(torch.Generator().manual_seed(3))
    record["p4"] = LevelRecord(yx=record["p3"].yx[:4] % 8, values=record["p3"].values[4:8] * 7)  # width of p3
    together = encode_levels(record, feature_shapes=SHAPES, value_dtype=value_dtype)
    for level, rec in record.items():
        alone = encode_levels({level: rec}, feature_shapes=SHAPES, value_dtype=value_dtype)
        assert sorted(alone) == sorted(k for k in together if k.startswith(f"{level}/"))
        assert all(torch.equal(alone[k], together[k]) for k in alone)
    back = decode_levels(together, feature_shapes=SHAPES)
    for level in record:
        alone = decode_levels({k: v for k, v in together.items() if k.startswith(f"{level}/")}, feature_shapes=SHAPES)[
            level
        ]
        assert torch.equal(
            back[level].values if alone.values is not None else back[level].dense,
            alone.values if alone.values is not None else alone.dense,
        )


def test_integer_records_save_the_value_bytes():
    record = _record(torch.Generator().manual_seed(0))
    sizes = {
        dt: len(encode_record(encode_levels(record, feature_shapes=SHAPES, value_dtype=dt)))
        for dt in ("float16", "int8", "int4")
    }
    values = 20 * 32 + 7 * 8 + 8 * 5 * 6  # value elements: one byte saved each
    scales = 2 * (20 + 7 + 5 * 6)  # two bytes of scale per vector
    # One more array header per level: name length, name, dtype, ndim, one byte per dim.
    headers = (1 + len("p3/q") + 2 + 1) + (1 + len("big/q") + 2 + 1) + (1 + len("p4/q") + 2 + 2)
    assert sizes["float16"] - sizes["int8"] == values - scales - headers
    # int4 saves half a byte more per value; the packed dim's length takes the same bytes in the header.
    assert sizes["int8"] - sizes["int4"] == values // 2


def test_older_yx_records_still_read():
    record = _record(torch.Generator().manual_seed(0))
    legacy = {f"{lv}/{part}": a for lv, rec in record.items() for part, a in rec.arrays().items()}
    back = decode_levels(legacy, feature_shapes=SHAPES)
    assert torch.equal(back["p3"].yx, record["p3"].yx) and torch.equal(back["p3"].values, record["p3"].values)


def test_bad_layouts_are_refused():
    rec = LevelRecord(yx=torch.tensor([[16, 0]], dtype=torch.int16), values=torch.zeros(1, 4, dtype=torch.float16))
    with pytest.raises(StoreError, match="outside its 16 x 16 map"):
        encode_levels({"p3": rec}, feature_shapes=SHAPES)
    with pytest.raises(StoreError, match="no feature shape"):
        encode_levels({"p9": rec}, feature_shapes=SHAPES)
    with pytest.raises(StoreError, match="integer scale"):
        decode_levels({"p3/v": torch.zeros(1, 4).half(), "p3/q": torch.ones(1).half()}, feature_shapes=SHAPES)
    with pytest.raises(StoreError, match="even count"):
        encode_levels({"p3": LevelRecord(values=torch.zeros(1, 3))}, feature_shapes=SHAPES, value_dtype="int4")
    with pytest.raises(ConfigError, match="value_dtype"):
        encode_levels({}, feature_shapes=SHAPES, value_dtype="int3")
    with pytest.raises(ConfigError, match="only low-rank coefficient maps"):
        encode_levels({"p3": LevelRecord(values=torch.zeros(1, 4))}, feature_shapes=SHAPES, value_dtype="int2")
    with pytest.raises(ConfigError, match="value_dtype"):
        SelectionPolicy(value_dtype="bfloat16")
    assert layout_dtypes("int8")["values"].startswith("int8") and layout_dtypes("int4")["dense"].startswith("int4")
