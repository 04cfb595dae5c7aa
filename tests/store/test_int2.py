"""int2 lowrank coefficients: four levels per coefficient, a step per component, four cells per byte."""

import dataclasses
import math

import pytest
import torch

from detkd.data.views import View
from detkd.errors import ConfigError
from detkd.store.codec import as_stored, decode_int2_maps, decode_levels, encode_int2_maps, encode_levels
from detkd.store.format import LevelRecord, StoreError, decode_record, encode_record
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.verify import store_info
from tests.store.test_build import build
from tests.store.test_lowrank import _header_bytes


def _round_trip(c: torch.Tensor, shape: tuple[int, int], **kwargs) -> torch.Tensor:
    levels = {"p3": LevelRecord(coefficients=c.half())}
    arrays = encode_levels(levels, feature_shapes={"p3": shape}, value_dtype="int2", **kwargs)
    return decode_levels(decode_record(encode_record(arrays)), feature_shapes={"p3": shape})["p3"].coefficients


def test_a_hand_worked_map():
    # One component, 1 x 6 cells: RMS = sqrt((9 + 1 + 0.04 + 0.81 + 6.25 + 0) / 6) = sqrt(17.1 / 6).
    c = torch.tensor([[[-3.0, -1.0, 0.2, 0.9, 2.5, 0.0]]])
    step = float(torch.tensor(math.sqrt(17.1 / 6) * 0.9957).half())  # 1.681 -> float16
    # floor(x / step) clamped to [-2, 1]: -3 -> -2, -1 -> -1, 0.2 -> 0, 0.9 -> 0, 2.5 -> 1, 0 -> 0
    want = torch.tensor([-1.5, -0.5, 0.5, 0.5, 1.5, 0.5]) * step
    back = _round_trip(c, (1, 8))
    torch.testing.assert_close(back.float()[0, 0], want.half().float(), rtol=0, atol=0)
    packed, m = encode_int2_maps(c)
    assert packed.shape == (1, 1, 2) and float(m[0]) == step
    # codes q + 2 = 0, 1, 2, 2 | 3, 2 (+ padding 2, 2), low bits first
    assert packed.flatten().tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6, 3 | 2 << 2 | 2 << 4 | 2 << 6]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("width", [1, 4, 7, 13])
def test_round_trip_within_its_bound(seed, width):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([10.0, 1.0, 0.01, 0.0, 3.0])[:, None, None]
    x = torch.randn(5, 6, width, generator=g)
    if seed % 2:  # heavy tails (Student t, 2 degrees of freedom), like the few large cells on objects
        x = x / torch.randn(2, 5, 6, width, generator=g).pow(2).mean(0).sqrt()
    c = (x * scales).half()
    back = _round_trip(c, (6, 16)).float()
    ref = c.float()
    assert back.shape == c.shape
    step = (ref.pow(2).mean(dim=(1, 2)).sqrt() * 0.9957).half().float()[:, None, None]
    # Within [-2, 2) steps: half a step; beyond: clipped to the outer level, 1.5 steps.
    bound = torch.where(ref.abs() < 2 * step, step / 2, ref.abs() - 1.5 * step)
    assert ((back - ref).abs() <= bound * 1.001 + step * 2e-3 + 1e-6).all()
    live = step.flatten() > 0
    codes = back[live] / step[live] - 0.5  # every value is one of the four levels (up to float16 rounding)
    assert (codes - codes.round()).abs().max() < 2e-3 and set(codes.round().unique().tolist()) <= {-2, -1, 0, 1}
    assert live.tolist() == [True, True, True, False, True]
    assert torch.equal(back[3], torch.zeros_like(back[3]))  # an all-zero component stays zero
    levels = {"p3": LevelRecord(coefficients=c)}
    assert torch.equal(as_stored(levels, value_dtype="int2")["p3"].coefficients.float(), back)


def test_gaussian_error_is_maxs_optimum():
    # Max (1960), uniform 4-level quantiser of a unit Gaussian: step 0.9957, mean squared error 0.1188.
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 400, 500, generator=g)
    back = decode_int2_maps(*encode_int2_maps(c), 500).float()
    mse = (back - c).pow(2).mean(dim=(1, 2)) / c.pow(2).mean(dim=(1, 2))
    assert mse.tolist() == pytest.approx([0.1188, 0.1188], abs=0.002)


@pytest.mark.parametrize("k", [1, 2])
def test_encoded_bytes_equal_the_layout_arithmetic(k):
    r, shapes = 5, {"p3": (9, 11), "p4": (5, 6), "p5": (3, 3)}
    levels = {lv: LevelRecord(coefficients=torch.randn(r, h, w).half()) for lv, (h, w) in shapes.items()}
    pool = {"p3": k}
    blob = encode_record(encode_levels(levels, feature_shapes=shapes, value_dtype="int2", pool=pool))
    expected = 2 + 1 + 16 + 1  # preamble and array count
    for lv, (h, w) in shapes.items():
        kh, kw = -(-h // pool.get(lv, 1)), -(-w // pool.get(lv, 1))
        expected += _header_bytes(f"{lv}/c", (r, kh, -(-kw // 4))) + r * kh * -(-kw // 4)  # four cells a byte
        expected += _header_bytes(f"{lv}/u", (3,)) + 2 * 3  # valid size and pooling k, int16
        expected += _header_bytes(f"{lv}/m", (r,)) + 2 * r  # one float16 step per component
    assert len(blob) == expected


def test_pooled_int2_is_int2_of_the_block_means():
    c = torch.randn(3, 9, 11).half()
    pooled = torch.nn.functional.avg_pool2d(c.float()[None], 2, ceil_mode=True)[0]
    want = decode_int2_maps(*encode_int2_maps(pooled), pooled.shape[-1])
    want = want.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :9, :11]
    assert torch.equal(_round_trip(c, (9, 11), pool={"p3": 2}), want)


def test_bad_int2_records_and_policies_are_refused():
    arrays = encode_levels({"p3": LevelRecord(coefficients=torch.randn(2, 3, 5))}, feature_shapes={"p3": (3, 5)},
                           value_dtype="int2")  # fmt: skip
    without_size = {name: a for name, a in arrays.items() if not name.endswith("/u")}
    with pytest.raises(StoreError, match="int2 step without"):
        decode_levels(without_size, feature_shapes={"p3": (3, 5)})
    wider = {**arrays, "p3/u": torch.tensor([3, 9, 1], dtype=torch.int16)}
    with pytest.raises(StoreError, match="cannot hold 9 cells"):
        decode_levels(wider, feature_shapes={"p3": (3, 5)})
    with pytest.raises(ConfigError, match="only lowrank coefficient maps"):
        SelectionPolicy(name="nms-ksd", value_dtype="int2")
    with pytest.raises(ConfigError, match="only lowrank coefficient maps"):
        SelectionPolicy(name="lowrank", per_level={"p7": "dense"}, value_dtype="int2")


def test_an_int2_store_serves_the_int4_stores_maps_within_the_int2_error(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", rank=4, fit_views=4, value_dtype="float16")
    build(tmp_path, tiny_source, ckpt, "f16", policy=policy)
    build(tmp_path, tiny_source, ckpt, "int2", policy=dataclasses.replace(policy, value_dtype="int2"))
    exact, small = StoreReader(tmp_path / "f16"), StoreReader(tmp_path / "int2")
    assert small.manifest.encoding["version"] == 3 and exact.manifest.encoding["version"] == 1
    assert small.manifest.dtypes["coefficients"].startswith("int2")
    image = tiny_source.records[2].image_id
    for view in (View(64), View(64, flip=True)):
        a, b = exact.read(image, view), small.read(image, view)
        for lv in a:
            want = a[lv].coefficients.float()
            assert b[lv].coefficients.shape == want.shape
            assert torch.equal(b[lv].coefficients, as_stored(a, value_dtype="int2")[lv].coefficients)
    info_exact, info_small = store_info(tmp_path / "f16"), store_info(tmp_path / "int2")
    # At COCO scale: 16 bits per coefficient against 2, plus a few header bytes per level.
    ratio = info_small["projected_coco"]["bytes_per_view"] / info_exact["projected_coco"]["bytes_per_view"]
    assert ratio == pytest.approx(1 / 8, abs=0.01)
