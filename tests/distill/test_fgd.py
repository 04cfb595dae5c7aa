import math

import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.fgd import FGD, GcBlock
from detkd.distill.masks import box_masks
from detkd.knowledge import TeacherKnowledge

N = 2
LEVELS = {"p3": LevelSpec(4, 4, 8), "p4": LevelSpec(4, 4, 16)}
SIZES = {"p3": (5, 5), "p4": (3, 3)}
# 40x40 canvas; image 0 is 40x24 (padded on the right). Boxes overlap in image 0.
BOXES = [
    torch.tensor([[8.0, 8.0, 20.0, 24.0], [0.0, 0.0, 24.0, 30.0]]),
    torch.tensor([[17.0, 3.0, 39.0, 20.0]]),
]


def _ctx(boxes=BOXES):
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    return DistillContext(targets=targets, image_sizes=[(40, 24), (40, 40)])


def _feats(seed, c=4):
    g = torch.Generator().manual_seed(seed)
    return {lvl: torch.randn(N, c, *SIZES[lvl], generator=g) for lvl in LEVELS}


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---- literal reference ------------------------------------------------------------------


def _softmax(v):
    z = max(v)
    e = [math.exp(x - z) for x in v]
    return [x / sum(e) for x in e]


def _attention(x, temp):
    """x[c][i][j] -> spatial [i][j] = HW softmax(mean_c|x| / T), channel [c] = C softmax(mean_ij|x| / T)."""
    c_, h, w = len(x), len(x[0]), len(x[0][0])
    sp = _softmax([sum(abs(x[c][i][j]) for c in range(c_)) / c_ / temp for i in range(h) for j in range(w)])
    ch = _softmax([sum(abs(x[c][i][j]) for i in range(h) for j in range(w)) / (h * w) / temp for c in range(c_)])
    return [[h * w * sp[i * w + j] for j in range(w)] for i in range(h)], [c_ * v for v in ch]


def _fg_mask(boxes, stride, h, w):
    mask = [[0.0] * w for _ in range(h)]
    for x0, y0, x1, y1 in boxes:
        cells = [
            (i, j)
            for i in range(h)
            for j in range(w)
            if x0 < stride * (j + 1) and x1 > stride * j and y0 < stride * (i + 1) and y1 > stride * i
        ]
        for i, j in cells:
            mask[i][j] = max(mask[i][j], 1.0 / len(cells))
    return mask


def _gc(block, x):
    """Literal GcBlock on x[c][i][j]."""
    c_, h, w = len(x), len(x[0]), len(x[0][0])
    wk, bk = block.conv_mask.weight.flatten().tolist(), block.conv_mask.bias.item()
    p = _softmax([sum(wk[c] * x[c][i][j] for c in range(c_)) + bk for i in range(h) for j in range(w)])
    ctx = [sum(p[i * w + j] * x[c][i][j] for i in range(h) for j in range(w)) for c in range(c_)]
    conv1, ln, _, conv2 = block.channel_add
    w1, b1 = conv1.weight.flatten(1).tolist(), conv1.bias.tolist()
    hid = [sum(w1[o][c] * ctx[c] for c in range(c_)) + b1[o] for o in range(len(b1))]
    mu = sum(hid) / len(hid)
    var = sum((v - mu) ** 2 for v in hid) / len(hid)
    g, b = ln.weight.flatten().tolist(), ln.bias.flatten().tolist()
    hid = [max(0.0, (v - mu) / math.sqrt(var + ln.eps) * g[o] + b[o]) for o, v in enumerate(hid)]
    w2, b2 = conv2.weight.flatten(1).tolist(), conv2.bias.tolist()
    add = [sum(w2[c][o] * hid[o] for o in range(len(hid))) + b2[c] for c in range(c_)]
    return [[[x[c][i][j] + add[c] for j in range(w)] for i in range(h)] for c in range(c_)]


def _loop_fgd(m, s, t, boxes, temp=0.5, a=1e-3, b=5e-4, g=5e-4, lam=5e-6):
    tot = {"fg": 0.0, "bg": 0.0, "att": 0.0, "glob": 0.0}
    for lvl, (h, w) in SIZES.items():
        stride = LEVELS[lvl].stride
        for n in range(N):
            sx, tx = s[lvl][n].tolist(), t[lvl][n].tolist()
            c_ = len(sx)
            sp_t, ch_t = _attention(tx, temp)
            sp_s, ch_s = _attention(sx, temp)
            fg = _fg_mask(boxes[n].tolist(), stride, h, w)
            n_bg = sum(1 for i in range(h) for j in range(w) if fg[i][j] == 0)
            for c in range(c_):
                for i in range(h):
                    for j in range(w):
                        d = (sx[c][i][j] - tx[c][i][j]) ** 2 * sp_t[i][j] * ch_t[c]
                        tot["fg"] += d * fg[i][j] / N
                        if fg[i][j] == 0:
                            tot["bg"] += d / n_bg / N
            tot["att"] += sum(abs(ch_s[c] - ch_t[c]) for c in range(c_)) / N
            tot["att"] += sum(abs(sp_s[i][j] - sp_t[i][j]) for i in range(h) for j in range(w)) / N
            rs, rt = _gc(m.gc_student[lvl], sx), _gc(m.gc_teacher[lvl], tx)
            tot["glob"] += (
                sum((rs[c][i][j] - rt[c][i][j]) ** 2 for c in range(c_) for i in range(h) for j in range(w)) / N
            )
    weights = {"fg": a, "bg": b, "att": g, "glob": lam}
    return {f"fgd.{k}": weights[k] * v for k, v in tot.items()}


# ---- tests ------------------------------------------------------------------------------


def test_registered():
    assert METHODS.get("fgd") is FGD


def test_golden_value():
    m = FGD(levels=LEVELS)  # equal widths: no align conv (reference)
    _randomise(m, seed=3)  # non-trivial GcBlocks (the reference init makes R the identity)
    s, t = _feats(1), _feats(2)
    out = m(s, TeacherKnowledge(features=t), _ctx())
    expected = _loop_fgd(m, s, t, BOXES)
    assert set(out) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_golden_value_custom_weights_and_temperature():
    m = FGD(levels=LEVELS, temperature=0.8, alpha_fg=1.0, beta_bg=2.0, gamma_att=3.0, lambda_glob=4.0)
    s, t = _feats(4), _feats(5)
    out = m(s, TeacherKnowledge(features=t), _ctx())
    expected = _loop_fgd(m, s, t, BOXES, temp=0.8, a=1.0, b=2.0, g=3.0, lam=4.0)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)


def test_gcblock_starts_as_identity():
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(GcBlock(4)(x), x)


def test_zero_when_equal_positive_otherwise():
    m = FGD(levels=LEVELS)
    _randomise(m.gc_student, seed=3)
    m.gc_teacher.load_state_dict(m.gc_student.state_dict())
    t = _feats(2)
    out = m({k: v.clone() for k, v in t.items()}, TeacherKnowledge(features=t), _ctx())
    assert all(abs(v.item()) < 1e-12 for v in out.values())
    out = m(_feats(1), TeacherKnowledge(features=t), _ctx())
    assert all(v.item() > 0 for v in out.values())


def test_gradients_reach_student_adapter_and_gcblocks_never_teacher():
    m = FGD(levels={k: LevelSpec(3, 4, v.stride) for k, v in LEVELS.items()})
    with torch.no_grad():  # leave the zero init of the last conv, or no gradient reaches the inner layers
        for block in [*m.gc_student.values(), *m.gc_teacher.values()]:
            block.channel_add[-1].weight.normal_()
    s = {k: v.requires_grad_(True) for k, v in _feats(1, c=3).items()}
    t = {k: v.requires_grad_(True) for k, v in _feats(2).items()}
    sum(m(s, TeacherKnowledge(features=t), _ctx()).values()).backward()
    for lvl in LEVELS:
        assert s[lvl].grad.abs().sum() > 0 and t[lvl].grad is None
        assert m.adapters[lvl].weight.grad.abs().sum() > 0
        for name, p in [*m.gc_student[lvl].named_parameters(), *m.gc_teacher[lvl].named_parameters()]:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fg_mask_smallest_box_wins_and_uses_stride_on_padded_canvas():
    fg = box_masks([b for b in BOXES], 8, 5, 5, mode="inverse_area")
    # image 0: big box covers rows [0, 4) x columns [0, 3) -> 1/12; small box [1, 3) x [1, 3) -> 1/4 wins there.
    expected0 = torch.zeros(5, 5)
    expected0[0:4, 0:3] = 1 / 12
    expected0[1:3, 1:3] = 1 / 4
    torch.testing.assert_close(fg[0], expected0)
    # The padded-width pitfall (x / img_w * W with img_w = 24) would stretch the small box to columns 1..4.
    pitfall = torch.zeros(5, 5)
    pitfall[1:3, math.floor(8 / 24 * 5) : math.ceil(20 / 24 * 5)] = 1.0
    assert not torch.equal(fg[0] == 1 / 4, pitfall.bool())


def test_no_boxes_gives_zero_fg_and_uniform_bg():
    m = FGD(levels=LEVELS)
    s, t = _feats(1), _feats(2)
    none = [torch.zeros(0, 4)] * N
    out = m(s, TeacherKnowledge(features=t), _ctx(none))
    assert out["fgd.fg"].item() == 0.0
    torch.testing.assert_close(out["fgd.bg"], torch.tensor(_loop_fgd(m, s, t, none)["fgd.bg"]), rtol=1e-5, atol=0)


def test_refuses_channel_grouped_teacher_and_missing_boxes():
    m = FGD(levels=LEVELS)
    s, t = _feats(1), _feats(2)
    grouped = {k: v[:, :2] for k, v in t.items()}
    with pytest.raises(ValueError, match="channel_group"):
        m(s, TeacherKnowledge(features=grouped, channel_group=2), _ctx())
    with pytest.raises(ValueError, match="boxes"):
        m(s, TeacherKnowledge(features=t), DistillContext(targets=[{}] * N, image_sizes=[(40, 40)] * N))
