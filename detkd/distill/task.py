"""DistillationTask: student + methods (with their adapters) as one trainable module.

Guards against silently wrong distillation: level/shape checks at the first step, per-term
magnitudes logged for the first steps, and a stop when a distillation loss is NaN, never
computed, or exactly zero for several steps in a row.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from detkd.data.loader import Batch
from detkd.distill.balance import DEFAULT_MEASURE, DEFAULT_RATIO, DEFAULT_STEPS, GradientBalance
from detkd.distill.base import METHODS, DistillContext, DistillMethod, LevelSpec
from detkd.errors import ConfigError, DetkdError
from detkd.knowledge import TeacherKnowledge, TeacherSource
from detkd.knowledge.importance import importance_maps
from detkd.models.detector import Detector

log = logging.getLogger(__name__)

LOG_FIRST_STEPS = (1, 2, 5, 10, 50)
ZERO_PATIENCE = 20  # consecutive steps of an exactly-zero distillation loss before the run stops


def common_levels(student: Detector, teacher: TeacherSource, wanted: list[str] | None = None) -> dict[str, LevelSpec]:
    """Levels both sides have at the same stride (optionally restricted to ``wanted``)."""
    shared = [lvl for lvl in student.levels if lvl in teacher.strides]
    if wanted is not None:
        missing = [lvl for lvl in wanted if lvl not in shared]
        if missing:
            raise ConfigError(
                f"distill.levels: {missing} not shared by student {student.levels} and teacher {teacher.levels}"
            )
        shared = list(wanted)
    if not shared:
        raise ConfigError(
            f"student levels {student.levels} and teacher levels {teacher.levels} have none in common; "
            "choose families whose FPN levels overlap (e.g. RetinaNet/FCOS p3-p7 with Faster R-CNN p3-p6)"
        )
    for lvl in shared:
        if student.strides[lvl] != teacher.strides[lvl]:
            raise ConfigError(f"level {lvl}: student stride {student.strides[lvl]} != teacher {teacher.strides[lvl]}")
    return {lvl: LevelSpec(student.channels[lvl], teacher.channels[lvl], student.strides[lvl]) for lvl in shared}


def build_method(name: str, *, levels: dict[str, LevelSpec], args: dict) -> DistillMethod:
    try:
        cls = METHODS.get(name)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    try:
        return cls(levels=levels, **args)
    except (TypeError, ValueError) as exc:  # an unknown or out-of-range argument: the user's to fix
        raise ConfigError(f"method {name!r}: {exc}") from None


class DistillationTask(nn.Module):
    def __init__(
        self,
        student: Detector,
        *,
        methods: dict[str, DistillMethod],
        weights: dict[str, float | str],
        teacher: TeacherSource,
        levels: list[str],
        auto_ratio: float = DEFAULT_RATIO,
        auto_measure: str = DEFAULT_MEASURE,
        calibration_steps: int = DEFAULT_STEPS,
    ) -> None:
        super().__init__()
        self.student = student
        self.methods = nn.ModuleDict(methods)
        # A method without an entry keeps its paper weight (multiplier 1).
        self.balance = GradientBalance(
            {name: weights.get(name, "paper") for name in methods},
            ratio=auto_ratio,
            steps=calibration_steps,
            measure=auto_measure,
        )
        self.levels = list(levels)
        self.__dict__["teacher"] = teacher  # not a submodule: outside DDP, the optimiser and state_dict
        modes = [m.teacher_importance_mode for m in methods.values() if getattr(m, "teacher_importance_mode", None)]
        if modes and hasattr(teacher, "importance_mode"):  # a live teacher builds Grad-CAM the way gkd asks
            teacher.importance_mode = dict(modes[0])
        self.needs = frozenset().union(*(m.needs for m in methods.values()))
        if all(m.coefficient_ok for m in methods.values()):  # lowrank stores may skip reconstructing maps
            self.needs |= {"coefficients"}
        self.step = 0
        self.zero_steps = 0
        self.kept_variance: dict[str, float | None] | None = None  # per lowrank level, seen at calibration

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        self.step += 1
        det_losses, feats = self.student.forward_tap(batch.images, batch.image_sizes, batch.targets)
        knowledge = self.teacher.knowledge(batch, self.needs)
        if self.step == 1:
            check_shapes(feats, knowledge, self.levels)
        if self.kept_variance is None and knowledge.bases:
            self._note_kept_variance(knowledge)
        student_feats = {lvl: feats[lvl] for lvl in self.levels}
        ctx = DistillContext(targets=batch.targets, image_sizes=batch.image_sizes, step=self.step)
        if "student_importance" in self.needs:
            ctx.student_importance = self._student_importance(det_losses, student_feats)
        raw: dict[str, dict[str, Tensor]] = {}
        for name, method in self.methods.items():
            terms = method(student_feats, knowledge, ctx)
            if not terms:
                raise DetkdError(f"method {name!r} returned no loss terms: nothing would be distilled")
            raw[name] = terms
        if self.balance.calibrating and torch.is_grad_enabled():
            self.balance.observe(
                sum(det_losses.values()),
                self._calibration_losses(raw, student_feats, knowledge, ctx),
                list(student_feats.values()),
            )
        kd: dict[str, Tensor] = {}
        for name, terms in raw.items():
            w = self.balance.weight(name)
            kd.update({k: w * v for k, v in terms.items()})
        self._guard(kd, det_losses)
        return {**det_losses, **kd}

    def _note_kept_variance(self, knowledge: TeacherKnowledge) -> None:
        self.kept_variance = knowledge.kept_variance()
        if self.balance.auto and any(k is None for k in self.kept_variance.values()):
            log.warning(
                "the store's bases do not record the variance they keep (built by an older detkd): the auto "
                "weights are calibrated on the projected loss and come out about 1/kept times the weights the "
                "live teacher would get; rebuild the store to calibrate them as online"
            )

    def _calibration_losses(
        self,
        raw: dict[str, dict[str, Tensor]],
        student_feats: dict[str, Tensor],
        knowledge: TeacherKnowledge,
        ctx: DistillContext,
    ) -> dict[str, Tensor]:
        """Each method's loss as the ``auto`` weight should see it. From a lowrank store a loss only
        sees the variance the basis kept (40 % of it, say), so balancing it as it is would weight the
        method about 1 / kept times more than the same method on the live teacher; the balance is
        therefore measured on the variance-restored maps (``TeacherKnowledge.variance_restored``),
        while training goes on with the stored ones."""
        losses = {n: sum(t.values()) for n, t in raw.items()}
        restored = knowledge.variance_restored() if self.kept_variance else None
        if restored is None:
            return losses
        device = next(iter(student_feats.values())).device
        # A forked RNG: a method's random draws (MGD's masks) in this extra pass leave training's stream alone.
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.set_grad_enabled(self.balance.measure == "grad"),
        ):
            for name in self.balance.auto:
                losses[name] = sum(self.methods[name](student_feats, restored, ctx).values())
        return losses

    @staticmethod
    def _student_importance(det_losses: dict[str, Tensor], feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Grad-CAM of the student's own detection loss (GKD's released-code parity mode)."""
        grads = torch.autograd.grad(
            sum(det_losses.values()), list(feats.values()), retain_graph=True, allow_unused=True
        )
        grads = {k: torch.zeros_like(f) if g is None else g for (k, f), g in zip(feats.items(), grads, strict=True)}
        maps, _ = importance_maps(
            {k: f.detach() for k, f in feats.items()}, grads, channel_mode="abs", activation_mode="abs"
        )
        return maps

    def _guard(self, kd: dict[str, Tensor], det: dict[str, Tensor]) -> None:
        # One host-device sync for all terms (on a GPU each float() or `if tensor` is a sync of its own).
        values = dict(zip(kd, torch.stack([v.detach().float() for v in kd.values()]).tolist(), strict=True))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise DetkdError(f"step {self.step}: distillation loss {bad} is not finite; lower its weight or the lr")
        total = sum(values.values())
        self.zero_steps = self.zero_steps + 1 if total == 0.0 else 0
        if self.zero_steps >= ZERO_PATIENCE:
            raise DetkdError(
                f"distillation loss has been exactly 0 for {self.zero_steps} steps: the teacher's knowledge does "
                "not reach the student (check the teacher checkpoint, the levels, and the method weights)"
            )
        if self.step in LOG_FIRST_STEPS:
            det_total = float(sum(v.detach() for v in det.values()))
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("step %d: detection loss %.4g; distillation terms: %s", self.step, det_total, shown)

    def weight_report(self) -> dict[str, dict]:
        """Which rule set each method's weight, and the weight (see ``detkd.distill.balance``)."""
        report = self.balance.report()
        if self.kept_variance is not None:
            restored = all(k is not None for k in self.kept_variance.values())
            for entry in report.values():
                if entry["rule"] == "auto":
                    entry.update(store_kept_variance=self.kept_variance, variance_restored=restored)
        return report

    def extra_state(self) -> dict:
        return {"methods": self.methods.state_dict(), "step": self.step, "balance": self.balance.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.methods.load_state_dict(state["methods"])
        self.step = state.get("step", 0)
        if "balance" in state:  # checkpoints from before the auto rule carry none
            self.balance.load_state_dict(state["balance"])


def check_shapes(student: dict[str, Tensor], knowledge: TeacherKnowledge, levels: list[str]) -> None:
    """Refuse mismatched levels before anything is learned from them."""
    if knowledge.features is None and knowledge.cells is None:
        raise DetkdError("teacher provided neither features nor cells")
    for lvl in levels:
        s = student[lvl]
        if knowledge.features is not None:
            if lvl not in knowledge.features:
                raise DetkdError(f"teacher has no features for level {lvl} (has {sorted(knowledge.features)})")
            t = knowledge.features[lvl]
            if t.shape[0] != s.shape[0] or t.shape[-2:] != s.shape[-2:]:
                raise DetkdError(
                    f"level {lvl}: teacher features {tuple(t.shape)} do not align with student {tuple(s.shape)} "
                    "(same batch, same spatial size needed: same canvas and stride)"
                )
        elif lvl not in knowledge.cells:
            raise DetkdError(f"teacher store has no cells for level {lvl} (has {sorted(knowledge.cells)})")
