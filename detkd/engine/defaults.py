"""The one table of training defaults: the ``Trainer``'s keyword arguments and the recipe's ``train``
section read it. Import-light on purpose (no torch): ``detkd.config`` imports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainDefaults:
    epochs: int = 12
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0  # trunk lr / lr; 1.0: one rate for all (from scratch)
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (8, 11)  # epochs, for the step schedule
    gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    grad_clip: float | None = 10.0
    amp: bool = True  # float16 autocast on CUDA only
    seed: int = 0
    eval_every: int = 1  # epochs; 0: only at the end
    log_every: int = 10  # steps


TRAIN = TrainDefaults()
