"""The auto weight rule: arithmetic, invariance across scales, state, and its place in the task."""

import math

import pytest
import torch

import detkd.distill  # noqa: F401  (registers every method)
from detkd.distill.balance import GradientBalance, feature_grad_norm
from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.task import build_method
from detkd.knowledge import TeacherKnowledge

LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)
# (canvas px, student channels, teacher channels, batch): the CPU benchmark's scale and a paper-like one.
SCALES = {"bench": (128, 64, 128, 4), "paper": (640, 256, 256, 2)}


def _problem(scale: str, seed: int = 0):
    canvas, cs, ct, n = SCALES[scale]
    g = torch.Generator().manual_seed(seed)
    levels = {lvl: LevelSpec(cs, ct, s) for lvl, s in zip(LEVELS, STRIDES, strict=True)}
    sizes = {lvl: max(1, canvas // s) for lvl, s in zip(LEVELS, STRIDES, strict=True)}
    student = {lvl: torch.randn(n, cs, h, h, generator=g).requires_grad_(True) for lvl, h in sizes.items()}
    feats = {lvl: torch.randn(n, ct, h, h, generator=g) for lvl, h in sizes.items()}
    knowledge = TeacherKnowledge(
        features=feats,
        importance={lvl: torch.rand(n, 1, h, h, generator=g) for lvl, h in sizes.items()},
        channel_importance={lvl: torch.rand(n, ct, generator=g) for lvl in sizes},
    )
    boxes = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * canvas * 0.6
        wh = 8 + torch.rand(3, 2, generator=g) * canvas * 0.3
        boxes.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": torch.ones(3, dtype=torch.int64)})
    ctx = DistillContext(targets=boxes, image_sizes=[(canvas, canvas)] * n)
    # A stand-in detection loss: a fixed random 1x1 "head" per level, mean-reduced like a real one.
    heads = {lvl: torch.randn(4, cs, generator=g) / math.sqrt(cs) for lvl in sizes}
    det = sum(torch.einsum("kc,nchw->nkhw", heads[lvl], student[lvl]).tanh().pow(2).mean() for lvl in sizes)
    return levels, student, knowledge, ctx, det


def _weighted_ratio(name: str, scale: str, weight: float | str, measure: str = "grad") -> float:
    """The weighted method's push on the student's features over the detection loss's: gradient
    norms (``measure="grad"``) or loss values (``"loss"``)."""
    torch.manual_seed(0)  # method parameters (adapters, generators) and MGD's mask
    levels, student, knowledge, ctx, det = _problem(scale)
    method = build_method(name, levels=levels, args={})
    torch.manual_seed(1)
    loss = sum(method(student, knowledge, ctx).values())
    feats = list(student.values())
    balance = GradientBalance({name: weight}, ratio=0.5, steps=1, measure=measure)
    if weight == "auto":
        balance.observe(det, {name: loss}, feats)
    if measure == "loss":
        return balance.weight(name) * float(loss.detach()) / float(det.detach())
    return feature_grad_norm(balance.weight(name) * loss, feats) / feature_grad_norm(det, feats)


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_auto_weight_gives_the_same_gradient_ratio_at_any_scale(name):
    """At paper weights the push on the student's features depends on the scale; auto fixes it at 0.5."""
    auto = {scale: _weighted_ratio(name, scale, "auto") for scale in SCALES}
    for scale, ratio in auto.items():
        assert ratio == pytest.approx(0.5, rel=1e-4), (scale, ratio)


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_default_auto_rule_gives_the_same_loss_ratio_at_any_scale(name):
    """The default measure ("loss") fixes the weighted method loss at ratio x the detection loss."""
    auto = {scale: _weighted_ratio(name, scale, "auto", measure="loss") for scale in SCALES}
    for scale, ratio in auto.items():
        assert ratio == pytest.approx(0.5, rel=1e-5), (scale, ratio)
    paper = {scale: _weighted_ratio(name, scale, "paper", measure="loss") for scale in SCALES}
    assert any(abs(r - 0.5) > 0.05 for r in paper.values())  # not satisfied by accident at paper weights


def test_paper_weights_do_depend_on_the_scale():
    """The problem the rule solves is real on these inputs (so the test above can tell the difference)."""
    changed = 0
    for name in METHODS.names():
        bench, paper = (_weighted_ratio(name, scale, "paper") for scale in SCALES)
        changed += max(bench / paper, paper / bench) > 2.0
    assert changed >= 4


def test_feature_grad_norm_equals_the_plain_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    y = torch.randn(5, generator=g, requires_grad=True)
    loss = (x.pow(3).sum() + (2 * y).exp().sum()) * 1e-6
    gx, gy = torch.autograd.grad(loss, [x, y], retain_graph=True)
    expected = math.sqrt(float(gx.pow(2).sum() + gy.pow(2).sum()))
    assert feature_grad_norm(loss, [x, y]) == pytest.approx(expected, rel=1e-5)
    assert feature_grad_norm(torch.zeros((), requires_grad=True) * x.sum(), [x]) == 0.0
    assert feature_grad_norm(torch.tensor(3.0), [x]) == 0.0  # no graph: nothing to balance


def test_fp16_gradients_of_tiny_losses_do_not_underflow():
    x = (30 + torch.rand(64)).requires_grad_(True)
    tiny = (x.half() * 1e-4).sum() * 1e-4  # ~2e-5, fine in fp16; its raw gradient, 1e-8 per element, is not
    (raw,) = torch.autograd.grad(tiny, [x], retain_graph=True)
    assert float(raw.abs().max()) == 0.0  # the failure the unit-scale trick avoids
    assert feature_grad_norm(tiny, [x]) == pytest.approx(1e-8 * math.sqrt(64), rel=2e-2)


def test_calibration_averages_steps_then_freezes():
    b = GradientBalance({"a": "auto", "b": 2.0, "c": "paper"}, ratio=3.0, steps=2, measure="loss")
    assert b.calibrating and b.weight("a") == 1.0  # nothing measured: the paper weight
    assert (b.weight("b"), b.weight("c")) == (2.0, 1.0)
    x = torch.ones(1, requires_grad=True)
    b.observe(torch.tensor(4.0), {"a": torch.tensor(1.0)}, [x])
    assert b.weight("a") == pytest.approx(3.0 * 4.0 / 1.0)
    b.observe(torch.tensor(2.0), {"a": torch.tensor(5.0)}, [x])
    assert not b.calibrating
    assert b.weight("a") == pytest.approx(3.0 * 6.0 / 6.0)  # ratio of sums over the calibration steps
    report = b.report()
    assert report["a"] == {
        "rule": "auto",
        "weight": pytest.approx(3.0),
        "measure": "loss",
        "ratio": 3.0,
        "calibration_steps": 2,
        "frozen": True,
    }
    assert report["b"] == {"rule": "explicit", "weight": 2.0} and report["c"] == {"rule": "paper", "weight": 1.0}


def test_state_round_trip_replays_the_weight():
    b = GradientBalance({"a": "auto"}, ratio=1.0, steps=3, measure="loss")
    b.observe(torch.tensor(1.0), {"a": torch.tensor(4.0)}, [torch.ones(1)])
    c = GradientBalance({"a": "auto"}, ratio=1.0, steps=3, measure="loss")
    c.load_state_dict(b.state_dict())
    assert c.weight("a") == b.weight("a") == 0.25 and c.observed == 1


@pytest.mark.parametrize(
    "kwargs, match", [({"ratio": 0.0}, "ratio"), ({"ratio": math.inf}, "ratio"), ({"steps": 0}, "step")]
)
def test_bad_settings_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientBalance({"a": "auto"}, **kwargs)
    with pytest.raises(ValueError, match="measure"):
        GradientBalance({"a": "auto"}, measure="value")
