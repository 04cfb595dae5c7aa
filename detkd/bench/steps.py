"""Training steps of ``detkd bench speed``: the student alone, online and stored distillation,
timed in interleaved rounds from their loaders, then the same steps on batches held in memory (the
stored knowledge collated beforehand), which leaves the method's own work."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from detkd.data.loader import ViewedDataset, build_loader
from detkd.distill.task import DistillationTask, build_method, common_levels
from detkd.engine.optim import build_optimizer
from detkd.engine.tasks import DetectionTask
from detkd.knowledge.online import OnlineTeacher
from detkd.models.builders import build_detector
from detkd.store.reader import StoreReader
from detkd.store.replay import providers
from detkd.store.teacher import StoredTeacher


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: a host clock needs them finished
        torch.cuda.synchronize(device)


MODES = ("student", "online", "stored")


def make_task(mode: str, scale, teacher, reader, method: str = "fitnet"):
    torch.manual_seed(0)
    student = build_detector(scale.student)
    if mode == "student":
        return DetectionTask(student)
    source = OnlineTeacher(teacher) if mode == "online" else StoredTeacher(reader)
    # online and stored alike distill the levels the store holds: the same loss, with and without a teacher
    levels = common_levels(student, source, [lv for lv in student.levels if lv in reader.manifest.levels])
    distiller = build_method(method, levels=levels, args={})
    return DistillationTask(student, methods={method: distiller}, weights={}, teacher=source, levels=list(levels))


def mode_setup(mode, scale, source, policy, teacher, reader, method, workers, device):
    """(task, loader, optimizer, scaler) of one mode, on ``device``."""
    task = make_task(mode, scale, teacher, reader, method).to(device)
    if mode == "stored":
        views, knowledge = providers(reader, source)
        ds = ViewedDataset(source, policy, train=True, seed=0, view_provider=views, knowledge_provider=knowledge)
    else:
        ds = ViewedDataset(source, policy, train=True, seed=0)
    loader = build_loader(
        ds, batch_size=scale.batch_size, shuffle=True, workers=workers, drop_last=True, pin_memory=device.type == "cuda"
    )
    # Random weights: a vanishing lr keeps every step's full cost while losses stay finite.
    opt = build_optimizer(task, name="sgd", lr=1e-12)
    return task, loader, opt, torch.amp.GradScaler(device.type, enabled=scale.amp)


def train_step(task, batch, opt, scaler, device, amp: bool) -> None:
    """One step as the trainer takes it: non-blocking copy, autocast, scaled backward, step."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        loss = sum(task(batch).values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sync(device)


def step_times(
    scale, source, policy, teacher, store_dir, *, method, workers, device, progress: bool = False
) -> dict[str, list[float]]:
    reader = StoreReader(store_dir)
    modes = {m: mode_setup(m, scale, source, policy, teacher, reader, method, workers, device) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in modes}
    iterators: dict[str, object] = {}
    bar = tqdm(range(scale.rounds + 1), desc="step-time rounds", disable=not progress, dynamic_ncols=True)
    for r in bar:  # round 0 warms up caches and workers, not counted
        for mode, (task, loader, opt, scaler) in modes.items():
            task.train()
            for _ in range(scale.steps_per_round):
                fresh = mode not in iterators
                if fresh:
                    iterators[mode] = iter(loader)
                t0 = time.perf_counter()
                try:
                    batch = next(iterators[mode])
                except StopIteration:  # epoch end: a new iterator starts its workers, not a training cost
                    iterators[mode] = iter(loader)
                    batch, fresh = next(iterators[mode]), True
                train_step(task, batch, opt, scaler, device, scale.amp)
                if r > 0 and not fresh:  # steady state only: worker start-up is excluded for every mode
                    times[mode].append(time.perf_counter() - t0)
    return times


class _Precollated:
    """A stored teacher whose batches' knowledge was collated before timing (``knowledge`` is a lookup
    by the batch's image tensor, which ``Batch.to`` keeps on the device it is already on)."""

    def __init__(self, teacher: StoredTeacher, batches: list, needs: frozenset[str]) -> None:
        self._teacher = teacher
        self._knowledge = {id(b.images): teacher.knowledge(b, needs) for b in batches}

    def knowledge(self, batch, needs: frozenset[str]):
        return self._knowledge[id(batch.images)]

    def __getattr__(self, name: str):
        return getattr(self._teacher, name)


def compute_step_times(scale, source, policy, teacher, store_dir, *, method, device) -> dict[str, list[float]]:
    """Student-alone and stored-distillation steps over ``steps_per_round`` batches loaded beforehand
    (the stored ones with their knowledge collated), in interleaved rounds; round 0 warms up."""
    reader = StoreReader(store_dir)
    modes = {}
    for mode in ("student", "stored"):
        task, loader, opt, scaler = mode_setup(mode, scale, source, policy, teacher, reader, method, 0, device)
        batches = [b.to(device) for _, b in zip(range(scale.steps_per_round), loader, strict=False)]
        if mode == "stored":
            task.__dict__["teacher"] = _Precollated(task.teacher, batches, task.needs)
        modes[mode] = (task, batches, opt, scaler)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(scale.rounds + 1):
        for mode, (task, batches, opt, scaler) in modes.items():
            task.train()
            for batch in batches:
                t0 = time.perf_counter()
                train_step(task, batch, opt, scaler, device, scale.amp)
                if r > 0:
                    times[mode].append(time.perf_counter() - t0)
    return times


def peak_memory(scale, source, policy, teacher, store_dir, method, workers, device) -> dict[str, int] | None:
    """``torch.cuda.max_memory_allocated`` over 2 steps of each mode alone on the device (teacher
    weights resident only in the online mode); None off CUDA."""
    if device.type != "cuda":
        return None
    reader = StoreReader(store_dir)
    peaks: dict[str, int] = {}
    for mode in MODES:
        teacher.to(device if mode == "online" else "cpu")
        task, loader, opt, scaler = mode_setup(mode, scale, source, policy, teacher, reader, method, workers, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        for _, batch in zip(range(2), loader, strict=False):
            train_step(task, batch, opt, scaler, device, scale.amp)
        peaks[mode] = int(torch.cuda.max_memory_allocated(device))
        del task, loader, opt, scaler
    teacher.to(device)
    return peaks
