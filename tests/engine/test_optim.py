"""Learning-rate schedules against golden values worked out by hand from their definitions.

Definitions (linear warm-up, then cosine or step decay, per iteration; base lr 0.1 here):
  cosine:   lr(it) = base * (1 + cos(pi * min(it, T) / T)) / 2,  T = iters_per_epoch * epochs
  step:     lr(it) = base * gamma ** (number of milestones m with it >= m * iters_per_epoch)
  constant: lr(it) = base
  warm-up:  for it < W the above is multiplied by warmup_factor + (1 - warmup_factor) * it / W.
The expected values below are closed forms at iterations where the cosine is exact (pi/6, pi/4,
pi/3, ...) and products of the warm-up ramp, not numbers read back from the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detkd.engine.optim import build_optimizer, build_scheduler

BASE_LR = 0.1
ROOT2, ROOT3 = math.sqrt(2.0), math.sqrt(3.0)


def _lrs(iterations: int, **schedule) -> list[list[float]]:
    """The lr of every parameter group at iterations 0..iterations-1 (the lr each step trains with)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))  # two groups: decayed, not decayed
    opt = build_optimizer(model, name="sgd", lr=BASE_LR)
    sched = build_scheduler(opt, **schedule)
    seen = []
    for _ in range(iterations):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def _check(seen: list[list[float]], golden: dict[int, float]) -> None:
    for it, factor in golden.items():
        for lr in seen[it]:  # every parameter group follows the same schedule
            assert lr == pytest.approx(BASE_LR * factor, rel=1e-12, abs=1e-15), f"iteration {it}"


def test_cosine_without_warmup():
    # T = 4 iterations x 3 epochs = 12.
    seen = _lrs(15, schedule="cosine", iters_per_epoch=4, epochs=3)
    _check(
        seen,
        {
            0: 1.0,  # cos 0 = 1
            2: 0.5 + ROOT3 / 4,  # cos(pi/6) = sqrt(3)/2
            3: 0.5 + ROOT2 / 4,  # cos(pi/4) = sqrt(2)/2
            4: 0.75,  # cos(pi/3) = 1/2
            6: 0.5,  # cos(pi/2) = 0: half-way
            8: 0.25,  # cos(2pi/3) = -1/2
            9: 0.5 - ROOT2 / 4,  # cos(3pi/4) = -sqrt(2)/2
            11: 0.5 - (math.sqrt(6.0) + ROOT2) / 8,  # cos(11pi/12) = -(sqrt(6) + sqrt(2))/4
            12: 0.0,  # the end of training
            14: 0.0,  # past the end it stays at 0 (does not rise again)
        },
    )
    lrs = [s[0] for s in seen[:13]]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # strictly decreasing to the end


def test_cosine_with_warmup():
    # warm-up over 4 iterations from 0.2: ramp 0.2, 0.4, 0.6, 0.8, then 1.
    seen = _lrs(6, schedule="cosine", iters_per_epoch=4, epochs=3, warmup_iters=4, warmup_factor=0.2)
    _check(
        seen,
        {
            0: 0.2,  # ramp 0.2 x cos 1
            1: 0.4 * (0.5 + (math.sqrt(6.0) + ROOT2) / 8),  # cos(pi/12) = (sqrt(6) + sqrt(2))/4
            2: 0.6 * (0.5 + ROOT3 / 4),
            3: 0.8 * (0.5 + ROOT2 / 4),
            4: 0.75,  # warm-up over: the plain cosine value
        },
    )


def test_step_schedule_with_warmup():
    # Milestones are epochs: [1, 2] x 4 iterations -> drops at iterations 4 and 8; gamma 0.5.
    seen = _lrs(
        12,
        schedule="step",
        iters_per_epoch=4,
        epochs=3,
        milestones=[1, 2],
        gamma=0.5,
        warmup_iters=2,
        warmup_factor=0.1,
    )
    _check(
        seen,
        {
            0: 0.1,  # ramp 0.1
            1: 0.55,  # ramp 0.1 + 0.9 x 1/2
            2: 1.0,
            3: 1.0,  # the last iteration of epoch 1
            4: 0.5,  # the first of epoch 2: one milestone passed
            7: 0.5,
            8: 0.25,  # two milestones passed
            11: 0.25,
        },
    )


def test_step_schedule_default_gamma_and_no_milestones():
    seen = _lrs(9, schedule="step", iters_per_epoch=3, epochs=3, milestones=[2])
    _check(seen, {0: 1.0, 5: 1.0, 6: 0.1, 8: 0.1})  # gamma 0.1 from epoch 2 (iteration 6)
    _check(_lrs(5, schedule="step", iters_per_epoch=2, epochs=3), {0: 1.0, 4: 1.0})  # no milestones: flat


def test_constant_with_warmup():
    # Default warm-up factor 0.001 over 5 iterations: 0.001 + 0.999 x it / 5.
    seen = _lrs(40, schedule="constant", iters_per_epoch=10, epochs=2, warmup_iters=5)
    _check(seen, {0: 0.001, 1: 0.2008, 4: 0.8002, 5: 1.0, 19: 1.0, 39: 1.0})


def test_unknown_schedule_is_refused():
    opt = build_optimizer(nn.Linear(2, 2), name="sgd", lr=BASE_LR)
    with pytest.raises(ValueError, match="unknown schedule 'cosin' \\(cosine, step, constant\\)"):
        build_scheduler(opt, schedule="cosin", iters_per_epoch=4, epochs=1)


def test_optimizer_groups_and_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    model[3].bias.requires_grad_(False)  # frozen: left out of every group
    opt = build_optimizer(model, name="sgd", lr=BASE_LR, momentum=0.8, weight_decay=5e-4)
    decay, no_decay = opt.param_groups
    # Weight decay on conv and linear weights only; norms and biases are not decayed.
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    assert isinstance(opt, torch.optim.SGD) and decay["momentum"] == 0.8
    assert isinstance(build_optimizer(model, name="adamw", lr=BASE_LR), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(model, name="adam", lr=BASE_LR)


class _Detector(nn.Module):
    """Parameter names as in a torchvision detector: ``backbone.body`` (the trunk), ``backbone.fpn``, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        self.backbone.fpn = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(2, 2)


def test_backbone_lr_mult_gives_the_trunk_its_own_groups():
    model = _Detector()
    body, fpn, head = model.backbone.body, model.backbone.fpn, model.head
    body[1].bias.requires_grad_(False)  # frozen: left out of every group
    opt = build_optimizer(model, name="sgd", lr=BASE_LR, weight_decay=5e-4, backbone_lr_mult=0.1)
    decay, no_decay, trunk_decay, trunk_no_decay = opt.param_groups
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(fpn.weight), id(head.weight)}
    assert ids(no_decay) == {id(fpn.bias), id(head.bias)}
    assert ids(trunk_decay) == {id(body[0].weight)}
    assert ids(trunk_no_decay) == {id(body[0].bias), id(body[1].weight)}
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 5e-4, 0.0]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([BASE_LR, BASE_LR, 0.01, 0.01], rel=1e-12)

    # The schedule scales every group alike: cosine at iteration 4 of 12 is 0.75 (cos(pi/3) = 1/2).
    sched = build_scheduler(opt, schedule="cosine", iters_per_epoch=4, epochs=3)
    for _ in range(4):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.075, 0.075, 0.0075, 0.0075], rel=1e-12)

    # 1.0 (the default): the two groups there always were, the trunk in them.
    plain = build_optimizer(model, name="sgd", lr=BASE_LR, backbone_lr_mult=1.0)
    assert len(plain.param_groups) == 2 and id(body[0].weight) in ids(plain.param_groups[0])
