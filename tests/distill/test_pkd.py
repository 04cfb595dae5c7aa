import math

import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.pkd import PKD
from detkd.knowledge import SparseCells, TeacherKnowledge

N, H, W = 2, 5, 5


def _ctx():
    return DistillContext(targets=[{"boxes": torch.zeros(0, 4)}] * N, image_sizes=[(40, 40)] * N)


def _cells(teacher, k=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(N * H * W, generator=g)[:k]
    b, rest = flat // (H * W), flat % (H * W)
    yx = torch.stack([rest // W, rest % W], 1)
    return SparseCells(b, yx, teacher[b, :, yx[:, 0], yx[:, 1]])


def _loop_pkd(s_rows, t_rows, eps=1e-6):
    """s_rows, t_rows: python lists [M][C]. Per channel: standardise over M (unbiased std + eps), MSE / 2."""
    m, c = len(s_rows), len(s_rows[0])

    def norm(rows, ch):
        col = [rows[r][ch] for r in range(m)]
        mu = sum(col) / m
        sd = math.sqrt(sum((v - mu) ** 2 for v in col) / (m - 1))
        return [(v - mu) / (sd + eps) for v in col]

    total = 0.0
    for ch in range(c):
        ns, nt = norm(s_rows, ch), norm(t_rows, ch)
        total += sum((a - b) ** 2 for a, b in zip(ns, nt, strict=True))
    return total / (m * c) / 2


def _rows(x):
    x = x.tolist()
    return [[x[n][ch][i][j] for ch in range(len(x[0]))] for n in range(N) for i in range(H) for j in range(W)]


def test_registered():
    assert METHODS.get("pkd") is PKD


def test_golden_value_identity_and_conv_adapter():
    torch.manual_seed(0)
    s, t = torch.randn(N, 4, H, W) * 3 + 1, torch.randn(N, 4, H, W)
    m = PKD(levels={"p3": LevelSpec(4, 4, 8)})  # default weight 10, no adapter for equal widths
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["pkd.p3"]
    torch.testing.assert_close(got, torch.tensor(10 * _loop_pkd(_rows(s), _rows(t))), rtol=1e-5, atol=0)

    m = PKD(levels={"p3": LevelSpec(3, 4, 8)}, weight=6.0)
    s3 = torch.randn(N, 3, H, W)
    w, b = m.adapters["p3"].weight.flatten(1).tolist(), m.adapters["p3"].bias.tolist()
    x = s3.tolist()
    adapted = [
        [
            [[sum(w[c][k] * x[n][k][i][j] for k in range(3)) + b[c] for j in range(W)] for i in range(H)]
            for c in range(4)
        ]
        for n in range(N)
    ]
    got = m({"p3": s3}, TeacherKnowledge(features={"p3": t}), _ctx())["pkd.p3"]
    torch.testing.assert_close(
        got, torch.tensor(6 * _loop_pkd(_rows(torch.tensor(adapted)), _rows(t))), rtol=1e-5, atol=0
    )


def test_zero_when_equal_positive_otherwise_and_affine_invariant():
    torch.manual_seed(0)
    m = PKD(levels={"p3": LevelSpec(4, 4, 8)})
    s, t = torch.randn(N, 4, H, W), torch.randn(N, 4, H, W)
    same = m({"p3": t.clone()}, TeacherKnowledge(features={"p3": t}), _ctx())["pkd.p3"].item()
    assert abs(same) < 1e-10
    base = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["pkd.p3"]
    assert base.item() > 0
    scale = torch.tensor([0.5, 2.0, 7.0, 1.5]).view(1, 4, 1, 1)
    shift = torch.tensor([3.0, -1.0, 0.0, 10.0]).view(1, 4, 1, 1)
    moved = m({"p3": s}, TeacherKnowledge(features={"p3": t * scale + shift}), _ctx())["pkd.p3"]
    torch.testing.assert_close(moved, base, rtol=1e-4, atol=0)


def test_gradients_reach_student_and_adapter_never_teacher():
    torch.manual_seed(0)
    m = PKD(levels={"p3": LevelSpec(3, 4, 8)})
    s = torch.randn(N, 3, H, W, requires_grad=True)
    t = torch.randn(N, 4, H, W, requires_grad=True)
    m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["pkd.p3"].backward()
    assert s.grad.abs().sum() > 0 and m.adapters["p3"].weight.grad.abs().sum() > 0
    assert t.grad is None
    s.grad = None
    m({"p3": s}, TeacherKnowledge(cells={"p3": _cells(t)}), _ctx())["pkd.p3"].backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("student_channels", [4, 3])
def test_sparse_equals_dense_restricted_to_cells(student_channels):
    torch.manual_seed(0)
    m = PKD(levels={"p3": LevelSpec(student_channels, 4, 8)})
    s, t = torch.randn(N, student_channels, H, W), torch.randn(N, 4, H, W)
    cells = _cells(t)
    got = m({"p3": s}, TeacherKnowledge(cells={"p3": cells}), _ctx())["pkd.p3"]
    with torch.no_grad():
        a = m.adapters["p3"](s)
    picks = list(zip(cells.batch_index.tolist(), cells.yx.tolist(), strict=True))
    s_rows = [[float(a[b, c, y, x]) for c in range(4)] for b, (y, x) in picks]
    t_rows = [[float(t[b, c, y, x]) for c in range(4)] for b, (y, x) in picks]
    torch.testing.assert_close(got, torch.tensor(10 * _loop_pkd(s_rows, t_rows)), rtol=1e-5, atol=0)


def test_channel_group_two_equals_explicit_reshape_max():
    torch.manual_seed(0)
    m = PKD(levels={"p3": LevelSpec(4, 4, 8)})
    s = torch.randn(N, 4, H, W)
    t = torch.randn(N, 4, H, W).reshape(N, 2, 2, H, W).amax(dim=2)
    pooled = s.reshape(N, 2, 2, H, W).amax(dim=2)
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}, channel_group=2), _ctx())["pkd.p3"]
    torch.testing.assert_close(got, torch.tensor(10 * _loop_pkd(_rows(pooled), _rows(t))), rtol=1e-5, atol=0)


def test_fewer_than_two_cells_is_zero():
    m = PKD(levels={"p3": LevelSpec(4, 4, 8)})
    t = torch.randn(N, 4, H, W)
    loss = m({"p3": torch.randn(N, 4, H, W)}, TeacherKnowledge(cells={"p3": _cells(t, k=1)}), _ctx())["pkd.p3"]
    assert loss.item() == 0.0
