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
    # A named, versioned encoding beyond the record layout, e.g. lowrank's fitted bases
    # (``detkd.store.bases.encoding_entry``); {} for stores that need none (and those written before it).
    encoding: dict = field(default_factory=dict)

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
