"""Reading a knowledge store: random access from many processes, batch collation, verification, info.

Safe with DataLoader workers (fork or spawn) and with several processes reading at once: LMDB
handles are opened lazily, read-only and lock-free, once per process (``lmdb_env``). Lock-free
reading assumes nobody writes the store meanwhile: read finished stores only. Every environment's
data file is checked against its meta pages before it is mapped (``integrity``), in the process that
constructs a reader and again in each worker that opens it, so a truncated store is an error, not SIGBUS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from detkd.data.views import View
from detkd.distill.base import SparseCells, TeacherKnowledge
from detkd.store.codec import decode_levels
from detkd.store.format import (
    RECORDS,
    LevelRecord,
    StoreError,
    decode_record,
    parse_key,
    record_key,
)
from detkd.store.integrity import check_data_file
from detkd.store.lmdb_env import open_readonly
from detkd.store.manifest import Manifest
from detkd.store.select import SelectionPolicy
from detkd.store.writer import combine_extras, shard_problems, shard_status

log = logging.getLogger(__name__)


class StoreReader:
    """Random access to a store's records by (image_id, view). Picklable; cheap to construct."""

    def __init__(self, path: str | Path, *, verify: bool = True, check_files: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self.manifest = Manifest.load(self.path)
        merged = [self.path / RECORDS] if (self.path / RECORDS).is_dir() else []
        # Shards without a status file are leftovers of a finished merge (see merge_shards).
        shards = sorted(p for p in self.path.glob("shard-*.lmdb") if p.with_suffix(".json").is_file())
        self.env_paths = merged + shards
        if check_files:
            self.check_files()
        if not self.complete:
            log.warning("%s: the build of this store did not finish; some records may be missing", self.path)
        elif not merged:
            log.warning("%s: unmerged shards; reading all of them (merge_shards makes reads faster)", self.path)

    def check_files(self) -> None:
        """Raise StoreError unless every records file is there and holds the pages its meta pages claim
        (cheap: two page reads each). Readers in other processes check again when they open them."""
        if not self.env_paths:
            raise StoreError(f"{self.path}: the store holds no records ({RECORDS} is missing)")
        for env_path in self.env_paths:
            check_data_file(env_path)

    @property
    def policy(self) -> SelectionPolicy:
        # Stores written before value_dtype existed hold float16 values.
        return SelectionPolicy.from_dict({"value_dtype": "float16", **self.manifest.policy})

    @property
    def channel_group(self) -> int:
        return int(self.manifest.policy.get("channel_group", 1))

    @property
    def complete(self) -> bool:
        """The build finished: a closed single writer, a finished merge, or every shard's writer closed."""
        return self.manifest.complete or not shard_problems(shard_status(self.path))

    @property
    def counts(self) -> dict[str, int]:
        """Counts the build recorded: the manifest's, or the shards' totals before merging."""
        status = shard_status(self.path)
        if self.manifest.complete or not status:
            return dict(self.manifest.counts)
        total = {"images": 0, "records": 0, "bytes": 0}
        for s in status:
            for k, v in s["counts"].items():
                total[k] += v
        return total

    @property
    def extra(self) -> dict:
        """Build facts (teacher_ap, seconds, image_views_per_second, ...): the manifest's, or the shards' combined."""
        status = shard_status(self.path)
        if self.manifest.extra or not status:
            return dict(self.manifest.extra)
        return combine_extras([s.get("extra", {}) for s in status])

    @property
    def gaps(self) -> list[dict]:
        """Image views the build skipped ({"key", "image_id", "file", "view", "reason"}): the manifest's,
        or the shards' before merging."""
        status = shard_status(self.path)
        if self.manifest.complete or not status:
            return list(self.manifest.gaps)
        return sorted((g for s in status for g in s.get("gaps", [])), key=lambda g: g["key"])

    def _envs(self):
        return [open_readonly(p) for p in self.env_paths]

    def read_arrays(self, key: str) -> dict[str, torch.Tensor] | None:
        """The named arrays of one record, or None if absent."""
        raw = key.encode()
        for env in self._envs():
            with env.begin(buffers=True) as txn:
                value = txn.get(raw)
                if value is not None:
                    # Decode (which copies) before the transaction ends: the buffer is only valid inside it.
                    return decode_record(value, verify=self.verify, key=f"{self.path}:{key}")
        return None

    def read(self, image_id: int, view: View) -> dict[str, LevelRecord]:
        """{level: LevelRecord} of one image view (tensors on CPU, stored dtypes)."""
        arrays = self.read_arrays(record_key(image_id, view))
        if arrays is None:
            held = [v.key for v in self.views_for(image_id)]
            hint = (
                f"it holds views {held} for this image"
                if held
                else ("it holds nothing for this image: was it built for this data set, and did the build finish?")
            )
            raise StoreError(f"{self.path}: no record for image {image_id} view {view.key}; {hint}")
        return decode_levels(arrays, feature_shapes=self.manifest.feature_shapes)

    def views_for(self, image_id: int) -> list[View]:
        prefix = f"{int(image_id)}/".encode()
        views: set[View] = set()
        for env in self._envs():
            with env.begin() as txn:
                cursor = txn.cursor()
                if cursor.set_range(prefix):
                    for key in cursor.iternext(keys=True, values=False):
                        if not key.startswith(prefix):
                            break
                        views.add(parse_key(key)[1])
        return sorted(views)

    def keys(self) -> Iterator[str]:
        """Every record key "<image_id>/<view key>", each once."""
        envs = self._envs()
        seen: set[bytes] | None = set() if len(envs) > 1 else None
        for env in envs:
            with env.begin() as txn:
                for key in txn.cursor().iternext(keys=True, values=False):
                    if seen is not None:
                        if key in seen:
                            continue
                        seen.add(key)
                    yield key.decode()

    def __len__(self) -> int:
        return sum(env.stat()["entries"] for env in self._envs())

    def __contains__(self, item: str | tuple[int, View]) -> bool:
        key = item if isinstance(item, str) else record_key(*item)
        raw = key.encode()
        for env in self._envs():
            with env.begin(buffers=True) as txn:
                if txn.get(raw) is not None:
                    return True
        return False

    def to_knowledge(
        self,
        records: Sequence[dict[str, LevelRecord] | None],
        *,
        feature_shapes: dict[str, tuple[int, int]] | None = None,
        device: torch.device | str | None = None,
    ) -> TeacherKnowledge:
        """Collate one batch's records (``feature_shapes`` defaults to the manifest's canvas)."""
        shapes = feature_shapes or {k: tuple(v) for k, v in self.manifest.feature_shapes.items()}
        return collate_knowledge(records, feature_shapes=shapes, channel_group=self.channel_group, device=device)


def collate_knowledge(
    records: Sequence[dict[str, LevelRecord] | None],
    *,
    feature_shapes: dict[str, tuple[int, int]],
    channel_group: int,
    device: torch.device | str | None = None,
) -> TeacherKnowledge:
    """Per-sample records of one batch (sample i = batch index i) -> TeacherKnowledge.

    Sparse levels become SparseCells (int64 yx, float32 values and score, batch_index concatenated
    in sample order). Dense levels become float32 [B, C', H, W] with each stored valid region placed
    top-left, zeros elsewhere (mask the padding with ``valid_cell_mask``). A None record or a missing
    level contributes no cells; a dense level needs a record for every sample.
    """
    levels = list(dict.fromkeys([lv for r in records if r for lv in r]))
    cells: dict[str, SparseCells] = {}
    dense: dict[str, torch.Tensor] = {}
    for level in levels:
        present = [(i, r[level]) for i, r in enumerate(records) if r and level in r]
        kinds = {rec.is_dense for _, rec in present}
        if len(kinds) > 1:
            raise StoreError(f"level {level!r} is dense in some records and sparse in others")
        if kinds == {True}:
            if len(present) != len(records):
                raise StoreError(f"level {level!r} is dense but {len(records) - len(present)} sample(s) lack it")
            if level not in feature_shapes:
                raise StoreError(f"level {level!r}: no feature shape given to place its dense maps on")
            h, w = feature_shapes[level]
            c = present[0][1].dense.shape[0]
            out = torch.zeros((len(records), c, h, w), dtype=torch.float32)
            for i, rec in present:
                d = rec.dense
                if d.shape[0] != c or d.shape[1] > h or d.shape[2] > w:
                    raise StoreError(
                        f"level {level!r}: stored map {tuple(d.shape)} does not fit the batch's "
                        f"{c} x {h} x {w} feature canvas"
                    )
                out[i, :, : d.shape[1], : d.shape[2]] = d.float()
            dense[level] = out
            continue
        counts = [rec.num_cells for _, rec in present]
        width = present[0][1].values.shape[1] if present else 0
        with_score = all(rec.score is not None for _, rec in present)
        cells[level] = SparseCells(
            batch_index=torch.repeat_interleave(
                torch.tensor([i for i, _ in present], dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)
            ),
            yx=torch.cat([rec.yx.long() for _, rec in present]) if present else torch.zeros((0, 2), dtype=torch.int64),
            values=torch.cat([rec.values.float() for _, rec in present]) if present else torch.zeros((0, width)),
            score=torch.cat([rec.score.float() for _, rec in present]) if present and with_score else None,
        )
    knowledge = TeacherKnowledge(features=dense or None, cells=cells or None, channel_group=channel_group)
    if device is not None:
        knowledge = _to_device(knowledge, device)
    return knowledge


def _to_device(k: TeacherKnowledge, device: torch.device | str) -> TeacherKnowledge:
    features = {lv: t.to(device, non_blocking=True) for lv, t in k.features.items()} if k.features else None
    cells = None
    if k.cells:
        cells = {
            lv: SparseCells(
                batch_index=c.batch_index.to(device, non_blocking=True),
                yx=c.yx.to(device, non_blocking=True),
                values=c.values.to(device, non_blocking=True),
                score=None if c.score is None else c.score.to(device, non_blocking=True),
            )
            for lv, c in k.cells.items()
        }
    return TeacherKnowledge(features=features, cells=cells, channel_group=k.channel_group)


def mirror_levels(
    record: dict[str, LevelRecord], *, image_size: tuple[int, int], strides: dict[str, int]
) -> dict[str, LevelRecord]:
    """Approximate the flipped view's record from the unflipped one's: x' = ceil(w / s) - 1 - x for
    cells, a horizontal flip for dense maps (their stored width is already the valid width) and for
    a dense level's extras of the map's spatial shape (e.g. GKD importance maps [1, h, w]); other
    extras (per-channel weights, per-cell arrays) are passed through. Conv features are only roughly
    flip-equivariant, so this is an approximation of the flipped view's record."""
    w = int(image_size[1])
    out: dict[str, LevelRecord] = {}
    for level, rec in record.items():
        if rec.is_dense:
            hw = tuple(rec.dense.shape[-2:])
            extras = {k: v.flip(-1) if v.dim() == 3 and tuple(v.shape[-2:]) == hw else v for k, v in rec.extras.items()}
            out[level] = LevelRecord(dense=rec.dense.flip(-1), extras=extras)
            continue
        yx = rec.yx.clone() if rec.yx is not None else None
        if yx is not None:
            valid_w = -(-w // int(strides[level]))
            yx[:, 1] = valid_w - 1 - yx[:, 1]
        out[level] = LevelRecord(yx=yx, values=rec.values, score=rec.score, extras=dict(rec.extras))
    return out


def __getattr__(name: str):
    # verify_store / store_info / VerifyReport live in detkd.store.verify; imports from here keep working.
    if name in ("VerifyReport", "verify_store", "store_info"):
        from detkd.store import verify

        return getattr(verify, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
