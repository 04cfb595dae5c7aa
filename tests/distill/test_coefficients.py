"""Methods served a lowrank store's coefficient maps unreconstructed (``coefficient_ok``).

The reference is the reconstructed form of the same records: a squared distance over channels
between projected maps equals the distance between their coefficients plus a term that does not
depend on the student, so the gradients must agree and the losses differ by a constant (zero when
no cell is padding).
"""

import pytest
import torch
from torch import nn

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.task import DistillationTask
from detkd.knowledge import ChannelBasis, TeacherKnowledge
from detkd.store.collate import collate_knowledge
from detkd.store.format import LevelRecord

C_STUDENT, C_TEACHER, RANK = 5, 12, 3
LEVELS = {"p3": LevelSpec(C_STUDENT, C_TEACHER, 8), "p4": LevelSpec(C_STUDENT, C_TEACHER, 16)}
SHAPES = {"p3": (6, 7), "p4": (3, 4)}
BOXES = [torch.tensor([[4.0, 4.0, 30.0, 26.0]]), torch.tensor([[10.0, 2.0, 50.0, 40.0], [0.0, 0.0, 12.0, 12.0]])]


def _basis(seed: int) -> ChannelBasis:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(C_TEACHER, C_TEACHER, generator=g, dtype=torch.float64))
    return ChannelBasis(mean=torch.randn(C_TEACHER, generator=g), basis=q[:, :RANK].float().contiguous())


BASES = {"p3": _basis(0), "p4": _basis(1)}


def _records(padded: bool) -> list[dict[str, LevelRecord]]:
    """Two samples' coefficient records; with ``padded`` the second covers less than the canvas."""
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(2):
        rec = {}
        for lv, (h, w) in SHAPES.items():
            hh, ww = (h - 1, w - 2) if padded and i == 1 else (h, w)
            rec[lv] = LevelRecord(coefficients=torch.randn(RANK, hh, ww, generator=g).half())
        out.append(rec)
    return out


def _knowledge(padded: bool, coefficients: bool) -> TeacherKnowledge:
    return collate_knowledge(
        _records(padded), feature_shapes=SHAPES, channel_group=1, bases=BASES, coefficients=coefficients
    )


def _student(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {lv: torch.randn(2, C_STUDENT, h, w, generator=g).requires_grad_() for lv, (h, w) in SHAPES.items()}


def _run(method: nn.Module, knowledge: TeacherKnowledge, student: dict[str, torch.Tensor]):
    """(total loss, grads of the student maps, grads of the method's parameters)."""
    torch.manual_seed(5)  # mgd's random mask: the same draw in both forms
    ctx = DistillContext(
        targets=[{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in BOXES],
        image_sizes=[(48, 56), (40, 40)],
    )
    loss = sum(method(student, knowledge, ctx).values())
    params = [p for p in method.parameters()]
    grads = torch.autograd.grad(loss, list(student.values()) + params)
    return loss.detach(), grads[: len(student)], grads[len(student) :]


def _method(name: str) -> nn.Module:
    torch.manual_seed(3)
    args = {"adapter_init": "default"} if name == "defeat" else {}
    method = METHODS.get(name)(levels=LEVELS, **args)
    with torch.no_grad():  # DeFeat's tiny init would make every difference invisible
        for p in method.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return method.double().float()


CANDIDATES = ["fitnet", "defeat", "mgd"]


@pytest.mark.parametrize("name", CANDIDATES)
def test_coefficient_methods_are_declared(name):
    assert METHODS.get(name).coefficient_ok


@pytest.mark.parametrize("name", ["cwd", "fgd", "gkd", "ssim", "structured", "pkd"])
def test_methods_with_nonlinear_or_per_channel_terms_never_get_coefficients(name):
    assert not METHODS.get(name).coefficient_ok


@pytest.mark.parametrize("name", CANDIDATES)
def test_same_loss_and_gradients_as_reconstructed_maps_without_padding(name):
    method, student = _method(name), _student(7)
    loss_maps, gs_maps, gp_maps = _run(method, _knowledge(False, False), student)
    loss_coef, gs_coef, gp_coef = _run(method, _knowledge(False, True), student)
    torch.testing.assert_close(loss_coef, loss_maps, rtol=1e-5, atol=1e-6)
    for a, b in zip(gs_coef + gp_coef, gs_maps + gp_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", CANDIDATES)
def test_padding_adds_a_constant_and_leaves_gradients_alone(name):
    method = _method(name)
    maps, coef = _knowledge(True, False), _knowledge(True, True)
    gaps = []
    for seed in (7, 8):
        student = _student(seed)
        loss_maps, gs_maps, gp_maps = _run(method, maps, student)
        loss_coef, gs_coef, gp_coef = _run(method, coef, student)
        for a, b in zip(gs_coef + gp_coef, gs_maps + gp_maps, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        gaps.append(float(loss_maps - loss_coef))
    assert gaps[0] > 1e-4  # the padding's distance off the basis' subspace
    assert gaps[0] == pytest.approx(gaps[1], rel=1e-4)


def test_collated_coefficients_reconstruct_to_the_maps_padding_included():
    maps, coef = _knowledge(True, False), _knowledge(True, True)
    assert coef.coefficients and not maps.coefficients
    for lv, basis in BASES.items():
        assert coef.features[lv].shape == (2, RANK, *SHAPES[lv])
        torch.testing.assert_close(basis.reconstruct(coef.features[lv]), basis.project(maps.features[lv]))
        # padding holds the coefficients of zero: what the reconstructed form holds there, projected
        torch.testing.assert_close(coef.features[lv][1, :, -1, -1], -(basis.mean @ basis.basis))


def test_folded_convolution_equals_convolution_then_coefficients():
    knowledge = _knowledge(False, True)
    torch.manual_seed(0)
    for conv in (nn.Conv2d(C_STUDENT, C_TEACHER, 3, padding=1), nn.Conv2d(C_STUDENT, C_TEACHER, 1, bias=False)):
        x = torch.randn(2, C_STUDENT, 6, 7)
        expected = BASES["p3"].coefficients(conv(x))
        torch.testing.assert_close(knowledge.match_conv("p3", conv, x), expected, rtol=1e-5, atol=1e-5)
        assert knowledge.full_channels("p3", RANK) == C_TEACHER
    maps = _knowledge(False, False)
    assert maps.full_channels("p3", C_TEACHER) == C_TEACHER
    conv = nn.Conv2d(C_STUDENT, C_TEACHER, 3, padding=1)
    x = torch.randn(2, C_STUDENT, 6, 7)  # reconstructed form: the folded conv, then the basis
    torch.testing.assert_close(maps.match_conv("p3", conv, x), BASES["p3"].project(conv(x)), rtol=1e-5, atol=1e-5)


def test_task_allows_coefficients_only_when_every_method_does():
    class Source:
        levels, strides, channels = ["p3"], {"p3": 8}, {"p3": C_TEACHER}

    def needs(*names):
        methods = {n: METHODS.get(n)(levels={"p3": LEVELS["p3"]}) for n in names}
        return DistillationTask(nn.Module(), methods=methods, weights={}, teacher=Source(), levels=["p3"]).needs

    assert "coefficients" in needs("defeat", "fitnet")
    assert "coefficients" not in needs("defeat", "cwd")
