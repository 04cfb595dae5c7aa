"""The knowledge-store manifest: a store's identity (teacher, preprocessing, data set, levels, policy),
its counts and build facts, and the check that a store matches a run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from detkd import __version__
from detkd.models.checkpoint import file_sha256  # noqa: F401  (re-exported: the store's teacher hash)
from detkd.store.format import DEFAULT_DTYPES, FORMAT_VERSION, StoreError, os_error

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON so a reader never sees a half-written file (temp file + fsync + os.replace).

    A failed write (disk full, no permission) removes its temp file and raises StoreError naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(path, exc) from None


def not_a_store(path: str | Path) -> str:
    """Why ``path`` (which has no manifest) cannot be read as a store, and what to do."""
    if Path(path).is_dir():
        return (
            f"{path}: not a detkd store: a directory without {MANIFEST} (not a store, or a build interrupted "
            f"before it started writing: resume it with `detkd store build ... --out {path}`)"
        )
    return f"{path}: not a detkd store (no {MANIFEST})"


def fingerprint(obj) -> str:
    """sha256 of an object's canonical JSON (e.g. a preprocessing dict or a data-set listing)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canon(x):
    # JSON round trip: tuples and lists compare equal, as they will after the manifest is read back.
    return json.loads(json.dumps(x, sort_keys=True))


_ADVICE = {
    "teacher_hash": "the store was built from a different teacher checkpoint: pass the checkpoint it was "
    "built from, or rebuild the store with `detkd store build --teacher <checkpoint>`",
    "preprocessing": "the run resizes or normalises images differently from the build: use the store's "
    "preprocessing settings, or rebuild the store",
    "dataset_fingerprint": "the store was built for a different data set (or split/version of it): point the "
    "run at that data set, or rebuild the store for this one",
    "levels": "the store lacks feature levels this run distills: distill only the stored levels, or rebuild",
    "strides": "a level's stride differs between the store and this run's teacher/student: check the architecture",
    "channels": "a level's channel count differs between the store and this run's teacher: check the architecture",
}
# Fields that change while a store is built or resumed (or only describe the build); everything
# else is its identity.
_VOLATILE = ("counts", "created", "tool_version", "complete", "extra", "gaps")


@dataclass
class Manifest:
    """Everything needed to decide whether a store matches a run, and to size its contents."""

    teacher_hash: str
    architecture: dict
    preprocessing: dict
    levels: list[str]
    strides: dict[str, int]
    channels: dict[str, int]  # teacher channels C per level, before channel pooling
    feature_shapes: dict[str, list[int]]  # (H, W) per level on the batch canvas
    policy: dict
    views: list[dict]
    dataset_fingerprint: str
    counts: dict[str, int] = field(default_factory=lambda: {"images": 0, "records": 0, "bytes": 0})
    dtypes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DTYPES))
    format_version: int = FORMAT_VERSION
    created: str = ""
    tool_version: str = __version__
    complete: bool = False  # set when a writer (or merge_shards) closed cleanly
    extra: dict = field(default_factory=dict)  # build facts (teacher AP, build seconds, rate): not identity
    # Image views the build skipped (unreadable images): {"image_id", "file", "view", "reason"} each.
    # A store with gaps can be complete; ``verify`` fails on them unless they are accepted.
    gaps: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.levels = list(self.levels)
        for name in ("strides", "channels", "feature_shapes"):
            missing = [lv for lv in self.levels if lv not in getattr(self, name)]
            if missing:
                raise StoreError(f"manifest: {name} has no entry for level(s) {missing}")
        self.feature_shapes = {k: [int(v[0]), int(v[1])] for k, v in self.feature_shapes.items()}

    def to_dict(self) -> dict:
        return _canon(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, *, source: str = MANIFEST) -> Manifest:
        version = d.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{source}: store format v{version} is newer than this detkd reads (v{FORMAT_VERSION}); upgrade detkd"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - d.keys())
        if missing:
            raise StoreError(f"{source}: manifest lacks field(s) {missing}; the store is damaged or not a detkd store")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{source}: not valid JSON ({exc}); the store's manifest is damaged") from None
        return cls.from_dict(d, source=source)

    @classmethod
    def load(cls, store_dir: str | Path) -> Manifest:
        path = Path(store_dir) / MANIFEST
        if not path.is_file():
            raise StoreError(not_a_store(store_dir))
        return cls.from_json(path.read_text(), source=str(path))

    def save(self, store_dir: str | Path) -> None:
        write_json_atomic(Path(store_dir) / MANIFEST, self.to_dict())

    def identity_diff(self, other: Manifest) -> list[str]:
        """Fields (other than counts, timestamps, tool version, completeness) that differ."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a.keys() | b.keys() if k not in _VOLATILE and a.get(k) != b.get(k))

    def check_compatible(
        self,
        *,
        teacher_hash: str | None = None,
        preprocessing: dict | None = None,
        dataset_fingerprint: str | None = None,
        levels: list[str] | None = None,
        strides: dict[str, int] | None = None,
        channels: dict[str, int] | None = None,
    ) -> None:
        """Raise StoreError listing every given field that does not match, and what to do."""
        problems: list[tuple[str, str]] = []
        if teacher_hash is not None and teacher_hash != self.teacher_hash:
            problems.append(("teacher_hash", f"store has {self.teacher_hash!r}, this run has {teacher_hash!r}"))
        if preprocessing is not None and _canon(preprocessing) != _canon(self.preprocessing):
            ours, theirs = _canon(self.preprocessing), _canon(preprocessing)
            keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            diff = "; ".join(f"{k}: store {ours.get(k)!r} vs run {theirs.get(k)!r}" for k in keys)
            problems.append(("preprocessing", diff))
        if dataset_fingerprint is not None and dataset_fingerprint != self.dataset_fingerprint:
            problems.append(
                ("dataset_fingerprint", f"store has {self.dataset_fingerprint!r}, this run has {dataset_fingerprint!r}")
            )
        if levels is not None:
            missing = [lv for lv in levels if lv not in self.levels]
            if missing:
                problems.append(("levels", f"store has {self.levels}, this run needs {missing}"))
        for name, given in (("strides", strides), ("channels", channels)):
            stored = getattr(self, name)
            bad = {lv: (stored[lv], v) for lv, v in (given or {}).items() if lv in stored and int(stored[lv]) != int(v)}
            if bad:
                problems.append((name, "; ".join(f"level {lv}: store {s} vs run {r}" for lv, (s, r) in bad.items())))
        if problems:
            lines = [f"{name} mismatch: {detail}. Fix: {_ADVICE[name]}" for name, detail in problems]
            raise StoreError("knowledge store does not match this run:\n  " + "\n  ".join(lines))
