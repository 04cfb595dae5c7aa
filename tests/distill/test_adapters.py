import pytest
import torch
from torch import nn

from detkd.distill.adapters import LevelAdapters, build_adapter, graph_zero, teacher_cells, teacher_feature
from detkd.distill.base import LevelSpec
from detkd.knowledge import SparseCells, TeacherKnowledge, gather_cells


def _cells(n=2, h=5, w=5, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n * h * w, generator=g)[:k]
    b, rest = flat // (h * w), flat % (h * w)
    return SparseCells(batch_index=b, yx=torch.stack([rest // w, rest % w], dim=1), values=torch.zeros(k, 1))


@pytest.mark.parametrize("kind,k", [("conv1x1", 1), ("conv3x3", 3)])
def test_build_adapter_shapes(kind, k):
    a = build_adapter(3, 4, kind=kind)
    assert isinstance(a, nn.Conv2d) and a.kernel_size == (k, k)
    assert a(torch.randn(2, 3, 5, 6)).shape == (2, 4, 5, 6)


def test_identity_kind_needs_equal_channels():
    assert isinstance(build_adapter(4, 4, kind="identity"), nn.Identity)
    with pytest.raises(ValueError, match="equal channels"):
        build_adapter(3, 4, kind="identity")


def test_unknown_kind_or_init():
    with pytest.raises(ValueError, match="kind"):
        build_adapter(4, 4, kind="mlp")
    with pytest.raises(ValueError, match="init"):
        build_adapter(4, 4, init="xavier")


@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3"])
def test_identity_init_is_pass_through(kind):
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(build_adapter(4, 4, kind=kind, init="identity")(x), x)
    wider = build_adapter(3, 4, kind=kind, init="identity")(x[:, :3])
    torch.testing.assert_close(wider[:, :3], x[:, :3])
    assert torch.all(wider[:, 3] == 0)


def test_small_normal_init_is_truncated_and_tiny():
    torch.manual_seed(0)
    w = build_adapter(64, 64, kind="conv3x3", init="small_normal").weight
    assert w.abs().max() <= 2e-4
    assert 0.5e-4 < w.std() < 1.2e-4


def test_level_adapters_auto_and_names():
    levels = {"p3": LevelSpec(4, 4, 8), "p4": LevelSpec(3, 4, 16)}
    a = LevelAdapters(levels, kind="auto")
    assert isinstance(a["p3"], nn.Identity)
    assert isinstance(a["p4"], nn.Conv2d) and a["p4"].kernel_size == (1, 1)
    with pytest.raises(ValueError, match="level name"):
        LevelAdapters({"a.b": LevelSpec(4, 4, 8)})


def test_adapt_applies_channel_group_max():
    x = torch.randn(2, 4, 5, 5)
    a = LevelAdapters({"p3": LevelSpec(4, 4, 8)}, kind="identity")
    expected = torch.stack([torch.maximum(x[:, 0], x[:, 1]), torch.maximum(x[:, 2], x[:, 3])], dim=1)
    torch.testing.assert_close(a.adapt("p3", x, TeacherKnowledge(channel_group=2)), expected)


@pytest.mark.parametrize("kind", ["identity", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("group", [1, 2])
def test_adapt_cells_equals_gathered_dense(kind, group):
    torch.manual_seed(0)
    a = LevelAdapters({"p3": LevelSpec(4, 4, 8)}, kind=kind)
    x = torch.randn(2, 4, 5, 5)
    cells = _cells()
    dense = gather_cells(a.adapt("p3", x, TeacherKnowledge(channel_group=group)), cells)
    torch.testing.assert_close(a.adapt_cells("p3", x, cells, channel_group=group), dense, rtol=1e-5, atol=1e-6)


def test_teacher_accessors_detach_and_explain():
    t = torch.randn(2, 4, 5, 5, requires_grad=True)
    got = teacher_feature(TeacherKnowledge(features={"p3": t}), "p3", method="m")
    assert not got.requires_grad and got.dtype == torch.float32
    with pytest.raises(ValueError, match="only sparse cells"):
        teacher_feature(TeacherKnowledge(cells={"p3": _cells()}), "p3", method="m")
    with pytest.raises(ValueError, match="no features for level"):
        teacher_feature(TeacherKnowledge(features={"p3": t}), "p4", method="m")
    c = _cells()
    c.values.requires_grad_(True)
    assert not teacher_cells(TeacherKnowledge(cells={"p3": c}), "p3", method="m").values.requires_grad
    with pytest.raises(ValueError, match="no sparse cells"):
        teacher_cells(TeacherKnowledge(features={"p3": t}), "p3", method="m")


def test_graph_zero_keeps_graph():
    x = torch.randn(3, requires_grad=True)
    z = graph_zero(x)
    assert float(z.detach()) == 0.0
    z.backward()
    assert x.grad is not None and torch.all(x.grad == 0)
