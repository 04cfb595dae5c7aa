import math

import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.ssim import SSIMKD, effective_window, ssim_loss, ssim_map
from detkd.knowledge import TeacherKnowledge

N = 2
LEVELS = {"p3": LevelSpec(2, 2, 8), "p4": LevelSpec(2, 2, 16)}
SIZES = {"p3": (12, 13), "p4": (5, 6)}  # p3: reflect padding; p4 is too small for it (zeros, or a 5x5 window)
CTX = DistillContext(targets=[], image_sizes=[(96, 104)] * N)


def _feats(seed, c=2, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return {lvl: torch.randn(N, c, *hw, generator=g) * 3 + 1 for lvl, hw in sizes.items()}


# ---- literal reference ------------------------------------------------------------------


def _reflect(i, n):
    """Index into a length-n axis with reflect padding (edge sample not repeated)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def _window(k, sigma=1.5):
    c = (k - 1) / 2
    raw = [[math.exp(-((u - c) ** 2 + (v - c) ** 2) / (2 * sigma**2)) for v in range(k)] for u in range(k)]
    total = sum(sum(row) for row in raw)
    return [[x / total for x in row] for row in raw]


def _loop_ssim(x, y, window=11, k1=0.01, k2=0.03, small="zeros"):
    """x, y: [h][w] lists. Returns the SSIM map [h][w] with explicit local weighted means.

    Maps too small for reflect padding (window // 2 >= h or w): ``small="zeros"`` reads 0 outside
    the map with the full window; ``small="shrink"`` uses the largest odd window that fits.
    """
    h, w = len(x), len(x[0])
    k, zeros = window, False
    if window // 2 >= min(h, w):
        if small == "shrink":
            k = min(window, h, w)
            k = k if k % 2 else k - 1
        else:
            zeros = True
    wt, p = _window(k), k // 2

    def at(img, i, j):
        if zeros:
            return img[i][j] if 0 <= i < h and 0 <= j < w else 0.0
        return img[_reflect(i, h)][_reflect(j, w)]

    c1, c2 = k1**2, k2**2
    out = [[0.0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            mx = my = sxx = syy = sxy = 0.0
            for u in range(k):
                for v in range(k):
                    a, b = at(x, i + u - p, j + v - p), at(y, i + u - p, j + v - p)
                    q = wt[u][v]
                    mx, my = mx + q * a, my + q * b
                    sxx, syy, sxy = sxx + q * a * a, syy + q * b * b, sxy + q * a * b
            vx, vy, cov = sxx - mx * mx, syy - my * my, sxy - mx * my
            out[i][j] = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return out


def _minmax(x, per_channel=False):
    """x: [c][h][w] lists -> psi(x)."""
    groups = [[ch] for ch in x] if per_channel else [x]
    out = []
    for grp in groups:
        vals = [v for ch in grp for row in ch for v in row]
        lo, hi = min(vals), max(vals)
        out.extend([[[(v - lo) / (hi - lo + 1e-8) for v in row] for row in ch] for ch in grp])
    return out


def _conv1x1(x, weight, bias):
    """x: [c_in][h][w]; weight [c_out][c_in]."""
    h, w = len(x[0]), len(x[0][0])
    return [
        [[sum(weight[o][c] * x[c][i][j] for c in range(len(x))) + bias[o] for j in range(w)] for i in range(h)]
        for o in range(len(weight))
    ]


def _loop_method(s, t, adapter=None, weight=2.0, per_channel=False, small="zeros"):
    out = {}
    for lvl in s:
        total, count = 0.0, 0
        for n in range(N):
            sx = s[lvl][n].tolist()
            if adapter is not None:
                sx = _conv1x1(sx, adapter[lvl].weight.flatten(1).tolist(), adapter[lvl].bias.tolist())
            sx, tx = _minmax(sx, per_channel), _minmax(t[lvl][n].tolist(), per_channel)
            for c in range(len(tx)):
                m = _loop_ssim(sx[c], tx[c], small=small)
                for row in m:
                    for v in row:
                        total += min(1.0, max(0.0, (1 - v) / 2))
                        count += 1
        out[f"ssim.{lvl}"] = weight * total / count
    return out


# ---- tests ------------------------------------------------------------------------------


def test_registered():
    assert METHODS.get("ssim") is SSIMKD


def test_effective_window_fallback():
    assert [effective_window(11, h, w) for h, w in [(1, 1), (2, 3), (5, 5), (12, 13), (10, 20), (4, 40)]] == [
        1,
        1,
        5,
        11,
        9,
        3,
    ]


@pytest.mark.parametrize("small", ["zeros", "shrink"])
def test_ssim_map_matches_literal_padding(small):
    g = torch.Generator().manual_seed(0)
    for h, w in [(12, 13), (5, 6), (2, 3), (1, 1)]:
        x, y = torch.rand(1, 1, h, w, generator=g), torch.rand(1, 1, h, w, generator=g)
        expected = torch.tensor(_loop_ssim(x[0, 0].tolist(), y[0, 0].tolist(), small=small))
        got = ssim_map(x, y, small_maps=small)[0, 0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-6)  # fp32 variances


def test_small_maps_keep_contrast_and_structure_with_zero_padding():
    # On a 1x1 map the shrunk (1x1) window sees one value per side: SSIM is the luminance term alone.
    x, y = torch.tensor([[[[0.8]]]]), torch.tensor([[[[0.2]]]])
    c1 = 0.01**2
    lum = (2 * 0.8 * 0.2 + c1) / (0.8**2 + 0.2**2 + c1)
    torch.testing.assert_close(ssim_map(x, y, small_maps="shrink"), torch.tensor([[[[lum]]]]))
    # With zeros around it, the window sees variance, so the value differs from luminance alone
    # (and equals the literal computation, checked above).
    assert abs(float(ssim_map(x, y)) - lum) > 1e-3
    # A 2x2 map: with zero padding every window sees the neighbours, so putting b's cells out of
    # step with a's (swapping two) costs far more similarity than the cell-by-cell luminance drop.
    a = torch.tensor([[[[0.9, 0.1], [0.5, 0.3]]]])
    b = torch.tensor([[[[0.8, 0.2], [0.4, 0.3]]]])
    b_swapped = torch.tensor([[[[0.2, 0.8], [0.4, 0.3]]]])
    shrink = ssim_map(a, b, small_maps="shrink").mean() - ssim_map(a, b_swapped, small_maps="shrink").mean()
    zeros = ssim_map(a, b).mean() - ssim_map(a, b_swapped).mean()
    assert float(zeros) > float(shrink) + 0.05


def test_golden_value_shrunk_windows():
    m = SSIMKD(levels=LEVELS, adapter="identity", small_maps="shrink")
    s, t = _feats(1), _feats(2)
    out = m(s, TeacherKnowledge(features=t), CTX)
    for key, value in _loop_method(s, t, small="shrink").items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_golden_value_identity_adapter():
    m = SSIMKD(levels=LEVELS, adapter="identity")
    s, t = _feats(1), _feats(2)
    out = m(s, TeacherKnowledge(features=t), CTX)
    expected = _loop_method(s, t)
    assert set(out) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_golden_value_conv_adapter_per_channel_weight_4():
    levels = {k: LevelSpec(3, 2, v.stride) for k, v in LEVELS.items()}
    m = SSIMKD(levels=levels, weight=4.0, normalize="channel")
    s, t = _feats(3, c=3), _feats(4)
    out = m(s, TeacherKnowledge(features=t), CTX)
    expected = _loop_method(s, t, adapter=m.adapters, weight=4.0, per_channel=True)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_identical_maps_give_zero_loss_and_ssim_one():
    t = _feats(2)
    m = SSIMKD(levels=LEVELS, adapter="identity")
    out = m({k: v.clone() for k, v in t.items()}, TeacherKnowledge(features=t), CTX)
    assert all(abs(v.item()) < 1e-6 for v in out.values())
    x = torch.rand(2, 3, 7, 8)
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x), rtol=0, atol=1e-5)


def test_symmetric_and_bounded():
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 3, 9, 10, generator=g), torch.rand(2, 3, 9, 10, generator=g)
    torch.testing.assert_close(ssim_map(x, y), ssim_map(y, x))
    torch.testing.assert_close(ssim_loss(x, y), ssim_loss(y, x))
    for a, b in [(x, y), (x, 1 - x), (x, torch.zeros_like(x)), (torch.zeros_like(x), torch.ones_like(x))]:
        smap = ssim_map(a, b)
        assert smap.min() >= -1 - 1e-5 and smap.max() <= 1 + 1e-5
        loss = ssim_loss(a, b)
        assert 0.0 <= loss.item() <= 1.0


def test_fp32_under_bf16_autocast_equals_plain():
    levels = {k: LevelSpec(3, 2, v.stride) for k, v in LEVELS.items()}
    m = SSIMKD(levels=levels)
    s, t = _feats(3, c=3), _feats(4)
    plain = m(s, TeacherKnowledge(features=t), CTX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = m(s, TeacherKnowledge(features=t), CTX)
        x, y = torch.rand(1, 2, 6, 7), torch.rand(1, 2, 6, 7)
        amp_map = ssim_map(x, y)
    assert amp_map.dtype == torch.float32
    torch.testing.assert_close(amp_map, ssim_map(x, y), rtol=0, atol=0)
    for key in plain:
        assert amp[key].dtype == torch.float32
        torch.testing.assert_close(amp[key], plain[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5)])
def test_small_maps_are_finite(size):
    m = SSIMKD(levels={"p7": LevelSpec(2, 2, 128)})
    s = torch.randn(N, 2, *size, requires_grad=True)
    t = torch.randn(N, 2, *size)
    out = m({"p7": s}, TeacherKnowledge(features={"p7": t}), CTX)
    assert torch.isfinite(out["ssim.p7"])
    out["ssim.p7"].backward()
    assert torch.isfinite(s.grad).all()


def test_gradients_reach_student_and_adapter_never_teacher():
    levels = {k: LevelSpec(3, 2, v.stride) for k, v in LEVELS.items()}
    m = SSIMKD(levels=levels)
    s = {k: v.requires_grad_(True) for k, v in _feats(1, c=3).items()}
    t = {k: v.requires_grad_(True) for k, v in _feats(2).items()}
    sum(m(s, TeacherKnowledge(features=t), CTX).values()).backward()
    for lvl in LEVELS:
        assert s[lvl].grad.abs().sum() > 0 and t[lvl].grad is None
        assert m.adapters[lvl].weight.grad.abs().sum() > 0


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="normalize"):
        SSIMKD(levels=LEVELS, normalize="batch")
    with pytest.raises(ValueError, match="odd"):
        SSIMKD(levels=LEVELS, window_size=10)
    with pytest.raises(ValueError, match="small_maps"):
        SSIMKD(levels=LEVELS, small_maps="crop")
