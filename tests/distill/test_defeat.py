import math

import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.defeat import DeFeat, assign_box_levels
from detkd.distill.masks import box_masks
from detkd.knowledge import TeacherKnowledge

N = 2
# Two levels of a 40x40 canvas; images of 40x24 and 40x40 pixels (image 0 padded on the right).
LEVELS = {"p3": LevelSpec(4, 4, 8), "p4": LevelSpec(4, 4, 16)}
SIZES = {"p3": (5, 5), "p4": (3, 3)}
BOXES = [
    torch.tensor([[8.0, 8.0, 20.0, 24.0], [2.0, 30.0, 9.0, 37.0]]),  # sqrt(wh) ~13.9 and 7
    torch.tensor([[0.0, 0.0, 30.0, 25.0]]),  # sqrt(wh) ~27.4
]


def _ctx(boxes=BOXES):
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    return DistillContext(targets=targets, image_sizes=[(40, 24), (40, 40)])


def _feats(seed, c=4):
    g = torch.Generator().manual_seed(seed)
    return {lvl: torch.randn(N, c, *SIZES[lvl], generator=g) for lvl in LEVELS}


def _covers(box, stride, i, j):
    """Cell (i, j) spans pixels [stride*j, stride*(j+1)) x [stride*i, stride*(i+1)): does the box overlap it?"""
    x0, y0, x1, y1 = box
    return x0 < stride * (j + 1) and x1 > stride * j and y0 < stride * (i + 1) and y1 > stride * i


def _loop_defeat(s, t, boxes, *, canonical=None, fg_w=3.0, bg_w=12.0):
    """Literal DeFeat neck loss; canonical=None puts every box on every level."""
    order = ["p3", "p4"]
    fg_sum = bg_sum = 0.0
    for index, lvl in enumerate(order):
        stride, (h, w) = LEVELS[lvl].stride, SIZES[lvl]
        sl, tl = s[lvl].tolist(), t[lvl].tolist()
        c = len(sl[0])
        fg = bg = n_fg = n_bg = 0.0
        for n in range(N):
            mine = []
            for box in boxes[n].tolist():
                if canonical is not None:
                    scale = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
                    if min(max(math.floor(math.log2(scale / canonical)), 0), len(order) - 1) != index:
                        continue
                mine.append(box)
            for i in range(h):
                for j in range(w):
                    sq = sum((sl[n][ch][i][j] - tl[n][ch][i][j]) ** 2 for ch in range(c))
                    if any(_covers(b, stride, i, j) for b in mine):
                        fg, n_fg = fg + sq, n_fg + 1
                    else:
                        bg, n_bg = bg + sq, n_bg + 1
        fg_sum += fg / max(1.0, 2 * n_fg * c)
        bg_sum += bg / max(1.0, 2 * n_bg * c)
    return fg_w * fg_sum / len(order), bg_w * bg_sum / len(order)


def test_registered():
    assert METHODS.get("defeat") is DeFeat


def test_assign_box_levels_reference_rule():
    sizes = torch.tensor([10.0, 111.0, 113.0, 230.0, 500.0, 4000.0])
    boxes = torch.stack([torch.zeros(6), torch.zeros(6), sizes, sizes], dim=1)
    assert assign_box_levels(boxes, 5).tolist() == [0, 0, 1, 2, 3, 4]
    assert assign_box_levels(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), 5).tolist() == [0]  # empty box: no log2(0)


def test_golden_value_per_level_assignment():
    m = DeFeat(levels=LEVELS, adapter_init="identity", canonical_scale=8.0)  # boxes split: p3 gets 2, p4 gets 1
    s, t = _feats(1), _feats(2)
    out = m(s, TeacherKnowledge(features=t), _ctx())
    assert set(out) == {"defeat.fg", "defeat.bg"}
    fg, bg = _loop_defeat(s, t, BOXES, canonical=8.0)
    torch.testing.assert_close(out["defeat.fg"], torch.tensor(fg), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["defeat.bg"], torch.tensor(bg), rtol=1e-5, atol=0)


def test_golden_value_reference_adapter_and_all_levels():
    torch.manual_seed(0)
    m = DeFeat(levels=LEVELS, level_assignment="all", fg_weight=1.0, bg_weight=2.0)
    s, t = _feats(1), _feats(2)
    with torch.no_grad():  # the default 3x3 adapter with the reference's tiny init
        a = {lvl: m.adapters[lvl](s[lvl]) for lvl in LEVELS}
    out = m(s, TeacherKnowledge(features=t), _ctx())
    fg, bg = _loop_defeat(a, t, BOXES, canonical=None, fg_w=1.0, bg_w=2.0)
    torch.testing.assert_close(out["defeat.fg"], torch.tensor(fg), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["defeat.bg"], torch.tensor(bg), rtol=1e-5, atol=0)
    by_scale = DeFeat(levels=LEVELS, fg_weight=1.0, bg_weight=2.0)
    by_scale.load_state_dict(m.state_dict())
    assert by_scale(s, TeacherKnowledge(features=t), _ctx())["defeat.fg"].item() != pytest.approx(fg)


def test_level_order_does_not_matter():
    s, t = _feats(1), _feats(2)
    a = DeFeat(levels=LEVELS, adapter_init="identity", canonical_scale=8.0)
    b = DeFeat(levels=dict(reversed(list(LEVELS.items()))), adapter_init="identity", canonical_scale=8.0)
    b.load_state_dict(a.state_dict())
    for key, value in a(s, TeacherKnowledge(features=t), _ctx()).items():
        torch.testing.assert_close(b(s, TeacherKnowledge(features=t), _ctx())[key], value)


def test_zero_when_equal_positive_otherwise():
    m = DeFeat(levels=LEVELS, adapter_init="identity")
    t = _feats(2)
    out = m({k: v.clone() for k, v in t.items()}, TeacherKnowledge(features=t), _ctx())
    assert all(v.item() == 0.0 for v in out.values())
    out = m(_feats(1), TeacherKnowledge(features=t), _ctx())
    assert all(v.item() > 0.0 for v in out.values())


def test_gradients_reach_student_and_adapter_never_teacher():
    m = DeFeat(levels=LEVELS)
    s = {k: v.requires_grad_(True) for k, v in _feats(1, c=4).items()}
    t = {k: v.requires_grad_(True) for k, v in _feats(2).items()}
    sum(m(s, TeacherKnowledge(features=t), _ctx()).values()).backward()
    for lvl in LEVELS:
        assert s[lvl].grad.abs().sum() > 0
        assert m.adapters[lvl].weight.grad.abs().sum() > 0
        assert t[lvl].grad is None


def test_channel_group_two_equals_explicit_reshape_max():
    m = DeFeat(levels=LEVELS, adapter="identity", canonical_scale=8.0)
    s, t_full = _feats(1), _feats(2)
    t = {k: v.reshape(N, 2, 2, *SIZES[k]).amax(dim=2) for k, v in t_full.items()}
    pooled = {k: v.reshape(N, 2, 2, *SIZES[k]).amax(dim=2) for k, v in s.items()}
    out = m(s, TeacherKnowledge(features=t, channel_group=2), _ctx())
    fg, bg = _loop_defeat(pooled, t, BOXES, canonical=8.0)
    torch.testing.assert_close(out["defeat.fg"], torch.tensor(fg), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["defeat.bg"], torch.tensor(bg), rtol=1e-5, atol=0)


def test_boxes_on_padded_canvas_use_stride_not_image_width():
    # Image 0 is 24 px wide on a 40 px canvas. box / stride: x in [8, 20) -> cells 1, 2.
    # The padded-width pitfall (x / img_w * W = x / 24 * 5) would give cells 1..4.
    mask = box_masks([BOXES[0][:1], torch.zeros(0, 4)], 8, 5, 5)
    expected = torch.zeros(2, 5, 5)
    expected[0, 1:3, 1:3] = 1.0
    torch.testing.assert_close(mask, expected)
    pitfall = torch.zeros(5, 5)
    x0, x1 = math.floor(8 / 24 * 5), math.ceil(20 / 24 * 5)
    pitfall[1:3, x0:x1] = 1.0
    assert not torch.equal(mask[0], pitfall)


def test_no_boxes_is_all_background_and_missing_boxes_refused():
    m = DeFeat(levels=LEVELS, adapter_init="identity")
    s, t = _feats(1), _feats(2)
    out = m(s, TeacherKnowledge(features=t), _ctx([torch.zeros(0, 4)] * N))
    assert out["defeat.fg"].item() == 0.0
    fg, bg = _loop_defeat(s, t, [torch.zeros(0, 4)] * N, canonical=56.0)
    torch.testing.assert_close(out["defeat.bg"], torch.tensor(bg), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="boxes"):
        m(s, TeacherKnowledge(features=t), DistillContext(targets=[{}] * N, image_sizes=[(40, 40)] * N))
    with pytest.raises(ValueError, match="level_assignment"):
        DeFeat(levels=LEVELS, level_assignment="nearest")
