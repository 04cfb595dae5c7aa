"""``auto`` weights calibrated from a lowrank store: on the variance-restored maps, as the live teacher would be.

A store's basis keeps a share ``kept`` of the teacher's variance; a loss on the stored maps sees only
that share, so balancing it as it is would weight a method about 1 / kept times more than online.
"""

import dataclasses
import logging

import pytest
import torch

from detkd.distill.task import DistillationTask, build_method, common_levels
from detkd.knowledge import TeacherKnowledge
from detkd.models.builders import build_detector
from detkd.store.bases import BasisFit
from tests.distill.test_task import _batch

C_TEACHER, RANK = 16, 4


def _teacher_maps(shapes: dict[str, tuple[int, int]], n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` draws of maps whose channels have a spread of variances (so a rank-4 basis keeps a fraction
    of it) around a small mean; the structure is fixed, ``seed`` draws the maps."""
    g = torch.Generator().manual_seed(100)
    spread = torch.linspace(3.0, 0.5, C_TEACHER).view(1, -1, 1, 1)
    mix, _ = torch.linalg.qr(torch.randn(C_TEACHER, C_TEACHER, generator=g))
    mean = 0.25 * torch.randn(C_TEACHER, generator=g).view(1, -1, 1, 1)
    g.manual_seed(seed)
    return {
        lv: torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, C_TEACHER, h, w, generator=g) * spread) + mean
        for lv, (h, w) in shapes.items()
    }


def _fit(maps: dict[str, torch.Tensor], rank: int = RANK):
    bases = {}
    for lv, t in maps.items():
        fit = BasisFit(C_TEACHER)
        fit.add(t.permute(0, 2, 3, 1).reshape(-1, C_TEACHER))
        bases[lv] = fit.basis(min(rank, fit.count - 1, C_TEACHER))
    return bases


def _with_kept(bases: dict, kept: float | None) -> dict:
    """The same bases with another recorded share (None: a store built before it was recorded)."""
    return {lv: dataclasses.replace(b, kept=kept) for lv, b in bases.items()}


def _stored(maps, bases, *, coefficients: bool) -> TeacherKnowledge:
    conv = {lv: b.coefficients(maps[lv]) if coefficients else b.project(maps[lv]) for lv, b in bases.items()}
    return TeacherKnowledge(features=conv, bases=bases, coefficients=coefficients)


@pytest.mark.parametrize("coefficients", [False, True])
def test_restored_maps_carry_the_fit_samples_whole_variance(coefficients):
    maps = _teacher_maps({"p3": (9, 7), "p4": (5, 4)}, n=3)
    bases = _fit(maps)
    knowledge = _stored(maps, bases, coefficients=coefficients)
    restored = knowledge.variance_restored()
    for lv, t in maps.items():
        cells = t.permute(0, 2, 3, 1).reshape(-1, C_TEACHER).double()
        total = float(cells.var(0, correction=0).sum())  # the teacher's variance per cell, from the maps
        kept_energy = float(((cells - cells.mean(0)) @ bases[lv].basis.double()).pow(2).sum(1).mean())
        assert bases[lv].kept == pytest.approx(kept_energy / total, rel=1e-5)
        assert 0.2 < bases[lv].kept < 0.9  # the basis really drops variance here
        r = restored.features[lv].double()
        dev = r if coefficients else r - bases[lv].mean.double().view(1, -1, 1, 1)
        energy = float(dev.pow(2).sum(1).mean())
        assert energy == pytest.approx(total, rel=1e-4)
        assert float(
            knowledge.features[lv]
            .double()
            .sub(0 if coefficients else bases[lv].mean.view(1, -1, 1, 1))
            .pow(2)
            .sum(1)
            .mean()
        ) == pytest.approx(bases[lv].kept * total, rel=1e-4)


def test_nothing_to_restore_without_a_recorded_share_below_one():
    maps = _teacher_maps({"p3": (4, 4)})
    bases = _fit(maps)
    assert TeacherKnowledge(features=maps).variance_restored() is None  # a live teacher
    for kept in (None, 1.0):
        old = _with_kept(bases, kept)
        assert _stored(maps, old, coefficients=False).variance_restored() is None
    full = _fit(maps, rank=C_TEACHER)  # every direction kept: kept == 1
    assert full["p3"].kept == pytest.approx(1.0)


class FixedTeacher:
    """A teacher source that serves the same knowledge for every batch (a store stand-in)."""

    def __init__(self, student, knowledge: TeacherKnowledge):
        self.levels = list(student.levels)
        self.strides = dict(student.strides)
        self.channels = dict.fromkeys(self.levels, C_TEACHER)
        self.served = knowledge

    def knowledge(self, batch, needs):
        return self.served

    def to(self, device):
        return self


def _auto_weight(spec_factory, method: str, knowledge_of, steps: int = 2) -> tuple[float, dict]:
    torch.manual_seed(0)
    student = build_detector(spec_factory("fcos"))
    batch = _batch()
    with torch.no_grad():
        _, feats = student.forward_tap(batch.images, batch.image_sizes, batch.targets)
    teacher = FixedTeacher(student, knowledge_of({lv: tuple(f.shape[-2:]) for lv, f in feats.items()}))
    levels = common_levels(student, teacher)
    torch.manual_seed(1)
    m = build_method(method, levels=levels, args={})
    task = DistillationTask(
        student,
        methods={method: m},
        weights={method: "auto"},
        teacher=teacher,
        levels=list(levels),
        calibration_steps=steps,
    )
    task.train()
    for _ in range(steps):
        task(batch)
    return task.weight_report()[method]["weight"], task.weight_report()[method]


@pytest.mark.parametrize("method", ["fitnet", "mgd"])
@pytest.mark.parametrize("coefficients", [False, True])
def test_stored_auto_weight_is_the_online_one(spec_factory, method, coefficients):
    """A squared-distance method: from the store the weight comes out near the live teacher's; without the
    restoration (a store from before ``kept`` was recorded) about 1 / kept times it."""
    maps_of = {}

    def online(shapes):
        maps_of.update(_teacher_maps(shapes, seed=3))
        for lv, t in maps_of.items():
            maps_of[lv] = t * 4.0  # teacher-dominated: the teacher's variance sets the loss at the start
        return TeacherKnowledge(features=dict(maps_of))

    w_online, _ = _auto_weight(spec_factory, method, online)
    shapes = {lv: tuple(t.shape[-2:]) for lv, t in maps_of.items()}
    bases = _fit({lv: t * 4.0 for lv, t in _teacher_maps(shapes, n=64, seed=4).items()})  # a store's fit sample
    kept = {lv: b.kept for lv, b in bases.items()}
    w_stored, entry = _auto_weight(spec_factory, method, lambda s: _stored(maps_of, bases, coefficients=coefficients))
    assert entry["variance_restored"] and entry["store_kept_variance"] == kept
    old = _with_kept(bases, None)
    w_old, entry = _auto_weight(spec_factory, method, lambda s: _stored(maps_of, old, coefficients=coefficients))
    assert not entry["variance_restored"]
    assert w_stored == pytest.approx(w_online, rel=0.2)
    assert w_old / w_online > 1.5  # the bias the restoration removes


def test_training_losses_are_untouched_by_the_calibration_pass(spec_factory):
    """MGD draws random masks; the extra calibration pass must not shift training's random stream."""
    maps = _teacher_maps({"p3": (8, 8), "p4": (4, 4), "p5": (2, 2), "p6": (1, 1), "p7": (1, 1)})
    bases = _fit(maps)
    old = _with_kept(bases, None)
    unweighted = []
    for served in (bases, old):  # with and without the restoration pass
        torch.manual_seed(0)
        student = build_detector(spec_factory("fcos"))
        teacher = FixedTeacher(student, _stored(maps, served, coefficients=True))
        levels = common_levels(student, teacher)
        methods = {"mgd": build_method("mgd", levels=levels, args={})}
        task = DistillationTask(
            student,
            methods=methods,
            weights={"mgd": "auto"},
            teacher=teacher,
            levels=list(levels),
            calibration_steps=2,
        )
        task.train()
        torch.manual_seed(7)
        steps = []
        for _ in range(3):
            losses = task(_batch())
            steps.append(
                {k: float(v.detach()) / task.balance.weight("mgd") for k, v in losses.items() if k.startswith("mgd")}
            )
        unweighted.append(steps)
    restored, plain = ([v for step in run for v in step.values()] for run in unweighted)
    assert restored == pytest.approx(plain, rel=1e-6)


def test_old_store_warns_that_its_weights_are_not_calibrated_as_online(spec_factory, caplog):
    maps_of = {}

    def old_store(shapes):
        maps_of.update(_teacher_maps(shapes))
        bases = _with_kept(_fit(maps_of), None)
        return _stored(maps_of, bases, coefficients=False)

    with caplog.at_level(logging.WARNING, logger="detkd.distill.task"):
        _auto_weight(spec_factory, "fitnet", old_store, steps=1)
    assert "do not record the variance they keep" in caplog.text
