"""Optimisers and per-iteration learning-rate schedules (linear warm-up + step or cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "step", "constant")


def build_optimizer(
    module: nn.Module, *, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (standard for detectors trained from scratch)."""
    decay, no_decay = [], []
    for pname, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or pname.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (sgd or adamw)")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    iters_per_epoch: int,
    epochs: int,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:  # anything else trained at a constant rate, silently
        raise ValueError(f"unknown schedule {schedule!r} ({', '.join(SCHEDULES)})")
    total = max(1, iters_per_epoch * epochs)
    steps = [m * iters_per_epoch for m in (milestones or [])]

    def factor(it: int) -> float:
        if schedule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
        elif schedule == "step":
            f = gamma ** sum(it >= s for s in steps)
        else:
            f = 1.0
        if it < warmup_iters:
            alpha = it / warmup_iters
            f *= warmup_factor * (1 - alpha) + alpha
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
