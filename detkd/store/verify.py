"""Checking a store: ``verify_store`` re-reads every record, ``store_info`` says what a store holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from detkd.data.views import View
from detkd.store.codec import decode_levels
from detkd.store.format import StoreError, decode_record, parse_key
from detkd.store.integrity import deep_check
from detkd.store.lmdb_env import iter_items
from detkd.store.projection import projected_record_bytes
from detkd.store.reader import StoreReader
from detkd.store.writer import shard_problems, shard_status


@dataclass
class VerifyReport:
    path: str
    records: int = 0
    images: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    gaps: int = 0  # skipped image views accepted with allow_gaps

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.path}: {self.records} records, {self.images} images, {self.bytes} bytes"
        if self.ok:
            return head + (f": OK ({self.gaps} skipped image-view(s) accepted)" if self.gaps else ": OK")
        shown = self.errors[:20]
        more = [f"... and {len(self.errors) - 20} more"] if len(self.errors) > 20 else []
        return "\n".join([head + f": {len(self.errors)} problem(s)", *("  " + e for e in shown + more)])


def gap_lines(gaps: list[dict], limit: int = 10) -> list[str]:
    """One line per skipped image view (the first ``limit``)."""
    lines = [f"image {g['image_id']} ({g['file']}) view {g['view']}: {g['reason']}" for g in gaps[:limit]]
    return lines + ([f"... and {len(gaps) - limit} more"] if len(gaps) > limit else [])


def verify_store(path: str | Path, *, allow_gaps: bool = False) -> VerifyReport:
    """Re-read every record: checksum, decodability, levels and views against the manifest, counts.

    Every LMDB file is first walked offline (``integrity.deep_check``), never mapped if damaged.
    Image views the build skipped fail the check unless ``allow_gaps``.
    """
    report = VerifyReport(path=str(path))
    try:
        reader = StoreReader(path, verify=True)
    except StoreError as exc:
        report.errors.append(str(exc))
        return report
    for env_path in reader.env_paths:
        report.errors += deep_check(env_path)
    if report.errors:  # LMDB would crash on what the walk found: do not let it read the records
        return report
    gaps = reader.gaps
    if gaps and allow_gaps:
        report.gaps = len(gaps)
    elif gaps:
        report.errors.append(
            f"{len(gaps)} image-view(s) were skipped by the build (unreadable images); rerun the build to retry "
            "them, or pass --allow-gaps to accept a store without them:\n    " + "\n    ".join(gap_lines(gaps))
        )
    manifest = reader.manifest
    levels = set(manifest.levels)
    views = {View.from_dict(v).key for v in manifest.views}
    image_ids: set[int] = set()
    seen: set[bytes] = set()
    for env in reader._envs():
        for key, value in iter_items(env):
            if key in seen:  # the same record in a shard and the merged store (interrupted merge)
                continue
            seen.add(key)
            report.records += 1
            report.bytes += len(value)
            name = key.decode(errors="replace")
            try:
                image_id, view = parse_key(key)
                image_ids.add(image_id)
                arrays = decode_record(value, verify=True, key=name)
                record = decode_levels(arrays, feature_shapes=manifest.feature_shapes)
            except StoreError as exc:
                report.errors.append(str(exc))
                continue
            if view.key not in views:
                report.errors.append(f"record {name!r}: view {view.key} is not among the manifest's views")
            if set(record) - levels:
                report.errors.append(f"record {name!r}: unknown level(s) {sorted(set(record) - levels)}")
    report.images = len(image_ids)
    if not reader.complete:
        problems = shard_problems(shard_status(path)) if shard_status(path) else []
        detail = f" ({'; '.join(problems)})" if problems else ""
        report.errors.append(f"the build did not finish{detail}: rerun it to complete the store")
    expected = reader.counts
    found = {"images": report.images, "records": report.records, "bytes": report.bytes}
    for name, value in found.items():
        if expected.get(name) != value:
            report.errors.append(f"counts: manifest says {expected.get(name)} {name}, the store holds {value}")
    return report


def store_info(path: str | Path) -> dict:
    """What ``detkd store info`` prints: identity, policy, views, counts and the size against dense fp16.

    A damaged records file (truncated, garbage) is reported under "damaged" rather than raised, so
    ``info`` still shows what the manifest says.
    """
    reader = StoreReader(path, verify=False, check_files=False)
    try:
        reader.check_files()
        damaged = None
    except StoreError as exc:
        damaged = str(exc)
    m = reader.manifest
    counts = reader.counts
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    dense = sum(2 * m.channels[lv] * m.feature_shapes[lv][0] * m.feature_shapes[lv][1] for lv in m.levels)
    per_view = counts["bytes"] / counts["records"] if counts["records"] else 0.0
    return {
        "path": str(path),
        "format_version": m.format_version,
        "complete": m.complete,
        "damaged": damaged,
        "gaps": reader.gaps,
        "teacher_hash": m.teacher_hash,
        "dataset_fingerprint": m.dataset_fingerprint,
        "architecture": m.architecture,
        "policy": m.policy,
        "preprocessing": m.preprocessing,
        "extra": reader.extra,
        "levels": {
            lv: {"stride": m.strides[lv], "channels": m.channels[lv], "feature_shape": m.feature_shapes[lv]}
            for lv in m.levels
        },
        "views": [View.from_dict(v).key for v in m.views],
        "images": counts["images"],
        "records": counts["records"],
        "record_bytes": counts["bytes"],
        "disk_bytes": disk,
        "bytes_per_image_view": per_view,
        "dense_fp16_bytes_per_view": dense,
        "ratio_to_dense": per_view / dense if dense else float("nan"),
        "encoding": m.encoding,
        "kept_variance": _kept_variance(reader),
        "projected_coco": projected_record_bytes(m),
    }


def _kept_variance(reader: StoreReader) -> dict[str, float] | None:
    """Per level, the share of the fit sample's variance a lowrank store's basis keeps (None: not a
    lowrank store, bases unreadable, or fitted before it was recorded)."""
    try:
        bases = reader.bases
    except StoreError:
        return None
    if not bases or any(b.kept is None for b in bases.values()):
        return None
    return {lv: round(b.kept, 4) for lv, b in bases.items()}
