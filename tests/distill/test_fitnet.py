import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec, describe_methods
from detkd.distill.fitnet import FitNet
from detkd.knowledge import SparseCells, TeacherKnowledge

N, H, W = 2, 5, 5


def _ctx():
    return DistillContext(targets=[{"boxes": torch.zeros(0, 4)}] * N, image_sizes=[(40, 40)] * N)


def _cells(k=7, seed=1, c=4, score=True):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(N * H * W, generator=g)[:k]
    b, rest = flat // (H * W), flat % (H * W)
    s = torch.rand(k, generator=g) + 0.1 if score else None
    return SparseCells(batch_index=b, yx=torch.stack([rest // W, rest % W], 1), values=torch.zeros(k, c), score=s)


def _with_values(cells, teacher):
    values = teacher[cells.batch_index, :, cells.yx[:, 0], cells.yx[:, 1]]
    return SparseCells(cells.batch_index, cells.yx, values, cells.score)


def _loop_adapt(weight, bias, s):
    """Literal 1x1 conv: a[n][c][i][j] = sum_k w[c][k] s[n][k][i][j] + b[c]."""
    w, b, x = weight.flatten(1).tolist(), bias.tolist(), s.tolist()
    cout, cin = len(w), len(w[0])
    return [
        [
            [[sum(w[c][k] * x[n][k][i][j] for k in range(cin)) + b[c] for j in range(W)] for i in range(H)]
            for c in range(cout)
        ]
        for n in range(N)
    ]


def test_registered_with_one_line_description():
    assert METHODS.get("fitnet") is FitNet
    assert dict(describe_methods())["fitnet"].startswith("FitNet hint loss")


def test_dense_golden_value():
    torch.manual_seed(0)
    m = FitNet(levels={"p3": LevelSpec(3, 4, 8)}, weight=2.5)
    s, t = torch.randn(N, 3, H, W), torch.randn(N, 4, H, W)
    out = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())
    assert set(out) == {"fitnet.p3"}
    a, tt = _loop_adapt(m.adapters["p3"].weight, m.adapters["p3"].bias, s), t.tolist()
    total = 0.0
    for n in range(N):
        for c in range(4):
            for i in range(H):
                for j in range(W):
                    total += (a[n][c][i][j] - tt[n][c][i][j]) ** 2
    expected = 2.5 * total / (N * 4 * H * W)
    torch.testing.assert_close(out["fitnet.p3"], torch.tensor(expected), rtol=1e-5, atol=0)


def test_zero_when_equal_positive_otherwise():
    m = FitNet(levels={"p3": LevelSpec(4, 4, 8)}, adapter_init="identity")
    t = torch.randn(N, 4, H, W)
    assert m({"p3": t.clone()}, TeacherKnowledge(features={"p3": t}), _ctx())["fitnet.p3"].item() == 0.0
    assert m({"p3": t + 0.1}, TeacherKnowledge(features={"p3": t}), _ctx())["fitnet.p3"].item() > 0.0


@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_reach_student_and_adapter_never_teacher(sparse):
    torch.manual_seed(0)
    m = FitNet(levels={"p3": LevelSpec(3, 4, 8)})
    s = torch.randn(N, 3, H, W, requires_grad=True)
    t = torch.randn(N, 4, H, W, requires_grad=True)
    if sparse:
        cells = _with_values(_cells(), t)  # values keep the teacher's graph: the method must cut it
        know = TeacherKnowledge(cells={"p3": cells})
    else:
        know = TeacherKnowledge(features={"p3": t})
    sum(m({"p3": s}, know, _ctx()).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert m.adapters["p3"].weight.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("adapter", ["conv1x1", "conv3x3"])
@pytest.mark.parametrize("use_score", [False, True])
def test_sparse_equals_dense_restricted_to_cells(adapter, use_score):
    torch.manual_seed(0)
    m = FitNet(levels={"p3": LevelSpec(3, 4, 8)}, adapter=adapter, use_cell_score=use_score)
    s, t = torch.randn(N, 3, H, W), torch.randn(N, 4, H, W)
    cells = _with_values(_cells(), t)
    got = m({"p3": s}, TeacherKnowledge(cells={"p3": cells}), _ctx())["fitnet.p3"]
    with torch.no_grad():
        err = (m.adapters["p3"](s) - t).pow(2).mean(dim=1)  # dense per-cell error [N, H, W]
    per_cell = [float(err[b, y, x]) for b, (y, x) in zip(cells.batch_index.tolist(), cells.yx.tolist(), strict=True)]
    w = cells.score.tolist() if use_score else [1.0] * len(per_cell)
    expected = sum(e * wi for e, wi in zip(per_cell, w, strict=True)) / sum(w)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=0)


def test_channel_group_two_equals_explicit_reshape_max():
    torch.manual_seed(0)
    m = FitNet(levels={"p3": LevelSpec(4, 4, 8)}, adapter="identity")
    s, t_full = torch.randn(N, 4, H, W), torch.randn(N, 4, H, W)
    t = t_full.reshape(N, 2, 2, H, W).amax(dim=2)
    pooled = s.reshape(N, 2, 2, H, W).amax(dim=2)
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}, channel_group=2), _ctx())["fitnet.p3"]
    torch.testing.assert_close(got, (pooled - t).pow(2).mean(), rtol=1e-5, atol=0)
    cells = _with_values(_cells(c=2), t)
    sparse = m({"p3": s}, TeacherKnowledge(cells={"p3": cells}, channel_group=2), _ctx())["fitnet.p3"]
    expected = (_with_values(cells, pooled).values - cells.values).pow(2).mean()
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=0)


def test_no_cells_gives_connected_zero():
    m = FitNet(levels={"p3": LevelSpec(3, 4, 8)})
    empty = SparseCells(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 4))
    loss = m({"p3": torch.randn(N, 3, H, W)}, TeacherKnowledge(cells={"p3": empty}), _ctx())["fitnet.p3"]
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert m.adapters["p3"].weight.grad is not None


def test_cell_score_requested_but_missing():
    m = FitNet(levels={"p3": LevelSpec(4, 4, 8)}, use_cell_score=True)
    cells = _with_values(_cells(score=False), torch.randn(N, 4, H, W))
    with pytest.raises(ValueError, match="no cell scores"):
        m({"p3": torch.randn(N, 4, H, W)}, TeacherKnowledge(cells={"p3": cells}), _ctx())


def test_one_term_per_level():
    m = FitNet(levels={"p3": LevelSpec(4, 4, 8), "p4": LevelSpec(4, 4, 16)})
    know = TeacherKnowledge(features={"p3": torch.randn(N, 4, H, W), "p4": torch.randn(N, 4, 3, 3)})
    out = m({"p3": torch.randn(N, 4, H, W), "p4": torch.randn(N, 4, 3, 3)}, know, _ctx())
    assert set(out) == {"fitnet.p3", "fitnet.p4"}
