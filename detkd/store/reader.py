"""Reading a knowledge store: random access to its records from many processes.

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
from detkd.knowledge import ChannelBasis, KnowledgeOffer, TeacherKnowledge
from detkd.store.bases import ENCODING_VERSION, load_bases
from detkd.store.codec import decode_levels
from detkd.store.collate import collate_knowledge
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
        self._bases: dict[str, ChannelBasis] | None = None
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

    def offer(self) -> KnowledgeOffer:
        """What this store can serve to methods (checked before training: ``distill.capabilities``)."""
        m = self.manifest
        return self.policy.offer(
            m.levels, importance=bool(m.preprocessing.get("importance")), describe=f"the store {self.path}"
        )

    @property
    def bases(self) -> dict[str, ChannelBasis] | None:
        """The fitted bases of a lowrank store (loaded once per process, checked against the manifest)."""
        encoding = self.manifest.encoding
        if not encoding.get("sha256"):
            return None
        if int(encoding.get("version", 1)) > ENCODING_VERSION:
            raise StoreError(
                f"{self.path}: lowrank encoding version {encoding['version']} is newer than this detkd reads "
                f"({ENCODING_VERSION}); upgrade detkd"
            )
        if self._bases is None:
            self._bases = load_bases(self.path, sha256=encoding["sha256"])
        return self._bases

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
        coefficients: bool = False,
    ) -> TeacherKnowledge:
        """Collate one batch's records (``feature_shapes`` defaults to the manifest's canvas); a lowrank
        store's maps are served as coefficients when ``coefficients`` allows (see ``collate_knowledge``)."""
        shapes = feature_shapes or {k: tuple(v) for k, v in self.manifest.feature_shapes.items()}
        return collate_knowledge(
            records,
            feature_shapes=shapes,
            channel_group=self.channel_group,
            device=device,
            bases=self.bases,
            coefficients=coefficients,
        )
