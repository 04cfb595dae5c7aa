"""Scale-aware distillation weights: each method's gradient on the student's features, balanced.

A published loss weight is tied to the map sizes, channel counts and batch size of the paper
that chose it: the same ``lambda`` that helps at 1333x800 with 256 channels does nothing at
128 px with 64 (or swamps the detection loss the other way round). The ``auto`` rule removes
that dependence. During the first ``steps`` training steps it measures, on the same batch,

    g_det = || d L_det / d F_s ||    and    g_m = || d L_m / d F_s ||

(the L2 norm over every distilled level of the student's FPN features ``F_s``, ``L_m`` the
method's loss at its paper weight), then fixes

    w_m = ratio * sum_steps g_det / sum_steps g_m

so that the method pushes the student's features with ``ratio`` times the detection loss's
push, whatever the scale. ``measure="loss"`` balances the loss values instead (``g = |L|``):
cheaper, blind to how steep each loss is, but not misled by adapters that start near zero
(DeFeat's), whose gradient on ``F_s`` is tiny only at initialisation. Steps before the last
calibration step use the estimate so far.
The weight is then frozen, saved in the checkpoint (a resumed run replays it exactly) and
reported with the run's metrics. Under DDP the sums are all-reduced, so every rank uses the
same weight.

Each norm is taken of ``L / stopgrad(L)`` and multiplied back by ``|L|``: the same number, but
the backward pass runs on values of order one, so float16 gradients under autocast neither
underflow for small losses nor overflow for large ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the recipe schema reads this module's defaults
    from torch import Tensor

log = logging.getLogger(__name__)

WEIGHT_RULES = ("auto", "paper")
MEASURES = ("grad", "loss")  # what the auto rule balances: gradient norms on F_s, or loss values
DEFAULT_MEASURE = "loss"  # chosen by measurement: see README "Loss weights"
DEFAULT_RATIO = 8.0
DEFAULT_STEPS = 10


def feature_grad_norm(loss: Tensor, features: list[Tensor]) -> float:
    """|| d loss / d features ||_2 over all the tensors, computed at unit loss scale (see module doc)."""
    import torch

    value = float(loss.detach())
    if not loss.requires_grad or value == 0.0 or not math.isfinite(value):
        return 0.0
    grads = torch.autograd.grad(loss / loss.detach(), features, retain_graph=True, allow_unused=True)
    sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(sq) * abs(value)


class GradientBalance:
    """Calibrates the ``auto`` weights of the named methods; explicit weights pass through.

    ``weights`` maps a method name to a number (a fixed multiplier of its paper-weighted loss)
    or ``"auto"``; ``"paper"`` is the multiplier 1.0.
    """

    def __init__(
        self,
        weights: Mapping[str, float | str],
        *,
        ratio: float = DEFAULT_RATIO,
        steps: int = DEFAULT_STEPS,
        measure: str = DEFAULT_MEASURE,
    ) -> None:
        if measure not in MEASURES:
            raise ValueError(f"auto weight measure {measure!r} unknown; choose one of {MEASURES}")
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"auto weight ratio must be a positive number, got {ratio}")
        if steps < 1:
            raise ValueError(f"auto weight calibration needs at least one step, got {steps}")
        self.rules = {name: _rule(w) for name, w in weights.items()}
        self.fixed = {name: (1.0 if w == "paper" else float(w)) for name, w in weights.items() if w != "auto"}
        self.auto = [name for name, w in weights.items() if w == "auto"]
        self.ratio = float(ratio)
        self.steps = int(steps)
        self.measure = measure
        self.det_sum = 0.0
        self.method_sum = dict.fromkeys(self.auto, 0.0)
        self.observed = 0

    @property
    def calibrating(self) -> bool:
        return bool(self.auto) and self.observed < self.steps

    def weight(self, name: str) -> float:
        if name in self.fixed:
            return self.fixed[name]
        g = self.method_sum[name]
        if g <= 0.0:  # nothing measured yet (or no gradient at all): the paper weight
            return 1.0
        return self.ratio * self.det_sum / g

    def observe(self, det_loss: Tensor, method_losses: Mapping[str, Tensor], features: list[Tensor]) -> None:
        """One calibration step: measure every ``auto`` method's gradient norm beside the detection loss's."""
        import torch
        import torch.distributed as dist

        if self.measure == "grad":
            norms = [feature_grad_norm(det_loss, features)]
            norms += [feature_grad_norm(method_losses[name], features) for name in self.auto]
        else:
            norms = [abs(float(det_loss.detach()))] + [abs(float(method_losses[n].detach())) for n in self.auto]
            norms = [v if math.isfinite(v) else 0.0 for v in norms]
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor(norms, dtype=torch.float64, device=features[0].device)
            dist.all_reduce(t)
            norms = t.tolist()
        self.det_sum += norms[0]
        for name, g in zip(self.auto, norms[1:], strict=True):
            self.method_sum[name] += g
        self.observed += 1
        if self.observed == self.steps:
            for name in self.auto:
                if self.method_sum[name] <= 0.0:
                    log.warning("auto weight for %r: its loss gave no gradient on the student; paper weight kept", name)
            shown = ", ".join(f"{n}={self.weight(n):.4g}" for n in self.auto)
            log.info("auto distillation weights fixed after %d steps (ratio %g): %s", self.steps, self.ratio, shown)

    def report(self) -> dict[str, dict]:
        """Per method: the rule that set its weight, the weight, and for ``auto`` the measurements."""
        out = {}
        for name, rule in self.rules.items():
            entry: dict = {"rule": rule, "weight": self.weight(name)}
            if rule == "auto":
                entry.update(
                    measure=self.measure, ratio=self.ratio, calibration_steps=self.observed, frozen=not self.calibrating
                )
            out[name] = entry
        return out

    def state_dict(self) -> dict:
        return {"det_sum": self.det_sum, "method_sum": dict(self.method_sum), "observed": self.observed}

    def load_state_dict(self, state: dict) -> None:
        self.det_sum = float(state["det_sum"])
        self.method_sum.update({k: float(v) for k, v in state["method_sum"].items() if k in self.method_sum})
        self.observed = int(state["observed"])


def _rule(weight: float | str) -> str:
    if weight in WEIGHT_RULES:
        return str(weight)
    return "explicit"
