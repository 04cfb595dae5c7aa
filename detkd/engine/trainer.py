"""The training loop shared by plain training and distillation.

Determinism: every epoch reseeds torch from (seed, epoch) and the loader's order and views
depend only on (seed, epoch), so a run resumed from its epoch checkpoint retraces exactly
the steps of an uninterrupted run.

Epochs are numbered from 1 wherever they are recorded or shown: the progress bar and log lines,
``metrics.json`` (last and history), ``metrics.jsonl``, ``log.csv`` and ``curves.png``, and the
checkpoints' ``epoch`` (the last completed epoch, i.e. the number of epochs done). Only the loop
index inside ``fit`` (and its ``stop_after``) counts from 0. An evaluation is recorded with the
step it ran after (the epoch's last step).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from detkd.data.formats.base import DetectionSource
from detkd.data.loader import Batch, set_epoch
from detkd.engine.defaults import TRAIN
from detkd.engine.inference import evaluate_detector
from detkd.engine.metrics import ap_summary
from detkd.engine.optim import build_optimizer, build_scheduler
from detkd.engine.plots import plot_run
from detkd.engine.run_log import RunLogger, read_metrics
from detkd.engine.tasks import TrainingTask
from detkd.errors import DetkdError
from detkd.jsonio import dumps
from detkd.models.checkpoint import checkpoint_weights, read_checkpoint, remove_stale_temps, save_checkpoint

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
RESUME_KEYS = ("epoch", "best_ap", "history", "optimizer", "scheduler", "scaler", "task_extra")


class Trainer:
    def __init__(
        self,
        task: TrainingTask,
        *,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        val_source: DetectionSource | None,
        class_names: list[str],
        out_dir: str | Path,
        epochs: int,
        optimizer: str = TRAIN.optimizer,
        lr: float = TRAIN.lr,
        momentum: float = TRAIN.momentum,
        weight_decay: float = TRAIN.weight_decay,
        backbone_lr_mult: float = TRAIN.backbone_lr_mult,
        schedule: str = TRAIN.schedule,
        milestones: list[int] | tuple[int, ...] = TRAIN.milestones,
        gamma: float = TRAIN.gamma,
        warmup_iters: int = TRAIN.warmup_iters,
        warmup_factor: float = TRAIN.warmup_factor,
        grad_clip: float | None = TRAIN.grad_clip,
        amp: bool = TRAIN.amp,
        seed: int = TRAIN.seed,
        eval_every: int = TRAIN.eval_every,
        log_every: int = TRAIN.log_every,
        device: str | torch.device = "cpu",
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        run_info: dict | None = None,
        step_hook: Callable[[int, dict[str, float]], None] | None = None,
        amp_on_cpu: bool = False,
    ) -> None:
        """``amp``: float16 autocast + GradScaler, on CUDA only (CPU float16 kernels are slow).
        ``amp_on_cpu`` forces it on the CPU too: a test hook that runs the CUDA code path (scaling,
        unscale before clipping, scaler state in checkpoints) on machines without a GPU."""
        self.task = task
        self.device = torch.device(device)
        self.task.to(self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.val_source = val_source
        self.class_names = class_names
        self.out_dir = Path(out_dir)
        self.epochs = epochs
        self.grad_clip = grad_clip
        self.amp = amp and (self.device.type == "cuda" or amp_on_cpu)
        self.seed = seed
        self.eval_every = eval_every
        self.log_every = max(1, log_every)
        self.progress = progress
        self.rank = rank
        self.world_size = world_size
        self.run_info = dict(run_info or {})
        self.step_hook = step_hook
        self.optimizer = build_optimizer(
            task,
            name=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            backbone_lr_mult=backbone_lr_mult,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            schedule=schedule,
            iters_per_epoch=len(train_loader),
            epochs=epochs,
            milestones=milestones,
            gamma=gamma,
            warmup_iters=warmup_iters,
            warmup_factor=warmup_factor,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.skipped_steps = 0  # AMP steps whose gradients overflowed (the scaler skips them and backs off)
        self._scale = self.scaler.get_scale()
        self.model = self._wrap_ddp(task)
        self.start_epoch = 0
        self.best_ap = -1.0
        self.history: list[dict] = []
        self.resumed_metrics: dict | None = None  # the last finished epoch's metrics, after resume()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def student(self):
        return self.task.student

    def _wrap_ddp(self, task: nn.Module) -> nn.Module:
        import torch.distributed as dist

        # Under torchrun even one process trains through DDP, the path a multi-GPU job takes.
        if self.world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
            return task
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Methods keep every module in the graph (a zero loss stays attached), so no unused-parameter scan.
        return nn.parallel.DistributedDataParallel(task, device_ids=ids, find_unused_parameters=False)

    # -- checkpoints -------------------------------------------------------------------------------
    def _train_state(self, epoch: int) -> dict:
        return {
            "epoch": epoch + 1,  # epochs done; 1-based like every other record of the run
            "epoch_numbering": 1,  # absent in checkpoints whose "epoch" was the 0-based index
            "best_ap": self.best_ap,
            "history": self.history,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "task_extra": self.task.extra_state(),
        }

    def _save(self, name: str, epoch: int, *, with_state: bool, metrics: dict | None = None) -> None:
        extra = {"epoch": epoch + 1, "metrics": metrics or {}, "run": self.run_info}
        if with_state:
            extra["train_state"] = self._train_state(epoch)
        save_checkpoint(self.out_dir / name, self.student, class_names=self.class_names, extra=extra)

    def resume(self) -> bool:
        """Load ``last.pt`` of the run directory if there is one; True when resumed."""
        path = self.out_dir / LAST
        if self.is_main:
            for tmp in remove_stale_temps(self.out_dir):
                log.info("removed %s, a partial checkpoint of the interrupted run", tmp)
        if not path.is_file():
            return False
        payload = read_checkpoint(path)
        state = payload.get("train_state")
        if not isinstance(state, dict):
            raise DetkdError(f"{path}: checkpoint holds no training state, cannot resume")
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise DetkdError(f"{path}: training state lacks {', '.join(missing)}, cannot resume")
        self.student.model.load_state_dict(checkpoint_weights(path, payload))
        self.task.load_extra_state(state["task_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.amp and not state["scaler"]:
            # Saved by a run without AMP (a disabled scaler saves {}): start scaling afresh.
            log.info("%s: no GradScaler state saved (run trained without AMP); the scale starts afresh", path)
        else:
            self.scaler.load_state_dict(state["scaler"])
        self._scale = self.scaler.get_scale()
        # start_epoch is the 0-based loop index of the next epoch = the number of epochs done.
        self.start_epoch = state["epoch"] if state.get("epoch_numbering") == 1 else state["epoch"] + 1
        self.best_ap = state["best_ap"]
        self.history = state["history"]
        self.resumed_metrics = dict(payload.get("metrics") or {})
        log.info("resumed from %s after epoch %d", path, self.start_epoch)
        return True

    # -- loop ----------------------------------------------------------------------------------------
    def fit(self, *, stop_after: int | None = None) -> dict:
        """Train to ``epochs`` (or stop after epoch index ``stop_after``, for tests and partial runs)."""
        logger = RunLogger(self.out_dir, tensorboard=True) if self.is_main else None
        if logger is not None:
            logger.truncate_after(self.start_epoch)  # keep the epochs done (logged 1-based)
        step = self.start_epoch * len(self.train_loader)
        final: dict = {}
        if self.start_epoch >= self.epochs and self.resumed_metrics is not None:
            # Resumed after the final checkpoint: a kill may have come before the end-of-run files.
            try:
                if logger is not None:
                    self._finish_run(self.epochs - 1, self.resumed_metrics, logger)
            finally:
                if logger is not None:
                    logger.close()
            return dict(self.resumed_metrics) if self.is_main else {}
        try:
            for epoch in range(self.start_epoch, self.epochs):
                torch.manual_seed(self.seed * 100_003 + epoch)
                set_epoch(self.train_loader, epoch)
                t0 = time.perf_counter()
                step, images, skipped = self._train_epoch(epoch, step, logger)
                seconds = time.perf_counter() - t0
                metrics = {
                    "epoch": epoch + 1,
                    "step": step,
                    "epoch_seconds": seconds,
                    "images_per_second": images / max(seconds, 1e-9),
                }
                if skipped:
                    metrics["skipped_images"] = skipped
                    log.warning("epoch %d: %d images could not be read and were skipped", epoch + 1, skipped)
                if hasattr(self.task, "weight_report"):  # which rule set each distillation weight, and its value
                    metrics["distill_weights"] = self.task.weight_report()
                last_epoch = epoch == self.epochs - 1
                due = self.eval_every > 0 and (epoch + 1) % self.eval_every == 0
                if self.is_main and self.val_loader is not None and (due or last_epoch):
                    result = evaluate_detector(
                        self.student,
                        self.val_loader,
                        self.val_source,
                        device=self.device,
                        amp=self.amp,
                        progress=self.progress,
                    )
                    metrics.update({k: v for k, v in result.to_dict().items() if isinstance(v, (int, float))})
                    metrics["per_class_ap"] = result.per_class_ap
                if self.is_main:
                    self._end_epoch(epoch, metrics, logger)
                final = metrics
                if stop_after is not None and epoch >= stop_after:
                    break
        finally:
            if logger is not None:
                logger.close()
        return final if self.is_main else {}

    def _end_epoch(self, epoch: int, metrics: dict, logger: RunLogger) -> None:
        ap = metrics.get("AP")
        self.history.append({k: v for k, v in metrics.items() if k != "per_class_ap"})
        if ap is not None and ap > self.best_ap:
            self.best_ap = ap
            self._save(BEST, epoch, with_state=False, metrics=metrics)
        self._save(LAST, epoch, with_state=True, metrics=metrics)
        self._write_run_files(epoch, metrics, logger)
        shown = ap_summary(metrics)
        log.info(
            "epoch %d/%d done in %.1fs (%.1f img/s)%s",
            epoch + 1,
            self.epochs,
            metrics["epoch_seconds"],
            metrics["images_per_second"],
            f": {shown}" if shown else "",
        )

    def _write_run_files(self, epoch: int, metrics: dict, logger: RunLogger, *, log_metrics: bool = True) -> None:
        """The files written after an epoch's checkpoint: metrics log, curves, metrics.json."""
        if log_metrics:  # at the step evaluated at, not the last one logged
            logger.log_metrics(epoch + 1, metrics, step=metrics.get("step"))
        plot_run(self.out_dir)
        record = {"last": metrics, "history": self.history}
        if self.run_info.get("backbone_weights"):  # what the trunk started from
            record["backbone_weights"] = self.run_info["backbone_weights"]
        (self.out_dir / "metrics.json").write_text(dumps(record, indent=2))

    def _finish_run(self, epoch: int, metrics: dict, logger: RunLogger) -> None:
        """Redo the end-of-run writes of a run whose final checkpoint exists (idempotent)."""
        logged = any(m.get("epoch") == epoch + 1 for m in read_metrics(self.out_dir))  # logged 1-based
        self._write_run_files(epoch, metrics, logger, log_metrics=not logged)
        log.info("run already trained to epoch %d; wrote its end-of-run files", epoch + 1)

    def _train_epoch(self, epoch: int, step: int, logger: RunLogger | None) -> tuple[int, int, int]:
        self.model.train()
        images = skipped = 0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not (self.progress and self.is_main),
            dynamic_ncols=True,
            leave=False,
            unit="it",
        )
        for batch in bar:
            skipped += batch.skipped
            if len(batch) == 0:
                continue
            # Asynchronous from a pinned batch (the loader pins on CUDA); a plain copy otherwise.
            losses = self._step(batch.to(self.device, non_blocking=self.device.type == "cuda"), step)
            images += len(batch) * self.world_size
            step += 1
            if self.step_hook is not None:
                self.step_hook(step, losses)
            if logger is not None and (step % self.log_every == 0 or step == 1):
                logger.log_scalars(step, epoch + 1, {**losses, "lr": self.optimizer.param_groups[0]["lr"]}, "train")
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
        return step, images, skipped

    def _step(self, batch: Batch, step: int) -> dict[str, float]:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            losses = self.model(batch)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
            nn.utils.clip_grad_norm_(self.task.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)  # skipped (weights untouched) when an AMP gradient overflowed
        self.scaler.update()
        self.scheduler.step()
        # One host-device sync per step for every logged number, after all of the step's work is queued.
        # A non-finite loss is caught here: the run stops before anything is saved from this step.
        numbers = torch.stack([v.detach().float() for v in (*losses.values(), total)]).tolist()
        values = dict(zip(losses, numbers[:-1], strict=True))
        values["loss"] = numbers[-1]
        if not all(math.isfinite(v) for v in numbers):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "loss")
            raise DetkdError(f"step {step}: loss is not finite ({terms}); lower train.lr or check the data")
        if self.amp:
            scale = self.scaler.get_scale()
            if scale < self._scale:  # update() backs off only after a skipped step
                self.skipped_steps += 1
            self._scale = scale
            values["amp_scale"] = scale
        return values
