"""Writing a knowledge store: restartable, optionally sharded across build processes.

A record is committed in an LMDB transaction together with up to ``commit_every - 1`` others,
so a killed build loses at most the uncommitted ones and never leaves a partial record; run
the build again and it skips what ``has`` reports and redoes the rest.

Sharded builds: process i of n opens ``StoreWriter(out, manifest, shard=i, num_shards=n)`` and writes the
images ``shard_indices(len(dataset), shard=i, num_shards=n)`` gives it (index modulo n) into
``shard-000i.lmdb``. ``merge_shards(out)`` then copies every shard into ``records.lmdb`` and
removes the shards. A reader also reads an unmerged store (it looks up every shard), so merging
is an optimisation: one memory map and one lookup per read instead of n.

A writer holds the directory's build lock (``detkd.store.lock``) while it is open, records the
image views its build skipped (``gaps``) and the images' content digests (``detkd.store.content``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from detkd.data.views import View
from detkd.store.codec import encode_levels
from detkd.store.content import CONTENT, content_file, load_content, save_content
from detkd.store.format import RECORDS, LevelRecord, StoreError, encode_record, parse_key, record_key
from detkd.store.lmdb_env import INITIAL_MAP_SIZE, WritableEnv, iter_items, open_readonly, release
from detkd.store.lock import BuildLock
from detkd.store.manifest import MANIFEST, Manifest, write_json_atomic


def shard_name(shard: int) -> str:
    return f"shard-{shard:04d}"


def shard_indices(num_items: int, *, shard: int, num_shards: int) -> range:
    """The data-set indices shard ``shard`` of ``num_shards`` builds: index modulo num_shards."""
    if not 0 <= shard < num_shards:
        raise StoreError(f"shard {shard} is not in [0, {num_shards})")
    return range(shard, num_items, num_shards)


def _empty_counts() -> dict[str, int]:
    return {"images": 0, "records": 0, "bytes": 0}


def shard_status(store_dir: str | Path) -> list[dict]:
    """The status files of a sharded build: {"shard", "num_shards", "counts", "complete"} each."""
    return [json.loads(f.read_text()) for f in sorted(Path(store_dir).glob("shard-*.json"))]


def shard_problems(status: list[dict]) -> list[str]:
    """Why a sharded build is not finished (empty list: every shard of the build closed cleanly)."""
    if not status:
        return ["no shards"]
    sizes = {s["num_shards"] for s in status}
    if len(sizes) > 1:
        return [f"shards disagree on the number of shards: {sorted(sizes)}"]
    missing = sorted(set(range(sizes.pop())) - {s["shard"] for s in status})
    problems = [f"{shard_name(i)} is missing (its build never started)" for i in missing]
    problems += [
        f"{shard_name(s['shard'])} was not finished (its writer never closed)" for s in status if not s["complete"]
    ]
    return problems


class StoreWriter:
    """Writes records keyed by (image_id, view) into ``out_dir``.

    Opening a directory that already holds a store continues it if its manifest matches
    ``manifest`` (apart from counts, timestamps and tool version), and raises StoreError naming
    the differing fields otherwise. ``close()`` (or leaving a ``with`` block) commits what is
    pending and records the counts: in ``manifest.json`` for a single build, in
    ``shard-NNNN.json`` for a shard (``merge_shards`` totals them).

    ``lock``: the build lock the caller already holds (``build_store`` takes it before loading the
    teacher, so a second build is refused at once); without one the writer takes it and releases it
    when it closes. Raises StoreError when another build holds it.
    """

    def __init__(
        self,
        out_dir: str | Path,
        manifest: Manifest,
        *,
        shard: int | None = None,
        num_shards: int | None = None,
        commit_every: int = 64,
        initial_map_size: int = INITIAL_MAP_SIZE,
        lock: BuildLock | None = None,
    ) -> None:
        if commit_every < 1:
            raise StoreError(f"commit_every must be >= 1, got {commit_every}")
        if (shard is None) != (num_shards is None) or (shard is not None and not 0 <= shard < num_shards):
            raise StoreError(
                f"a sharded build needs 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}"
            )
        self.out_dir = Path(out_dir)
        self.shard = shard
        self.num_shards = num_shards
        self.commit_every = commit_every
        self._own_lock = None if lock is not None else BuildLock(self.out_dir, shard=shard).acquire()
        try:
            self._open(manifest, initial_map_size)
        except BaseException:
            self._release_lock()
            raise

    def _open(self, manifest: Manifest, initial_map_size: int) -> None:
        shard = self.shard
        self.manifest = self._adopt_manifest(manifest)
        name = RECORDS if shard is None else shard_name(shard) + ".lmdb"
        self._env = WritableEnv(self.out_dir / name, initial_map_size=initial_map_size)
        self._pending: dict[bytes, bytes] = {}
        self._levels = set(self.manifest.levels)
        self._views = {View.from_dict(v) for v in self.manifest.views}
        self._closed = False
        # Build facts (teacher AP, seconds, rate) kept beside the counts; a resumed build starts from the last ones.
        self.extra: dict = dict(self.manifest.extra) if shard is None else self._shard_status().get("extra", {})
        # Skipped image views by record key; a later build that stores one removes it.
        gaps = self.manifest.gaps if shard is None else self._shard_status().get("gaps", [])
        self.gaps: dict[str, dict] = {g["key"]: dict(g) for g in gaps}
        self._content_path = self.out_dir / content_file(shard)
        self.content: dict[str, str] = load_content(self._content_path)
        self._content_saved = dict(self.content)
        # Resume: count what earlier runs committed.
        self._records = self._bytes = 0
        self._image_ids: set[int] = set()
        for key, size in self._env.scan():
            self._records += 1
            self._bytes += size
            self._image_ids.add(parse_key(key)[0])
        self._write_status(complete=False)

    def _adopt_manifest(self, manifest: Manifest) -> Manifest:
        path = self.out_dir / MANIFEST
        if path.is_file():
            existing = Manifest.from_json(path.read_text(), source=str(path))
            diff = existing.identity_diff(manifest)
            if diff:
                raise StoreError(
                    f"{self.out_dir} already holds a store with a different {', '.join(diff)}; "
                    f"write to another directory, or delete it to rebuild"
                )
            return existing
        manifest = Manifest.from_dict(manifest.to_dict())  # a copy: counts and flags are ours to change
        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.counts = _empty_counts()
        manifest.complete = False
        manifest.save(self.out_dir)
        return manifest

    def _shard_status(self) -> dict:
        path = self.out_dir / f"{shard_name(self.shard)}.json"
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def _write_status(self, *, complete: bool) -> None:
        counts = {"images": len(self._image_ids), "records": self._records, "bytes": self._bytes}
        if self.content != self._content_saved:  # before the status: a store never lists unhashed images as done
            save_content(self._content_path, self.content)
            self._content_saved = dict(self.content)
        gaps = sorted(self.gaps.values(), key=lambda g: g["key"])
        if self.shard is None:
            self.manifest.counts = counts
            self.manifest.complete = complete
            self.manifest.extra = dict(self.extra)
            self.manifest.gaps = gaps
            self.manifest.save(self.out_dir)
        else:
            status = {
                "shard": self.shard,
                "num_shards": self.num_shards,
                "counts": counts,
                "complete": complete,
                "extra": dict(self.extra),
                "gaps": gaps,
            }
            write_json_atomic(self.out_dir / f"{shard_name(self.shard)}.json", status)

    def _release_lock(self) -> None:
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock = None

    def record_gap(self, image_id: int, view: View, *, file: str, reason: str) -> None:
        """Note an image view the build skipped (its image could not be read), for the manifest."""
        key = record_key(image_id, view)
        self.gaps[key] = {"key": key, "image_id": int(image_id), "file": str(file), "view": view.key, "reason": reason}

    def set_content(self, image_id: int, digest: str) -> None:
        """Record an image's content digest; refuses one that changed since an earlier run of this build."""
        old = self.content.get(str(image_id))
        if old is not None and old != digest:
            raise StoreError(
                f"{self.out_dir}: image {image_id} changed since this store was partly built (its content hash "
                "differs): the store would mix two versions of the data; build into a new directory"
            )
        self.content[str(image_id)] = digest

    @property
    def counts(self) -> dict[str, int]:
        """Committed records only (``flush`` first to include pending ones)."""
        return {"images": len(self._image_ids), "records": self._records, "bytes": self._bytes}

    def has(self, image_id: int, view: View) -> bool:
        key = record_key(image_id, view).encode()
        return key in self._pending or self._env.get(key) is not None

    def has_image(self, image_id: int) -> bool:
        """Some view of the image is stored or pending."""
        return int(image_id) in self._image_ids or any(parse_key(k)[0] == int(image_id) for k in self._pending)

    def write(self, image_id: int, view: View, record: dict[str, LevelRecord] | dict) -> None:
        """Queue one image view's record: {level: LevelRecord}, or flat named arrays for ``encode_record``."""
        if self._closed:
            raise StoreError(f"{self.out_dir}: writer is closed")
        if view not in self._views:
            raise StoreError(
                f"image {image_id}: view {view.key} is not among the manifest's views "
                f"{sorted(v.key for v in self._views)}; add it to the manifest's views"
            )
        if record and all(isinstance(v, LevelRecord) for v in record.values()):
            unknown = sorted(set(record) - self._levels)
            if unknown:
                raise StoreError(
                    f"record for image {image_id} view {view.key}: level(s) {unknown} are not in "
                    f"the manifest's levels {self.manifest.levels}"
                )
            record = encode_levels(
                record,
                feature_shapes=self.manifest.feature_shapes,
                value_dtype=self.manifest.policy.get("value_dtype", "float16"),
                pool=self.manifest.policy.get("pool"),
            )
        key = record_key(image_id, view)
        self._pending[key.encode()] = encode_record(record)
        self.gaps.pop(key, None)
        if len(self._pending) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit pending records in one transaction."""
        if not self._pending:
            return
        items = list(self._pending.items())
        previous = self._env.put_many(items)
        for (key, blob), old in zip(items, previous, strict=True):
            if old is None:
                self._records += 1
                self._bytes += len(blob)
                self._image_ids.add(parse_key(key)[0])
            else:
                self._bytes += len(blob) - len(old)
        self._pending.clear()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            self._env.close()
            self._write_status(complete=True)
            self._closed = True
        finally:
            self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Keep what was committed, but do not mark the store complete. Best effort: the error
            # being raised (a full disk, say) is the one to report, not a second one on the way out.
            try:
                for step in (self.flush, self._env.close, lambda: self._write_status(complete=False)):
                    with contextlib.suppress(Exception):
                        step()
                self._closed = True
            finally:
                self._release_lock()


def merge_shards(out_dir: str | Path, *, chunk: int = 1024) -> Manifest:
    """Copy every finished shard of ``out_dir`` into ``records.lmdb``, total the counts, remove the shards.

    Idempotent and restartable: shards are deleted only after the manifest records the merge. A key
    present in two shards must hold identical bytes (a rebuilt shard of the same teacher does).
    """
    out_dir = Path(out_dir)
    Manifest.load(out_dir)  # not a store: say so before the lock creates anything
    with BuildLock(out_dir):  # no shard may be writing while the shards are joined
        return _merge_locked(out_dir, chunk)


def _merge_locked(out_dir: Path, chunk: int) -> Manifest:
    manifest = Manifest.load(out_dir)
    # A shard is live while its status file exists; merging deletes the status file first, so a
    # directory without one is what an interrupted clean-up left behind.
    shards = sorted(p for p in out_dir.glob("shard-*.lmdb") if p.with_suffix(".json").is_file())
    leftovers = sorted(p for p in out_dir.glob("shard-*.lmdb") if not p.with_suffix(".json").is_file())
    if not shards:
        if not manifest.complete:
            raise StoreError(f"{out_dir}: no shards to merge and the build is not finished; rerun the build")
        for env_path in leftovers:
            shutil.rmtree(env_path)
        return manifest
    status = shard_status(out_dir)
    problems = shard_problems(status)
    if problems:
        raise StoreError(f"{out_dir}: cannot merge: {'; '.join(problems)}. Run those shards' builds, then merge")
    sink = WritableEnv(out_dir / RECORDS)
    try:
        for env_path in shards:
            batch: list[tuple[bytes, bytes]] = []
            for key, value in iter_items(open_readonly(env_path)):
                batch.append((key, bytes(value)))
                if len(batch) >= chunk:
                    _merge_batch(sink, batch, env_path)
                    batch = []
            _merge_batch(sink, batch, env_path)
            release(env_path)
        counts = _empty_counts()
        image_ids: set[int] = set()
        for key, size in sink.scan():
            counts["records"] += 1
            counts["bytes"] += size
            image_ids.add(parse_key(key)[0])
        counts["images"] = len(image_ids)
    finally:
        sink.close()
    content: dict[str, str] = load_content(out_dir / CONTENT)
    for s in status:
        content.update(load_content(out_dir / content_file(s["shard"])))
    if content:  # before the manifest says merged: shard files go after it
        save_content(out_dir / CONTENT, content)
    manifest.counts = counts
    manifest.complete = True
    manifest.extra = combine_extras([s.get("extra", {}) for s in status])
    manifest.gaps = sorted((g for s in status for g in s.get("gaps", [])), key=lambda g: g["key"])
    manifest.save(out_dir)
    for env_path in shards + leftovers:
        env_path.with_suffix(".json").unlink(missing_ok=True)
        shutil.rmtree(env_path)
    for s in status:
        (out_dir / content_file(s["shard"])).unlink(missing_ok=True)
        (out_dir / f"{shard_name(s['shard'])}.lock").unlink(missing_ok=True)  # no shard runs: we hold the lock
    return manifest


def combine_extras(extras: list[dict]) -> dict:
    """The build facts of a sharded build from its shards': shards run in parallel, so the build took
    the slowest shard's seconds and its rate is the shards' records over those seconds."""
    extras = [e for e in extras if e]
    if not extras:
        return {}
    out = {k: v for k, v in extras[0].items() if k not in ("last_run", "runs")}  # per-process facts
    ap = [e["teacher_ap"] for e in extras if e.get("teacher_ap") is not None]
    out["teacher_ap"] = ap[0] if ap else None
    if all("seconds" in e and "built" in e for e in extras):
        out["seconds"] = max(e["seconds"] for e in extras)
        out["built"] = sum(e["built"] for e in extras)
        out["image_views_per_second"] = out["built"] / max(out["seconds"], 1e-9)
    out["shards"] = len(extras)
    return out


def _merge_batch(sink: WritableEnv, batch: list[tuple[bytes, bytes]], source: Path) -> None:
    # Check before writing, so a conflict leaves the first copy in place for the next attempt too.
    for key, blob in batch:
        old = sink.get(key)
        if old is not None and old != blob:
            raise StoreError(
                f"record {key.decode()!r} of {source.name} differs from the one already merged; "
                f"two shards were built differently: rebuild the store"
            )
    if batch:
        sink.put_many(batch)
