"""What every run does before and after its own part: recipe -> data, student, device, run directory,
loaders and trainer. ``train`` and ``distill`` differ only in the task they hand to ``fit_task``."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detkd.config import Recipe, dump_recipe
from detkd.data.formats.base import DetectionSource
from detkd.data.formats.detect import open_source
from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.views import ViewPolicy
from detkd.engine.trainer import LAST, Trainer
from detkd.errors import ConfigError, DataError, DetkdError
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.checkpoint import load_detector
from detkd.models.detector import Detector

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train_source: DetectionSource
    val_source: DetectionSource
    policy: ViewPolicy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(recipe: Recipe) -> DataBundle:
    d = recipe.data
    fmt = None if d.format == "auto" else d.format
    train = open_source(d.root, format=fmt, split=d.train_split, names=d.names)
    val = open_source(d.val_root or d.root, format=fmt, split=d.val_split, names=d.names)
    if train.class_names != val.class_names:
        raise DetkdError(
            f"{d.root}: train and val splits have different classes: {train.class_names} vs {val.class_names}"
        )
    if d.limit is not None:
        # A quick run is quick end to end: the limit applies to each split, and says so.
        sizes = len(train), len(val)
        train.records = train.records[: d.limit]
        val.records = val.records[: d.limit]
        log.info(
            "data.limit=%d: training on the first %d of %d training images, evaluating on the first %d of %d "
            "validation images (AP of a limited validation split is not comparable to the full one)",
            d.limit,
            len(train),
            sizes[0],
            len(val),
            sizes[1],
        )
    for name, src in (("train", train), ("val", val)):
        if len(src) == 0:
            raise DetkdError(f"{d.root}: the {name} split has no usable images\n{src.problems.summary()}")
        if name == "train" and not any(len(r.labels) for r in src.records):
            # Every loss would be background-only: a run would "succeed" and learn nothing.
            limited = f" (the first {d.limit})" if d.limit is not None else ""
            raise DataError(
                f"{d.root}: the train split {d.train_split!r} has {len(src)} images{limited} but not one annotated "
                "object; check the annotation file and data.train_split"
            )
        if len(src.problems):
            log.warning(
                "%s split: %d annotation problems (counted, skipped):\n%s",
                name,
                len(src.problems),
                src.problems.summary(),
            )
    return DataBundle(train, val, ViewPolicy(sizes=tuple(d.sizes), flip_prob=d.flip_prob))


def detector_spec(recipe: Recipe, num_classes: int) -> DetectorSpec:
    m = recipe.model.model_dump()
    m.pop("checkpoint")
    return DetectorSpec(num_classes=num_classes, **m)


def build_student(recipe: Recipe, num_classes: int) -> Detector:
    spec = detector_spec(recipe, num_classes)
    if recipe.model.checkpoint:
        detector, _ = load_detector(recipe.model.checkpoint, spec=spec)
        return detector
    return build_detector(spec)


def make_loaders(
    bundle: DataBundle,
    recipe: Recipe,
    *,
    rank: int = 0,
    world_size: int = 1,
    train_dataset=None,
    pin_memory: bool = False,
):
    """``pin_memory``: page-locked training batches, for asynchronous copies to a CUDA device."""
    d, t = recipe.data, recipe.train
    train_ds = train_dataset or ViewedDataset(bundle.train_source, bundle.policy, train=True, seed=t.seed)
    train_loader = build_loader(
        train_ds,
        batch_size=d.batch_size,
        shuffle=True,
        workers=d.workers,
        seed=t.seed,
        num_replicas=world_size,
        rank=rank,
        drop_last=True,
        pin_memory=pin_memory,
    )
    val_ds = ViewedDataset(bundle.val_source, bundle.policy, train=False, seed=t.seed)
    val_loader = build_loader(val_ds, batch_size=d.batch_size, shuffle=False, workers=d.workers)
    if len(train_loader) == 0:
        raise ConfigError(f"data.batch_size={d.batch_size} is larger than the {len(train_ds)} training images")
    return train_loader, val_loader


def backbone_weights_identity(detector) -> dict | None:
    """``{"file", "sha256"}`` of the weights the student's trunk started from (``file`` as the recipe
    gives it, e.g. ``imagenet``; None: from scratch)."""
    spec = getattr(detector, "spec", None) or {}
    if not spec.get("backbone_weights_sha256"):
        return None
    return {"file": str(spec.get("backbone_weights")), "sha256": spec["backbone_weights_sha256"]}


def prepare_run_dir(recipe: Recipe, *, resume: bool, weights: dict | None = None) -> Path:
    """The run folder with its ``recipe.yaml``; ``weights`` (``backbone_weights_identity``) is added as
    a closing comment, so the file stays a recipe that trains again."""
    out = Path(recipe.train.out)
    if (out / LAST).exists() and not resume:
        raise DetkdError(f"{out}: a run already exists here; pass --resume to continue it or set train.out=NEW_DIR")
    out.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, out / "recipe.yaml")
    if weights:
        with open(out / "recipe.yaml", "a") as f:
            f.write(f"# model.backbone_weights {weights['file']}: sha256 {weights['sha256']}\n")
    return out


def make_trainer(
    task, recipe: Recipe, bundle: DataBundle, loaders, *, device, rank=0, world_size=1, run_info=None, progress=True
) -> Trainer:
    t = recipe.train
    train_loader, val_loader = loaders
    return Trainer(
        task,
        train_loader=train_loader,
        val_loader=val_loader,
        val_source=bundle.val_source,
        class_names=bundle.train_source.class_names,
        out_dir=t.out,
        epochs=t.epochs,
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        backbone_lr_mult=t.backbone_lr_mult,
        schedule=t.schedule,
        milestones=t.milestones,
        gamma=t.gamma,
        warmup_iters=t.warmup_iters,
        warmup_factor=t.warmup_factor,
        grad_clip=t.grad_clip,
        amp=t.amp,
        seed=t.seed,
        eval_every=t.eval_every,
        log_every=t.log_every,
        device=device,
        rank=rank,
        world_size=world_size,
        run_info=run_info,
        progress=progress,
    )


def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise.

    Under torchrun the process group is set up even for one process (NCCL on CUDA, gloo on the
    CPU), so ``--nproc-per-node 1`` runs the same initialisation and DDP path as a multi-GPU job."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # before NCCL starts, so each rank talks from its own GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log.info("distributed: backend %s, rank %d of %d", dist.get_backend(), dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size(), local


def run_device(name: str, local_rank: int) -> torch.device:
    """The recipe's device; under torchrun, CUDA means this rank's own GPU."""
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", local_rank)
    return device


@dataclass
class RunSetup:
    """The shared preamble of a run: distributed context, seeded data, student and device."""

    recipe: Recipe
    bundle: DataBundle
    student: Detector
    device: torch.device
    rank: int = 0
    world_size: int = 1


def setup_run(recipe: Recipe) -> RunSetup:
    """Distributed context, seeding, data and student, in the order that makes runs replayable."""
    rank, world, local = distributed_context()
    seed_everything(recipe.train.seed)
    bundle = load_data(recipe)
    device = run_device(recipe.train.device, local)
    student = build_student(recipe, bundle.train_source.num_classes)
    return RunSetup(recipe=recipe, bundle=bundle, student=student, device=device, rank=rank, world_size=world)


def fit_task(
    setup: RunSetup,
    task,
    *,
    run_info: dict,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    train_dataset=None,
) -> dict:
    """Run directory, loaders, trainer, resume, fit: the part every run shares after building its task."""
    recipe = setup.recipe
    weights = backbone_weights_identity(setup.student)
    if weights:
        run_info = {**run_info, "backbone_weights": weights}
    if setup.rank == 0:
        prepare_run_dir(recipe, resume=resume, weights=weights)
    loaders = make_loaders(
        setup.bundle,
        recipe,
        rank=setup.rank,
        world_size=setup.world_size,
        train_dataset=train_dataset,
        pin_memory=setup.device.type == "cuda",
    )
    trainer = make_trainer(
        task,
        recipe,
        setup.bundle,
        loaders,
        device=setup.device,
        rank=setup.rank,
        world_size=setup.world_size,
        run_info={**run_info, "recipe": recipe.model_dump(mode="json")},
        progress=progress,
    )
    if resume:
        trainer.resume()
    return trainer.fit(stop_after=stop_after)
