import pytest
import torch

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.mgd import MGD, random_cell_mask
from detkd.knowledge import TeacherKnowledge

N, C, H, W = 2, 2, 4, 5


def _ctx():
    return DistillContext(targets=[{"boxes": torch.zeros(0, 4)}] * N, image_sizes=[(32, 40)] * N)


def _loop_conv3x3(x, weight, bias):
    """Zero-padded 3x3 convolution, one output value at a time, on nested lists."""
    n_, cin, h_, w_ = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    cout = len(weight)
    out = [[[[bias[o] for _ in range(w_)] for _ in range(h_)] for o in range(cout)] for _ in range(n_)]
    for n in range(n_):
        for o in range(cout):
            for i in range(h_):
                for j in range(w_):
                    for k in range(cin):
                        for di in range(3):
                            for dj in range(3):
                                y, z = i + di - 1, j + dj - 1
                                if 0 <= y < h_ and 0 <= z < w_:
                                    out[n][o][i][j] += weight[o][k][di][dj] * x[n][k][y][z]
    return out


def _loop_mgd(s, t, m: MGD, alpha):
    """alpha * sum (G(S) - T)^2 / N with nothing masked and the identity alignment (equal widths)."""
    g1, g2 = m.generators["p3"][0], m.generators["p3"][2]
    hidden = _loop_conv3x3(s.tolist(), g1.weight.tolist(), g1.bias.tolist())
    hidden = [[[[max(v, 0.0) for v in row] for row in ch] for ch in img] for img in hidden]
    gen = _loop_conv3x3(hidden, g2.weight.tolist(), g2.bias.tolist())
    tl = t.tolist()
    total = sum(
        (gen[n][c][i][j] - tl[n][c][i][j]) ** 2 for n in range(N) for c in range(C) for i in range(H) for j in range(W)
    )
    return alpha * total / N


def test_registered():
    assert METHODS.get("mgd") is MGD


def test_golden_value_without_masking():
    torch.manual_seed(0)
    m = MGD(levels={"p3": LevelSpec(C, C, 8)}, alpha=0.5, mask_ratio=0.0)
    s, t = torch.randn(N, C, H, W), torch.randn(N, C, H, W)
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["mgd.p3"]
    torch.testing.assert_close(got, torch.tensor(_loop_mgd(s, t, m, 0.5)), rtol=1e-5, atol=0)


def test_everything_masked_leaves_only_the_generators_biases():
    torch.manual_seed(0)
    m = MGD(levels={"p3": LevelSpec(C, C, 8)}, mask_ratio=1.0)  # default alpha 2e-5
    for conv in (m.generators["p3"][0], m.generators["p3"][2]):
        torch.nn.init.zeros_(conv.bias)
    s, t = torch.randn(N, C, H, W), torch.randn(N, C, H, W)
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}), _ctx())["mgd.p3"]
    # G(0) = 0 with zero biases, so the loss is alpha * sum T^2 / N, whatever the student says.
    expected = 2e-5 * sum(v * v for v in t.flatten().tolist()) / N
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=0)


def test_mask_drops_cells_with_the_ratio_and_all_channels_together():
    torch.manual_seed(0)
    like = torch.zeros(1)
    mask = random_cell_mask(64, 32, 32, 0.65, like=like)
    assert mask.shape == (64, 1, 32, 32)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(float(1 - mask.mean()) - 0.65) < 0.01  # 65,536 cells: sd of the fraction ~0.002
    assert float(random_cell_mask(4, 8, 8, 0.0, like=like).min()) == 1.0
    assert float(random_cell_mask(4, 8, 8, 1.0, like=like).max()) == 0.0


def test_alignment_where_widths_differ_and_channel_pooled_teacher():
    torch.manual_seed(0)
    m = MGD(levels={"p3": LevelSpec(3, 4, 8)}, mask_ratio=0.0, alpha=1.0)
    assert isinstance(m.adapters["p3"], torch.nn.Conv2d)
    s, t = torch.randn(N, 3, H, W), torch.randn(N, 2, H, W)
    got = m({"p3": s}, TeacherKnowledge(features={"p3": t}, channel_group=2), _ctx())["mgd.p3"]
    gen = m.generators["p3"](m.adapters["p3"](s)).reshape(N, 2, 2, H, W).amax(dim=2)
    torch.testing.assert_close(got, (gen - t).pow(2).sum() / N)


def test_gradients_reach_student_alignment_and_generator():
    torch.manual_seed(0)
    m = MGD(levels={"p3": LevelSpec(3, 4, 8)})
    s = torch.randn(N, 3, H, W, requires_grad=True)
    loss = m({"p3": s}, TeacherKnowledge(features={"p3": torch.randn(N, 4, H, W)}), _ctx())["mgd.p3"]
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    for p in m.parameters():
        assert p.grad is not None


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_refuses_a_mask_ratio_outside_0_1(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        MGD(levels={"p3": LevelSpec(C, C, 8)}, mask_ratio=ratio)
