"""The AMP part of ``detkd bench gpu``: float16 autocast + GradScaler against float32 on one device.

Three runs of the same student on the same data and seed through the real Trainer: float32, AMP,
and AMP stopped after its first epoch then resumed from ``last.pt``. Judged:

* finite: no step's loss is non-finite (the trainer would stop) and the scaler skipped at most
  ``MAX_SKIPPED`` steps: GradScaler starts at 2**16 and is meant to back off (halving) by skipping
  the first overflowing steps; 8 skips reach 2**8, so more means gradients keep overflowing.
* close: step 1 sees identical weights and batch, so its loss differs only by float16 rounding
  (relative ``STEP1_RTOL`` = 1e-2, about 10 float16 ulps); over the first ``FIRST_STEPS`` steps
  trajectories may part slightly (a skipped step, rounding in the update), while warm-up keeps the
  lr below 10 % of its peak, so ``FIRST_RTOL`` = 5e-2 still catches a broken cast or scale.
* resume: the checkpoint holds the scaler state, and the resumed epoch's scales equal the
  uninterrupted run's exactly, its losses within ``RESUME_RTOL`` = 1e-3 (cuDNN may pick other
  kernels; with deterministic kernels the difference is reported, normally 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from detkd.data.formats.detect import open_source
from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.views import ViewPolicy
from detkd.engine.tasks import DetectionTask
from detkd.engine.trainer import LAST, Trainer
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.checkpoint import read_checkpoint

MAX_SKIPPED = 8
FIRST_STEPS = 8
STEP1_RTOL = 1e-2
FIRST_RTOL = 5e-2
RESUME_RTOL = 1e-3


@dataclass(frozen=True)
class AmpScale:
    size: int
    batch_size: int
    images: int  # two epochs of images // batch_size steps each
    student: DetectorSpec


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _trainer(source, scale: AmpScale, out: Path, *, amp: bool, device: torch.device) -> Trainer:
    torch.manual_seed(0)  # same initial weights for every run
    policy = ViewPolicy(sizes=(scale.size,), flip_prob=0.5)
    loader = build_loader(
        ViewedDataset(source, policy, train=True, seed=0),
        batch_size=scale.batch_size,
        shuffle=True,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    # The shapes student recipe's optimisation (configs/shapes_student.yaml): sgd 0.02, 100 warm-up, clip 10.
    return Trainer(
        DetectionTask(build_detector(scale.student)),
        train_loader=loader,
        val_loader=None,
        val_source=None,
        class_names=source.class_names,
        out_dir=out,
        epochs=2,
        lr=0.02,
        warmup_iters=100,
        grad_clip=10.0,
        amp=amp,
        amp_on_cpu=device.type != "cuda",  # the --cpu dry run takes the same scaler path
        device=device,
        progress=False,
    )


def _record(trainer: Trainer) -> list[dict[str, float]]:
    steps: list[dict[str, float]] = []
    trainer.step_hook = lambda step, values: steps.append({"step": step, **values})
    return steps


def run_amp_check(*, data_dir: Path, out_dir: Path, scale: AmpScale, device: torch.device) -> dict:
    t0 = time.perf_counter()
    source = open_source(data_dir, format="coco", split="train")
    source.records = source.records[: scale.images]
    cudnn = torch.backends.cudnn
    saved_flags = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False  # so a resumed step can match exactly
    try:
        return _run(source, out_dir, scale, device, t0)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved_flags  # the speed part measures the defaults


def _run(source, out_dir: Path, scale: AmpScale, device: torch.device, t0: float) -> dict:
    fp32 = _trainer(source, scale, out_dir / "fp32", amp=False, device=device)
    fp32_steps = _record(fp32)
    fp32.fit()
    amp = _trainer(source, scale, out_dir / "amp", amp=True, device=device)
    amp_steps = _record(amp)
    amp.fit()
    part = _trainer(source, scale, out_dir / "amp-resumed", amp=True, device=device)
    part.fit(stop_after=0)
    saved = read_checkpoint(out_dir / "amp-resumed" / LAST)["train_state"]["scaler"]
    resumed = _trainer(source, scale, out_dir / "amp-resumed", amp=True, device=device)
    resumed.resume()
    resumed_steps = _record(resumed)
    resumed.fit()

    per_epoch = len(amp_steps) // 2
    first = min(FIRST_STEPS, len(amp_steps))
    diffs = [rel_diff(a["loss"], b["loss"]) for a, b in zip(amp_steps[:first], fp32_steps[:first], strict=True)]
    tail = amp_steps[per_epoch:]
    resume_diffs = [rel_diff(a["loss"], b["loss"]) for a, b in zip(resumed_steps, tail, strict=True)]
    finite = all(math.isfinite(s["loss"]) for s in amp_steps + fp32_steps + resumed_steps)
    checks = {
        "finite": {
            "nonfinite_losses": sum(not math.isfinite(s["loss"]) for s in amp_steps),
            "scaler_skipped_steps": amp.skipped_steps,
            "max_skipped": MAX_SKIPPED,
            "passed": finite and amp.skipped_steps <= MAX_SKIPPED,
        },
        "close": {
            "step1_rel_diff": diffs[0],
            "step1_rtol": STEP1_RTOL,
            "first_steps": first,
            "first_steps_max_rel_diff": max(diffs),
            "first_steps_rtol": FIRST_RTOL,
            "passed": diffs[0] <= STEP1_RTOL and max(diffs) <= FIRST_RTOL,
        },
        "resume": {
            "checkpoint_scale": saved.get("scale"),
            "checkpoint_growth_tracker": saved.get("_growth_tracker"),
            "scale_at_save": part.scaler.get_scale(),
            "resumed_steps": len(resumed_steps),
            "scales_equal": [s["amp_scale"] for s in resumed_steps] == [s["amp_scale"] for s in tail],
            "loss_max_rel_diff": max(resume_diffs, default=None),
            "loss_rtol": RESUME_RTOL,
            "bit_identical": bool(resume_diffs) and max(resume_diffs) == 0.0,
            "final_scaler_state_equal": resumed.scaler.state_dict() == amp.scaler.state_dict(),
        },
    }
    r = checks["resume"]
    r["passed"] = bool(
        saved.get("scale") == r["scale_at_save"]
        and len(resumed_steps) == len(tail) > 0
        and r["scales_equal"]
        and r["final_scaler_state_equal"]
        and r["loss_max_rel_diff"] <= RESUME_RTOL
    )
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "checks": checks,
        "setup": {"size": scale.size, "batch_size": scale.batch_size, "images": len(source), "steps": len(amp_steps)},
        "student": scale.student.to_dict(),
        "losses": {
            "fp32": [s["loss"] for s in fp32_steps],
            "amp": [s["loss"] for s in amp_steps],
            "amp_scale": [s["amp_scale"] for s in amp_steps],
            "resumed": [s["loss"] for s in resumed_steps],
        },
        "seconds": time.perf_counter() - t0,
    }
