import math

import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.cwd import CWD
from detkd.knowledge import SparseCells, TeacherKnowledge

N, H, W = 2, 5, 5


def _ctx():
    return DistillContext(targets=[{"boxes": torch.zeros(0, 4)}] * N, image_sizes=[(40, 40)] * N)


def _loop_cwd(s, t, tau):
    """tau^2 / (N C) * sum_{n,c} sum_ij p_t (log p_t - log p_s), softmax over the H*W positions of each channel."""
    s, t = s.tolist(), t.tolist()
    n_, c_ = len(s), len(s[0])
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            vs = [s[n][c][i][j] / tau for i in range(H) for j in range(W)]
            vt = [t[n][c][i][j] / tau for i in range(H) for j in range(W)]
            zs = math.log(sum(math.exp(v) for v in vs))
            zt = math.log(sum(math.exp(v) for v in vt))
            for a, b in zip(vs, vt, strict=True):
                total += math.exp(b - zt) * ((b - zt) - (a - zs))
    return tau**2 * total / (n_ * c_)


def test_registered():
    assert METHODS.get("cwd") is CWD


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_golden_value(tau):
    torch.manual_seed(0)
    s, t = torch.randn(N, 4, H, W), torch.randn(N, 4, H, W) * 2
    m = CWD(levels={"p3": LevelSpec(4, 4, 8)}, tau=tau)  # default weight 10
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["cwd.p3"]
    torch.testing.assert_close(got, torch.tensor(10 * _loop_cwd(s, t, tau)), rtol=1e-5, atol=0)


def test_golden_value_with_adapter_when_channels_differ():
    torch.manual_seed(0)
    m = CWD(levels={"p3": LevelSpec(3, 4, 8)}, weight=1.0)
    s, t = torch.randn(N, 3, H, W), torch.randn(N, 4, H, W)
    w, b, x = m.adapters["p3"].weight.flatten(1).tolist(), m.adapters["p3"].bias.tolist(), s.tolist()
    adapted = torch.tensor(
        [
            [
                [[sum(w[c][k] * x[n][k][i][j] for k in range(3)) + b[c] for j in range(W)] for i in range(H)]
                for c in range(4)
            ]
            for n in range(N)
        ]
    )
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["cwd.p3"]
    torch.testing.assert_close(got, torch.tensor(_loop_cwd(adapted, t, 1.0)), rtol=1e-5, atol=0)


def test_zero_when_equal_positive_otherwise_and_shift_invariant():
    torch.manual_seed(0)
    m = CWD(levels={"p3": LevelSpec(4, 4, 8)})
    s, t = torch.randn(N, 4, H, W), torch.randn(N, 4, H, W)
    assert abs(m({"p3": t.clone()}, TeacherKnowledge(features={"p3": t}), _ctx())["cwd.p3"].item()) < 1e-6
    base = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["cwd.p3"]
    assert base.item() > 0
    shift = torch.tensor([3.0, -1.0, 0.5, 10.0]).view(1, 4, 1, 1)
    moved = m({"p3": s - shift}, TeacherKnowledge(features={"p3": t + shift}), _ctx())["cwd.p3"]
    torch.testing.assert_close(moved, base, rtol=1e-5, atol=1e-7)


def test_gradients_reach_student_and_adapter_never_teacher():
    torch.manual_seed(0)
    m = CWD(levels={"p3": LevelSpec(3, 4, 8)})
    s = torch.randn(N, 3, H, W, requires_grad=True)
    t = torch.randn(N, 4, H, W, requires_grad=True)
    m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["cwd.p3"].backward()
    assert s.grad.abs().sum() > 0 and m.adapters["p3"].weight.grad.abs().sum() > 0
    assert t.grad is None


def test_channel_group_two_equals_explicit_reshape_max():
    torch.manual_seed(0)
    m = CWD(levels={"p3": LevelSpec(4, 4, 8)})
    s = torch.randn(N, 4, H, W)
    t = torch.randn(N, 4, H, W).reshape(N, 2, 2, H, W).amax(dim=2)
    pooled = s.reshape(N, 2, 2, H, W).amax(dim=2)
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}, channel_group=2), _ctx())["cwd.p3"]
    torch.testing.assert_close(got, torch.tensor(10 * _loop_cwd(pooled, t, 1.0)), rtol=1e-5, atol=0)


def test_fp16_inputs_are_computed_in_fp32():
    torch.manual_seed(0)
    m = CWD(levels={"p3": LevelSpec(4, 4, 8)})
    s, t = torch.randn(N, 4, H, W).half(), torch.randn(N, 4, H, W).half()
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["cwd.p3"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(10 * _loop_cwd(s.float(), t.float(), 1.0)), rtol=1e-5, atol=0)


def test_refuses_sparse_only_teacher_and_bad_tau():
    m = CWD(levels={"p3": LevelSpec(4, 4, 8)})
    cells = SparseCells(torch.zeros(1, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="dense teacher features"):
        m({"p3": torch.randn(N, 4, H, W)}, TeacherKnowledge(cells={"p3": cells}), _ctx())
    with pytest.raises(ValueError, match="tau"):
        CWD(levels={"p3": LevelSpec(4, 4, 8)}, tau=0.0)
