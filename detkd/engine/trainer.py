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
from detkd.engine.evaluate import ap_summary
from detkd.engine.inference import evaluate
from detkd.engine.optim import build_optimizer, build_scheduler
from detkd.engine.run_log import RunLogger, plot_run
from detkd.errors import DetkdError
from detkd.jsonio import dumps
from detkd.models.checkpoint import read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


class Trainer:
    def __init__(
        self,
        task: nn.Module,
        *,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        val_source: DetectionSource | None,
        class_names: list[str],
        out_dir: str | Path,
        epochs: int,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: str = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_iters: int = 100,
        warmup_factor: float = 0.001,
        grad_clip: float | None = 10.0,
        amp: bool = True,
        seed: int = 0,
        eval_every: int = 1,
        log_every: int = 10,
        device: str | torch.device = "cpu",
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        run_info: dict | None = None,
        step_hook: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
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
        self.amp = amp and self.device.type == "cuda"
        self.seed = seed
        self.eval_every = eval_every
        self.log_every = max(1, log_every)
        self.progress = progress
        self.rank = rank
        self.world_size = world_size
        self.run_info = dict(run_info or {})
        self.step_hook = step_hook
        self.optimizer = build_optimizer(task, name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
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
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.model = self._wrap_ddp(task)
        self.start_epoch = 0
        self.best_ap = -1.0
        self.history: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def student(self):
        return self.task.student

    def _wrap_ddp(self, task: nn.Module) -> nn.Module:
        if self.world_size <= 1:
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
        if not path.is_file():
            return False
        payload = read_checkpoint(path)
        state = payload.get("train_state")
        if state is None:
            raise DetkdError(f"{path}: checkpoint holds no training state, cannot resume")
        self.student.model.load_state_dict(payload["model"])
        self.task.load_extra_state(state["task_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # start_epoch is the 0-based loop index of the next epoch = the number of epochs done.
        self.start_epoch = state["epoch"] if state.get("epoch_numbering") == 1 else state["epoch"] + 1
        self.best_ap = state["best_ap"]
        self.history = state["history"]
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
                last_epoch = epoch == self.epochs - 1
                due = self.eval_every > 0 and (epoch + 1) % self.eval_every == 0
                if self.is_main and self.val_loader is not None and (due or last_epoch):
                    result = evaluate(
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
        logger.log_metrics(epoch + 1, metrics, step=metrics["step"])  # the step evaluated at, not the last logged
        plot_run(self.out_dir)
        (self.out_dir / "metrics.json").write_text(dumps({"last": metrics, "history": self.history}, indent=2))
        shown = ap_summary(metrics)
        log.info(
            "epoch %d/%d done in %.1fs (%.1f img/s)%s",
            epoch + 1,
            self.epochs,
            metrics["epoch_seconds"],
            metrics["images_per_second"],
            f": {shown}" if shown else "",
        )

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
            losses = self._step(batch.to(self.device), step)
            images += len(batch) * self.world_size
            step += 1
            if self.step_hook is not None:
                self.step_hook(step, losses)
            if logger is not None and (step % self.log_every == 0 or step == 1):
                logger.log_scalars(step, epoch + 1, {**losses, "lr": self.optimizer.param_groups[0]["lr"]}, "train")
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
        return step, images, skipped

    def _step(self, batch: Batch, step: int) -> dict[str, float]:
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.model(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise DetkdError(f"step {step}: loss is not finite ({terms}); lower train.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.task.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        values = {k: v.detach().item() for k, v in losses.items()}
        values["loss"] = total.detach().item()
        if not math.isfinite(values["loss"]):
            raise DetkdError(f"step {step}: loss is not finite")
        return values
