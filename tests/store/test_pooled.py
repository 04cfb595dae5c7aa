"""Lowrank levels kept at 1/k resolution (``SelectionPolicy.pool``): layout, bytes, round trip, reading."""

import dataclasses

import pytest
import torch

from detkd.data.views import View
from detkd.errors import ConfigError
from detkd.store.codec import decode_levels, encode_levels
from detkd.store.format import LevelRecord, StoreError, decode_record, encode_record
from detkd.store.manifest import Manifest
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.verify import store_info
from tests.store.test_build import build
from tests.store.test_lowrank import _header_bytes

SHAPES = {"p3": (9, 11), "p4": (5, 6)}


def _slow_pool_then_repeat(c: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: each cell gets the mean of its k x k block's valid cells (loops)."""
    r, h, w = c.shape
    out = torch.empty(r, h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            by, bx = (y // k) * k, (x // k) * k
            out[:, y, x] = c[:, by : min(by + k, h), bx : min(bx + k, w)].double().mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_pooled_round_trip_is_the_block_means_repeated(k):
    g = torch.Generator().manual_seed(k)
    levels = {lv: LevelRecord(coefficients=torch.randn(4, h, w, generator=g).half()) for lv, (h, w) in SHAPES.items()}
    arrays = encode_levels(levels, feature_shapes=SHAPES, value_dtype="float16", pool={"p3": k})
    back = decode_levels(decode_record(encode_record(arrays)), feature_shapes=SHAPES)
    assert back["p3"].coefficients.shape == levels["p3"].coefficients.shape
    expected = _slow_pool_then_repeat(levels["p3"].coefficients, k)
    torch.testing.assert_close(back["p3"].coefficients.double(), expected, atol=2e-3, rtol=2e-3)  # float16 storage
    assert torch.equal(back["p4"].coefficients, levels["p4"].coefficients)  # not pooled: as it was


def test_pooled_int4_is_within_half_a_quantisation_step_of_the_block_means():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(6, 9, 11, generator=g).half()
    levels = {"p3": LevelRecord(coefficients=c)}
    arrays = encode_levels(levels, feature_shapes=SHAPES, value_dtype="int4", pool={"p3": 2})
    back = decode_levels(decode_record(encode_record(arrays)), feature_shapes=SHAPES)["p3"].coefficients.double()
    means = _slow_pool_then_repeat(c, 2)
    step = means.abs().amax(dim=(1, 2)) / 7  # one scale per component: max |mean| / 7
    assert ((back - means).abs() <= step[:, None, None] / 2 + 1e-3).all()


def test_pooled_bytes_equal_the_layout_arithmetic():
    r, k = 4, 2
    levels = {lv: LevelRecord(coefficients=torch.randn(r, h, w).half()) for lv, (h, w) in SHAPES.items()}
    blob = encode_record(encode_levels(levels, feature_shapes=SHAPES, value_dtype="int4", pool={"p3": k}))
    expected = 2 + 1 + 16 + 1  # preamble and array count
    for lv, (h, w) in SHAPES.items():
        if lv == "p3":
            h, w = -(-h // k), -(-w // k)  # 5 x 6 kept cells
            expected += _header_bytes("p3/u", (3,)) + 2 * 3  # int16 (valid h, valid w, k)
        expected += _header_bytes(f"{lv}/c", (r // 2, h, w)) + (r // 2) * h * w + _header_bytes(f"{lv}/k", (r,)) + 2 * r
    assert len(blob) == expected


def test_pool_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="only lowrank levels"):
        SelectionPolicy(name="nms-ksd", pool={"p3": 2})
    with pytest.raises(ConfigError, match="integer >= 1"):
        SelectionPolicy(name="lowrank", pool={"p3": 0})
    SelectionPolicy(name="lowrank", pool={"p3": 2})
    bad = encode_levels(
        {"p3": LevelRecord(coefficients=torch.ones(2, 9, 11).half())}, feature_shapes=SHAPES, pool={"p3": 2}
    )
    bad["p3/u"] = torch.tensor([9, 11, 3], dtype=torch.int16)  # a factor that does not fit the kept map
    with pytest.raises(StoreError, match="does not fit"):
        decode_levels(decode_record(encode_record(bad)), feature_shapes=SHAPES)


def test_a_pooled_store_serves_full_size_maps_and_projects_smaller(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", rank=2, fit_views=4)
    build(tmp_path, tiny_source, ckpt, "full", policy=policy)
    build(tmp_path, tiny_source, ckpt, "pooled", policy=dataclasses.replace(policy, pool={"p3": 2}))
    full, pooled = StoreReader(tmp_path / "full"), StoreReader(tmp_path / "pooled")
    assert pooled.manifest.encoding["version"] == 2 and full.manifest.encoding["version"] == 1
    image = tiny_source.records[1].image_id
    a, b = full.read(image, View(64)), pooled.read(image, View(64))
    assert a["p3"].coefficients.shape == b["p3"].coefficients.shape
    assert torch.equal(a["p4"].coefficients, b["p4"].coefficients)
    assert not torch.equal(a["p3"].coefficients, b["p3"].coefficients)
    info_full, info_pooled = store_info(tmp_path / "full"), store_info(tmp_path / "pooled")
    assert info_pooled["bytes_per_image_view"] < info_full["bytes_per_image_view"]
    coco_full = info_full["projected_coco"]["bytes_per_view"]
    coco_pooled = info_pooled["projected_coco"]["bytes_per_view"]
    # p3 at COCO scale: 100 x 167 cells, one byte per cell at rank 2 int4 -> 50 x 84 kept cells
    assert coco_full - coco_pooled == pytest.approx(100 * 167 - 50 * 84, abs=16)


def test_a_newer_encoding_version_is_refused(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "s", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    manifest = Manifest.load(tmp_path / "s")
    manifest.encoding["version"] = 99
    manifest.save(tmp_path / "s")
    with pytest.raises(StoreError, match="version 99 is newer"):
        _ = StoreReader(tmp_path / "s").bases
