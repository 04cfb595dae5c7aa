import math

import pytest
import torch
from torch import nn

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.gkd import GKD, gaussian_box_mask
from detkd.knowledge import TeacherKnowledge
from detkd.knowledge.importance import importance_maps

N = 2
LEVELS = {"p3": LevelSpec(3, 4, 8), "p4": LevelSpec(3, 4, 16)}  # student narrower: a 1x1 align conv
SIZES = {"p3": (5, 6), "p4": (3, 3)}
# 40x48 canvas; image 0 is 40x24 (padded on the right). Boxes overlap in image 0.
BOXES = [
    torch.tensor([[8.0, 8.0, 20.0, 24.0], [0.0, 0.0, 24.0, 30.0]]),
    torch.tensor([[17.0, 3.0, 39.0, 20.0]]),
]
IMAGE_SIZES = [(40, 24), (40, 48)]


def _ctx(boxes=BOXES, student_importance=None):
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    return DistillContext(targets=targets, image_sizes=IMAGE_SIZES, student_importance=student_importance)


def _feats(seed, c):
    g = torch.Generator().manual_seed(seed)
    return {lvl: torch.randn(N, c, *SIZES[lvl], generator=g) for lvl in LEVELS}


def _knowledge(t, seed=9, zero_image=None):
    g = torch.Generator().manual_seed(seed)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in t.items()}
    spatial, channel = importance_maps(t, grads)
    if zero_image is not None:  # e.g. a level/image the loss does not reach
        for v in spatial.values():
            v[zero_image] = 0
    return TeacherKnowledge(features=t, importance=spatial, channel_importance=channel)


# ---- literal reference ------------------------------------------------------------------


def _softmax(v):
    z = max(v)
    e = [math.exp(x - z) for x in v]
    return [x / sum(e) for x in e]


def _attention(x, temp):
    c_, h, w = len(x), len(x[0]), len(x[0][0])
    sp = _softmax([sum(abs(x[c][i][j]) for c in range(c_)) / c_ / temp for i in range(h) for j in range(w)])
    ch = _softmax([sum(abs(x[c][i][j]) for i in range(h) for j in range(w)) / (h * w) / temp for c in range(c_)])
    return [[h * w * sp[i * w + j] for j in range(w)] for i in range(h)], [c_ * v for v in ch]


def _touches(x0, y0, x1, y1, stride, i, j):
    return x0 < stride * (j + 1) and x1 > stride * j and y0 < stride * (i + 1) and y1 > stride * i


def _loop_box_mask(boxes, stride, h, w, image_size=None):
    mask = [[0.0] * w for _ in range(h)]
    for x0, y0, x1, y1 in boxes:
        bw, bh = (x1 - x0) / stride, (y1 - y0) / stride
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        scale = 1 / (
            4 * (math.ceil(x1 / stride) - math.floor(x0 / stride)) * (math.ceil(y1 / stride) - math.floor(y0 / stride))
        )
        ex = ((cx - bw) * stride, (cy - bh) * stride, (cx + bw) * stride, (cy + bh) * stride)
        for i in range(h):
            for j in range(w):
                if _touches(x0, y0, x1, y1, stride, i, j):
                    v = 1.0
                elif _touches(*ex, stride, i, j):
                    v = math.exp(-0.5 * ((j + 0.5 - cx) / bw) ** 2 - 0.5 * ((i + 0.5 - cy) / bh) ** 2)
                else:
                    v = 0.0
                if image_size is not None and (stride * i >= image_size[0] or stride * j >= image_size[1]):
                    v = 0.0
                mask[i][j] = max(mask[i][j], v * scale)
    return mask


def _loop_gkd(m, s, t, know, *, beta, alpha, lam, gamma, temp=0.5, chan=False, tau=0.5):
    tot = {"grad": 0.0, "fg": 0.0, "global": 0.0, "att": 0.0}
    for lvl, (h, w) in SIZES.items():
        for n in range(N):
            sx = s[lvl][n].tolist()
            wt, b = m.adapters[lvl].weight.flatten(1).tolist(), m.adapters[lvl].bias.tolist()
            sx = [
                [[sum(wt[o][c] * sx[c][i][j] for c in range(len(sx))) + b[o] for j in range(w)] for i in range(h)]
                for o in range(len(b))
            ]
            tx = t[lvl][n].tolist()
            c_ = len(tx)
            g = know.importance[lvl][n, 0].tolist()
            g_sum = sum(sum(row) for row in g)
            g_hat = [[h * w * v / g_sum if g_sum > 0 else 1.0 for v in row] for row in g]
            if chan:
                cw = know.channel_importance[lvl][n].tolist()
                top = max(abs(v) for v in cw)
                omega = [c_ * v for v in _softmax([v / top / tau for v in cw])]
            else:
                omega = [1.0] * c_
            sp_t, ch_t = _attention(tx, temp)
            sp_s, ch_s = _attention(sx, temp)
            fg = _loop_box_mask(BOXES[n].tolist(), LEVELS[lvl].stride, h, w, IMAGE_SIZES[n])
            for c in range(c_):
                for i in range(h):
                    for j in range(w):
                        d = (tx[c][i][j] - sx[c][i][j]) ** 2
                        tot["grad"] += g_hat[i][j] * omega[c] * d / N
                        tot["fg"] += sp_t[i][j] * ch_t[c] * fg[i][j] * d / N
                        tot["global"] += sp_t[i][j] * ch_t[c] * d / (N * h * w)
            tot["att"] += sum(abs(ch_s[c] - ch_t[c]) for c in range(c_)) / N
            tot["att"] += sum(abs(sp_s[i][j] - sp_t[i][j]) for i in range(h) for j in range(w)) / N
    weights = {"grad": beta, "fg": alpha, "global": lam, "att": gamma}
    return {f"gkd.{k}": weights[k] * v for k, v in tot.items()}


def _loop_gradcam(a, grad, channel_mode, activation_mode):
    """a, grad: [c][h][w] lists of one image -> (cam [h][w] in [0, 1], w [c])."""
    c_, h, w = len(a), len(a[0]), len(a[0][0])
    f = abs if channel_mode == "abs" else (lambda v: v)
    wk = [sum(f(grad[k][i][j]) for i in range(h) for j in range(w)) / (h * w) for k in range(c_)]
    act = abs if activation_mode == "abs" else (lambda v: v)
    cam = [[max(0.0, sum(wk[k] * act(a[k][i][j]) for k in range(c_))) for j in range(w)] for i in range(h)]
    lo = min(min(row) for row in cam)
    cam = [[v - lo for v in row] for row in cam]
    hi = max(max(row) for row in cam)
    return [[v / (hi + 1e-7) for v in row] for row in cam], wk


# ---- tests ------------------------------------------------------------------------------


def test_registered_and_needs():
    assert METHODS.get("gkd") is GKD
    assert GKD.needs == {"features", "importance", "boxes"}


@pytest.mark.parametrize("channel_mode", ["signed", "abs"])
@pytest.mark.parametrize("activation_mode", ["signed", "abs"])
def test_importance_maps_equal_literal_gradcam_on_real_gradients(channel_mode, activation_mode):
    torch.manual_seed(0)
    net = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.randn(N, 2, 5, 6)
    feats = net(x)
    coeff = torch.randn(feats.shape)  # loss = sum(coeff * A) + const: dL/dA = coeff exactly
    loss = (coeff * feats).sum() + net.weight.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, feats)
    torch.testing.assert_close(grad, coeff)
    spatial, channel = importance_maps(
        {"p3": feats}, {"p3": grad}, channel_mode=channel_mode, activation_mode=activation_mode
    )
    assert spatial["p3"].shape == (N, 1, 5, 6) and channel["p3"].shape == (N, 3)
    assert not spatial["p3"].requires_grad
    for n in range(N):
        cam, wk = _loop_gradcam(feats[n].tolist(), grad[n].tolist(), channel_mode, activation_mode)
        torch.testing.assert_close(spatial["p3"][n, 0], torch.tensor(cam), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(channel["p3"][n], torch.tensor(wk), rtol=1e-5, atol=1e-7)
        assert spatial["p3"][n].min() == 0 and 0.999 < spatial["p3"][n].max() <= 1


def test_importance_maps_constant_map_is_zero_and_modes_checked():
    a = torch.randn(1, 3, 4, 4)
    spatial, _ = importance_maps({"p3": a}, {"p3": torch.zeros_like(a)})
    assert torch.equal(spatial["p3"], torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="importance mode"):
        importance_maps({"p3": a}, {"p3": a}, channel_mode="relu")
    with pytest.raises(ValueError, match="no gradients"):
        importance_maps({"p3": a}, {})


def test_gaussian_box_mask_hand_made_box():
    # stride 4: box [8, 8, 16, 24] px -> cells x [2, 4), y [2, 6); w = 2, h = 4, centre (3, 4);
    # window 4 x 8 cells: x [1, 5), y [0, 8); scale 1 / (4 * 2 * 4) = 1 / 32.
    mask = gaussian_box_mask(torch.tensor([[8.0, 8.0, 16.0, 24.0]]), 4, 10, 8)
    assert torch.equal(mask[2:6, 2:4], torch.full((4, 2), 1 / 32))
    corner = math.exp(-0.5 * (1.5 / 2) ** 2 - 0.5 * (3.5 / 4) ** 2) / 32  # cell (0, 1): centre (1.5, 0.5)
    for i, j in [(0, 1), (0, 4), (7, 1), (7, 4)]:  # the four window corners, symmetric about the centre
        assert mask[i, j].item() == pytest.approx(corner, rel=1e-6)
    edge = math.exp(-0.5 * (0.5 / 2) ** 2 - 0.5 * (2.5 / 4) ** 2) / 32  # cell (1, 2): centre (2.5, 1.5), above the box
    assert mask[1, 2].item() == pytest.approx(edge, rel=1e-6)
    assert mask[3, 1].item() == pytest.approx(math.exp(-0.5 * (1.5 / 2) ** 2 - 0.5 * (0.5 / 4) ** 2) / 32, rel=1e-6)
    outside = torch.ones(10, 8, dtype=torch.bool)
    outside[0:8, 1:5] = False
    assert mask[outside].abs().sum() == 0
    expected = torch.tensor(_loop_box_mask([[8.0, 8.0, 16.0, 24.0]], 4, 10, 8))
    torch.testing.assert_close(mask, expected, rtol=1e-6, atol=0)


def test_gaussian_box_mask_padded_canvas_uses_box_over_stride():
    box = torch.tensor([[24.0, 8.0, 40.0, 20.0]])
    small = gaussian_box_mask(box, 8, 4, 8)
    padded = gaussian_box_mask(box, 8, 4, 12)  # same image, wider padded batch canvas
    torch.testing.assert_close(padded[:, :8], small)
    assert padded[:, 8:].abs().sum() == 0
    # the released code's projection box / img_w * W (img_w = 64, W = 12) would put the box at x in [4.5, 7.5)
    assert torch.equal(padded[1:3, 3:5], torch.full((2, 2), 1 / 16))  # box cells x [3, 5), y [1, 3): 1 / (4 * 2 * 2)
    assert padded.max() == 1 / 16
    # cells beyond the valid image are zero when image_size is given
    clipped = gaussian_box_mask(box, 8, 4, 12, image_size=(32, 32))
    assert clipped[:, 4:].abs().sum() == 0 and torch.equal(clipped[:, :4], padded[:, :4])


def test_gaussian_box_mask_overlap_takes_max_and_empty():
    boxes = torch.tensor([[8.0, 8.0, 16.0, 24.0], [0.0, 0.0, 32.0, 40.0]])
    mask = gaussian_box_mask(boxes, 4, 12, 10)
    a = gaussian_box_mask(boxes[:1], 4, 12, 10)
    b = gaussian_box_mask(boxes[1:], 4, 12, 10)
    torch.testing.assert_close(mask, torch.maximum(a, b))
    torch.testing.assert_close(mask, torch.tensor(_loop_box_mask(boxes.tolist(), 4, 12, 10)), rtol=1e-6, atol=0)
    assert gaussian_box_mask(torch.zeros(0, 4), 4, 3, 3).abs().sum() == 0


def test_golden_value_all_terms():
    m = GKD(levels=LEVELS, beta=1.0, alpha=2.0, lam=3.0, gamma=4.0)
    s, t = _feats(1, 3), _feats(2, 4)
    know = _knowledge(t, zero_image=1)  # image 1: all-zero importance -> uniform weights
    out = m(s, know, _ctx())
    expected = _loop_gkd(m, s, t, know, beta=1.0, alpha=2.0, lam=3.0, gamma=4.0)
    assert set(out) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_golden_value_defaults_with_channel_weights():
    m = GKD(levels=LEVELS, channel_weights=True, temperature=0.8, channel_temperature=0.3)
    s, t = _feats(3, 3), _feats(4, 4)
    know = _knowledge(t, seed=11)
    out = m(s, know, _ctx())
    expected = _loop_gkd(m, s, t, know, beta=1e-4, alpha=1e-3, lam=5e-4, gamma=1e-3, temp=0.8, chan=True, tau=0.3)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_zero_weight_skips_terms_and_boxes():
    m = GKD(levels=LEVELS, alpha=0.0, lam=0.0, gamma=0.0)
    s, t = _feats(1, 3), _feats(2, 4)
    ctx = DistillContext(targets=[{}, {}], image_sizes=IMAGE_SIZES)  # no boxes needed without the fine term
    assert set(m(s, _knowledge(t), ctx)) == {"gkd.grad"}
    with pytest.raises(ValueError, match="boxes"):
        GKD(levels=LEVELS)(s, _knowledge(t), ctx)


def test_missing_importance_is_a_clear_error():
    m = GKD(levels=LEVELS)
    with pytest.raises(ValueError, match="importance"):
        m(_feats(1, 3), TeacherKnowledge(features=_feats(2, 4)), _ctx())


def test_gradients_reach_student_and_adapter_never_teacher():
    m = GKD(levels=LEVELS, channel_weights=True)
    s = {k: v.requires_grad_(True) for k, v in _feats(1, 3).items()}
    t = {k: v.requires_grad_(True) for k, v in _feats(2, 4).items()}
    know = _knowledge({k: v.detach() for k, v in t.items()})
    know.features = t
    know.importance = {k: v.requires_grad_(True) for k, v in know.importance.items()}
    sum(m(s, know, _ctx()).values()).backward()
    for lvl in LEVELS:
        assert s[lvl].grad.abs().sum() > 0 and t[lvl].grad is None
        assert know.importance[lvl].grad is None
        assert m.adapters[lvl].weight.grad.abs().sum() > 0


def test_parity_mode_is_the_constant_cam_l1():
    m = GKD(levels=LEVELS, mode="parity", beta=0.5)
    assert list(m.parameters()) == []
    s = {k: v.requires_grad_(True) for k, v in _feats(1, 3).items()}
    t = _feats(2, 4)
    know = _knowledge(t)
    g = torch.Generator().manual_seed(3)
    cam_s = {k: torch.rand(v.shape, generator=g) for k, v in know.importance.items()}
    out = m(s, know, _ctx(student_importance=cam_s))
    expected = 0.0
    for lvl, (h, w) in SIZES.items():
        ct, cs = know.importance[lvl].tolist(), cam_s[lvl].tolist()
        expected += (
            0.5
            * sum(abs(ct[n][0][i][j] - cs[n][0][i][j]) for n in range(N) for i in range(h) for j in range(w))
            / (N * h * w)
        )
    assert set(out) == {"gkd.cam"}
    torch.testing.assert_close(out["gkd.cam"], torch.tensor(expected), rtol=1e-5, atol=0)
    assert not out["gkd.cam"].requires_grad  # trains nothing by itself
    with pytest.raises(ValueError, match="student_importance"):
        m(s, know, _ctx())


def test_rejects_bad_options_and_grouped_teacher():
    with pytest.raises(ValueError, match="mode"):
        GKD(levels=LEVELS, mode="bmfi")
    t = _feats(2, 4)
    know = _knowledge(t)
    know.channel_group = 2
    with pytest.raises(ValueError, match="channel_group"):
        GKD(levels=LEVELS)(_feats(1, 3), know, _ctx())
