"""Building a knowledge store: the teacher runs once over every (image, view), selection, writing.

The teacher sees exactly what it would see during online distillation: the same replayable view
through the same ViewedDataset, the same fixed canvas and the same Collate, so a stored record is
the teacher's features for that view at training time (bit for bit before the fp16 cast when the
batch composition matches; conv kernels may round differently across batch sizes).

Restart: records are committed in small LMDB transactions and the build skips every (image, view)
already in the store, so a killed build rerun with the same arguments continues where it stopped.
Skipped images: an image the loader cannot read is skipped and recorded in the manifest's ``gaps``
(a rerun retries it). Content: each image file is hashed while the image is read (``content``).
Exclusive: the build holds the directory's lock (``lock``) from before the teacher is loaded.
Sharding: process i of n builds the images ``shard_indices(len(source), shard=i, num_shards=n)``
into its own shard; ``merge_shards`` joins them. Mirroring: with ``mirror_flips`` only unflipped
views are built and training serves flipped views by mirroring the cells (``mirror_levels``).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detkd.data.formats.base import DetectionSource
from detkd.data.loader import Collate
from detkd.data.views import View, ViewPolicy
from detkd.engine.teacher_ap import measure_teacher_ap, warn_if_weak_teacher
from detkd.models.checkpoint import check_classes, file_sha256, load_detector
from detkd.models.detector import Detector
from detkd.store.bases import (
    BASES,
    BasisFit,
    bases_sha256,
    encoding_entry,
    fit_moments,
    load_bases,
    load_spectra,
    save_bases,
)
from detkd.store.budget import fit_to_budget
from detkd.store.codec import layout_dtypes
from detkd.store.content import content_digest
from detkd.store.format import StoreError
from detkd.store.lock import BuildLock
from detkd.store.manifest import Manifest
from detkd.store.pairs import PairCollate, PairDataset
from detkd.store.select import SelectionPolicy, valid_cells
from detkd.store.teacher_pass import select_batch
from detkd.store.writer import StoreWriter, shard_indices

log = logging.getLogger(__name__)

# Names the preprocessing of ``apply_view`` + ``Collate``; a store built under another rule is refused.
RESIZE_RULE = "longer-side, bilinear antialias, top-left on a zero canvas"
DEFAULT_IMPORTANCE_MODE = {"channel_mode": "signed", "activation_mode": "signed"}  # knowledge.importance defaults


def preprocessing_of(detector: Detector, *, canvas: int, views: list[View]) -> dict:
    """What must match between a store and a run for stored features to be the teacher's features."""
    return {
        "canvas": int(canvas),
        "sizes": sorted({v.size for v in views}),
        "resize": RESIZE_RULE,
        "image_mean": [round(float(v), 6) for v in detector.spec["image_mean"]],
        "image_std": [round(float(v), 6) for v in detector.spec["image_std"]],
    }


def build_store(
    *,
    teacher_checkpoint: str | Path,
    source: DetectionSource,
    policy: SelectionPolicy,
    views: list[View] | None = None,
    canvas: int,
    out_dir: str | Path,
    batch_size: int = 8,
    workers: int = 0,
    shard: int | None = None,
    num_shards: int | None = None,
    with_importance: bool = False,
    importance_mode: dict | None = None,
    mirror_flips: bool = False,
    progress: bool = True,
    teacher_ap: float | None = None,
    check_teacher_on: DetectionSource | None = None,
    device: str | torch.device = "cpu",
) -> Manifest:
    """Run the teacher over every (image, view) of ``source`` not yet in ``out_dir`` and store its selection.

    ``views`` defaults to both flips at the canvas size. ``with_importance`` also stores GKD's
    gradient-importance map ([1, h, w] fp16, key "gi") and channel weights ([C] fp32, "gc") per
    level (dense policy, channel_group 1), computed with ``importance_mode`` (``importance_maps``
    keyword arguments). ``teacher_ap`` defaults to the AP recorded in the checkpoint's metrics; with
    neither, ``check_teacher_on`` (a validation split) measures it before the build (one evaluation
    pass of the teacher over that split). A weak teacher AP is warned about loudly and recorded.
    Returns the manifest as saved (counts of this shard's writer in sharded mode).
    Raises StoreError at once if another build is writing ``out_dir``.
    """
    out_dir = Path(out_dir)
    with BuildLock(out_dir, shard=shard) as lock:  # before the teacher loads: a second build is refused at once
        return _build_locked(
            lock,
            teacher_checkpoint=teacher_checkpoint,
            source=source,
            policy=policy,
            views=views,
            canvas=canvas,
            out_dir=out_dir,
            batch_size=batch_size,
            workers=workers,
            shard=shard,
            num_shards=num_shards,
            with_importance=with_importance,
            importance_mode=importance_mode,
            mirror_flips=mirror_flips,
            progress=progress,
            teacher_ap=teacher_ap,
            check_teacher_on=check_teacher_on,
            device=device,
        )


def _build_locked(
    lock: BuildLock,
    *,
    teacher_checkpoint: str | Path,
    source: DetectionSource,
    policy: SelectionPolicy,
    views: list[View] | None,
    canvas: int,
    out_dir: Path,
    batch_size: int,
    workers: int,
    shard: int | None,
    num_shards: int | None,
    with_importance: bool,
    importance_mode: dict | None,
    mirror_flips: bool,
    progress: bool,
    teacher_ap: float | None,
    check_teacher_on: DetectionSource | None,
    device: str | torch.device,
) -> Manifest:
    teacher, payload = load_detector(teacher_checkpoint)
    teacher.eval().requires_grad_(False).to(device)
    check_classes(payload, source.class_names, path=teacher_checkpoint, role="teacher", error=StoreError)
    top_k = policy.top_k if isinstance(policy.top_k, dict) else {}
    unknown = sorted((set(policy.per_level) | set(top_k) | set(policy.levels or ())) - set(teacher.levels))
    if unknown:
        raise StoreError(f"selection policy names level(s) {unknown}; the teacher's levels are {teacher.levels}")
    levels = policy.stored_levels(teacher.levels)
    strides = {lv: teacher.strides[lv] for lv in levels}
    channels = {lv: teacher.channels[lv] for lv in levels}
    views = list(views) if views is not None else ViewPolicy(sizes=(canvas,), flip_prob=0.5).all_views()
    if mirror_flips:  # a flipped view is served from its unflipped twin, which must be built
        views = sorted(set(views) | {View(size=v.size, flip=False) for v in views})
    too_big = [v.key for v in views if v.size > canvas]
    if too_big:
        raise StoreError(f"views {too_big} are larger than the {canvas}px canvas; raise the canvas")
    importance = None
    if with_importance:
        importance = {**DEFAULT_IMPORTANCE_MODE, **(importance_mode or {})}
        if any(not policy.selector_for(lv).serves_maps for lv in levels) or policy.channel_group != 1:
            raise StoreError(
                "--importance (stored GKD) needs a whole-map policy (--policy lowrank, or dense) and "
                "--channel-group 1: GKD imitates whole, full-width maps"
            )

    policy.check_channels(channels)
    stored_views = [v for v in views if not (mirror_flips and v.flip)]
    bases, encoding = None, {}
    if policy.needs_basis(levels):
        layout = {"strides": strides, "channels": channels, "importance": bool(importance)}
        bases, encoding, policy = _store_bases(
            teacher, source, policy, stored_views, canvas, out_dir, batch_size, device, layout, progress
        )
        if policy.budget_kb is not None:  # the ranks and dtype a budget chose, checked as a given policy is above
            policy.check_channels(channels)
    manifest = Manifest(
        teacher_hash=file_sha256(teacher_checkpoint),
        architecture=dict(teacher.spec),
        preprocessing={
            **preprocessing_of(teacher, canvas=canvas, views=views),
            "mirror_flips": bool(mirror_flips),
            "importance": importance or False,
        },
        levels=levels,
        strides=strides,
        channels=channels,
        feature_shapes={lv: shape for lv, shape in _feature_shapes(teacher, canvas, device).items() if lv in strides},
        policy=policy.to_dict(),
        dtypes=layout_dtypes(policy.value_dtype),
        views=[v.to_dict() for v in views],
        dataset_fingerprint=source.fingerprint(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        encoding=encoding,
    )
    teacher_ap, ap_source = _teacher_ap(teacher, payload, teacher_ap, check_teacher_on, canvas, batch_size, device)
    indices = range(len(source)) if shard is None else shard_indices(len(source), shard=shard, num_shards=num_shards)
    with StoreWriter(out_dir, manifest, shard=shard, num_shards=num_shards, lock=lock) as writer:
        todo = [(i, v) for i in indices for v in stored_views if not writer.has(source.records[i].image_id, v)]
        total = len(indices) * len(stored_views)
        if total > len(todo):
            log.info("%s: %d of %d image-views already built, %d to go", out_dir, total - len(todo), total, len(todo))
        loader = DataLoader(
            PairDataset(source, todo, stored_views),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=PairCollate(Collate(canvas)),
        )
        t0 = time.perf_counter()
        skipped = 0
        with tqdm(
            total=total,
            initial=total - len(todo),
            desc="store build",
            unit="view",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            for batch, reads in loader:
                for read in reads:
                    record = source.records[read.index]
                    if read.error is None and read.digest is not None:  # a skipped image's bytes say nothing
                        writer.set_content(record.image_id, read.digest)
                    if read.error is not None:
                        writer.record_gap(record.image_id, read.view, file=str(record.file), reason=read.error)
                if len(batch):
                    for image_id, view, record in select_batch(teacher, batch.to(device), policy, importance, bases):
                        writer.write(image_id, view, record)
                skipped += batch.skipped
                bar.update(len(batch) + batch.skipped)
        seconds = time.perf_counter() - t0
        _hash_unhashed(writer, source, indices)
        if skipped:
            log.warning(
                "%d image-views skipped (unreadable images, see above): recorded as gaps in the manifest; "
                "rerun the build to retry them",
                skipped,
            )
        built = len(todo) - skipped
        extra = writer.extra
        if teacher_ap is not None:
            extra.update(teacher_ap=teacher_ap, teacher_ap_source=ap_source)
        extra.update(
            teacher_checkpoint=str(teacher_checkpoint),
            teacher_ap=extra.get("teacher_ap"),
            seconds=extra.get("seconds", 0.0) + seconds,
            built=extra.get("built", 0) + built,
            runs=extra.get("runs", 0) + 1,
            last_run={"built": built, "seconds": seconds, "image_views_per_second": built / max(seconds, 1e-9)},
        )
        extra["image_views_per_second"] = extra["built"] / max(extra["seconds"], 1e-9)
    log.info("%s: built %d image-views in %.1f s (%.1f/s)", out_dir, built, seconds, built / max(seconds, 1e-9))
    result = Manifest.from_dict(writer.manifest.to_dict())
    result.counts, result.extra = writer.counts, dict(writer.extra)  # a shard's own (the manifest's wait for merge)
    return result


def teacher_moments(
    teacher: Detector, source, views, canvas: int, fit_views: int, levels, batch_size: int, device, progress: bool
) -> dict[str, BasisFit]:
    """The channel moments of ``levels`` over the teacher's features of the first ``fit_views`` image views
    of ``source`` (valid cells only): what a lowrank store's bases and a budget's spectra are fitted on."""
    pairs = [(i, v) for i in range(len(source)) for v in views][:fit_views]
    loader = DataLoader(
        PairDataset(source, pairs, views), batch_size=batch_size, collate_fn=PairCollate(Collate(canvas))
    )

    def feature_batches():
        for batch, _ in tqdm(loader, desc="fit bases", unit="batch", disable=not progress, dynamic_ncols=True):
            if not len(batch):
                continue
            batch = batch.to(device)
            with torch.no_grad():
                feats = teacher.features(batch.images, batch.image_sizes)
            valid = {
                lv: [valid_cells(tuple(s), teacher.strides[lv], tuple(f.shape[-2:])) for s in batch.image_sizes]
                for lv, f in feats.items()
            }
            yield feats, valid

    return fit_moments(feature_batches(), levels=levels)


def _store_bases(teacher, source, policy, views, canvas, out_dir: Path, batch_size, device, layout: dict, progress):
    """The store's fitted bases, the manifest's ``encoding`` and the policy with a byte budget's ranks
    filled in: read from ``bases.pt`` when an earlier run or another shard wrote it, else fitted on the
    first ``policy.fit_views`` image views of the whole data set (not of a shard: every shard fits the same
    bases, and the first to save them wins). A budget is resolved from the spectra ``bases.pt`` keeps, so
    every shard and resumed run picks the same layout. ``layout``: the stored levels' strides and channels,
    and whether GKD importance maps are stored (they count against a budget too)."""
    levels = [lv for lv in layout["strides"] if policy.selector_for(lv).needs_basis]
    layout = {**layout, "where": str(out_dir)}
    chosen = None  # the budgeted policy this run resolved, if it fitted the bases
    if not (out_dir / BASES).is_file():
        fits = teacher_moments(teacher, source, views, canvas, policy.fit_views, levels, batch_size, device, progress)
        spectra = {lv: fits[lv].spectrum() for lv in levels} if policy.budget_kb is not None else None
        chosen = fit_to_budget(policy, spectra, **layout) if spectra is not None else None
        ranks = {lv: (chosen or policy).rank_for(lv) for lv in levels}
        if save_bases(out_dir, {lv: fits[lv].basis(ranks[lv]) for lv in levels}, spectra):
            log.info(
                "%s: fitted bases of ranks %s on %d image views",
                out_dir,
                ranks,
                min(policy.fit_views, len(source) * len(views)),
            )
    sha = bases_sha256(out_dir)
    bases = load_bases(out_dir, sha256=sha)
    if policy.unresolved_budget:
        if chosen is None and (spectra := load_spectra(out_dir, sha256=sha)) is None:
            raise StoreError(f"{out_dir / BASES}: fitted without a byte budget; build a budgeted store elsewhere")
        policy = chosen or fit_to_budget(policy, spectra, **layout)
    wrong = {lv: b.rank for lv, b in bases.items() if lv in levels and b.rank != policy.rank_for(lv)}
    if wrong:
        raise StoreError(f"{out_dir / BASES}: ranks {wrong} differ from the policy's; build this policy elsewhere")
    pooled = any(k > 1 for k in policy.pool.values())
    int2 = policy.value_dtype == "int2"
    return (
        bases,
        encoding_entry(rank=policy.rank, fit_views=policy.fit_views, sha256=sha, pooled=pooled, int2=int2),
        policy,
    )


def _teacher_ap(
    teacher: Detector, payload: dict, given: float | None, val: DetectionSource | None, canvas: int, batch_size, device
) -> tuple[float | None, str | None]:
    """The teacher's AP and where it comes from: given, the checkpoint's metrics, or measured on ``val``;
    warned about when weak (the same warning as online distillation's)."""
    ap, where = given, "given with --teacher-ap"
    if ap is None:
        ap, where = (payload.get("metrics") or {}).get("AP"), "recorded in the checkpoint"
    if ap is None and val is not None:
        ap, ap50 = measure_teacher_ap(
            teacher, val, ViewPolicy(sizes=(canvas,)), batch_size=batch_size, workers=0, device=device
        )
        where = "measured on the validation split at build time"
        log.info("teacher on the validation split: AP %.4f, AP50 %.4f", ap, ap50)
    if ap is None:
        log.warning(
            "the teacher's AP is unknown (not in the checkpoint): a weak teacher cannot be flagged; pass "
            "--teacher-ap or --check-teacher to record it in the store"
        )
        return None, None
    warn_if_weak_teacher(ap, where=where)
    return float(ap), where


def _hash_unhashed(writer: StoreWriter, source: DetectionSource, indices) -> None:
    # Images whose records a killed earlier run committed before it saved their digests: hash them now.
    for i in indices:
        record = source.records[i]
        if str(record.image_id) not in writer.content and writer.has_image(record.image_id):
            digest = content_digest(record.file)
            if digest is not None:
                writer.set_content(record.image_id, digest)


def _feature_shapes(teacher: Detector, canvas: int, device) -> dict[str, list[int]]:
    # Probed, not computed from strides: the levels' padding arithmetic is the backbone's business.
    with torch.no_grad():
        feats = teacher.features(torch.zeros(1, 3, canvas, canvas, device=device), [(canvas, canvas)])
    return {lv: list(f.shape[-2:]) for lv, f in feats.items()}
