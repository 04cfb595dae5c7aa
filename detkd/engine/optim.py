"""Optimisers and per-iteration learning-rate schedules (linear warm-up + step or cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "step", "constant")
TRUNK = ".backbone.body."  # in the name of every backbone-trunk parameter of a torchvision detector


def build_optimizer(
    module: nn.Module,
    *,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    backbone_lr_mult: float = 1.0,
) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (standard for detectors trained from scratch).

    Groups: decayed, not decayed; with ``backbone_lr_mult`` != 1 two more at ``lr * backbone_lr_mult``
    holding the backbone trunk's parameters (those named ``...backbone.body...``, torchvision's
    name for it), decayed and not: a pretrained trunk is fine-tuned gently while the FPN and heads
    learn at ``lr``. At 1.0 the groups are the two they always were. Schedules scale every group alike.
    """
    split = backbone_lr_mult != 1.0
    decay, no_decay, trunk_decay, trunk_no_decay = [], [], [], []
    for pname, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or pname.endswith(".bias"))
        if split and TRUNK in f".{pname}":
            (trunk_decay if decayed else trunk_no_decay).append(p)
        else:
            (decay if decayed else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if split:  # kept even when empty (a frozen trunk): the same groups for every model of a recipe
        trunk_lr = lr * backbone_lr_mult
        groups += [
            {"params": trunk_decay, "weight_decay": weight_decay, "lr": trunk_lr},
            {"params": trunk_no_decay, "weight_decay": 0.0, "lr": trunk_lr},
        ]
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
