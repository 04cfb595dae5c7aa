"""Image content in a store's identity: a hash of every image file's bytes, checked when a run starts.

The data-set fingerprint covers ids, file names, sizes, boxes and labels, not pixels, so a store
would otherwise be accepted for other images with the same annotations. The build hashes each
image file while it reads the image anyway (``content_digest``) and keeps {image_id: digest} in
``content.json`` (``content-shard-NNNN.json`` per shard until merged). A run compares the digests
of the images it trains on (all of them up to ``CHECK_ALL_UP_TO``, an evenly spaced deterministic
sample above) and refuses the store naming the first differing image. Stores built before content
hashes are still read, with a note that their content was not checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from detkd.data.formats.base import DetectionSource
from detkd.store.format import StoreError
from detkd.store.manifest import write_json_atomic

log = logging.getLogger(__name__)

CONTENT = "content.json"
ALGORITHM = "sha256 of the image file's bytes"
# Run-start check: every image up to this many; an evenly spaced sample of this many above (see README
# for the measured cost: the check reads each checked file once).
CHECK_ALL_UP_TO = 2000
_CHUNK = 1 << 20


def content_digest(path: str | Path) -> str | None:
    """sha256 hex of a file's bytes; None if it cannot be read (the loader reports that image itself)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def content_file(shard: int | None) -> str:
    return CONTENT if shard is None else f"content-shard-{shard:04d}.json"


def load_content(path: Path) -> dict[str, str]:
    """{str(image_id): digest} of one content file ({} if absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data["images"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreError(f"{path}: damaged content hashes (not the JSON detkd writes); rebuild the store") from None


def save_content(path: Path, images: dict[str, str]) -> None:
    write_json_atomic(path, {"algorithm": ALGORITHM, "images": dict(sorted(images.items(), key=lambda kv: int(kv[0])))})


def store_content(store_dir: str | Path) -> dict[str, str] | None:
    """The store's image digests (merged and unmerged shards together); None for a store without any."""
    store_dir = Path(store_dir)
    files = [store_dir / CONTENT, *sorted(store_dir.glob("content-shard-*.json"))]
    if not any(f.is_file() for f in files):
        return None
    out: dict[str, str] = {}
    for f in files:
        out.update(load_content(f))
    return out


def sample_for_check(source: DetectionSource, limit: int = CHECK_ALL_UP_TO) -> list[int]:
    """Indices of ``source`` whose content a run checks: all, or ``limit`` evenly spaced by image id."""
    order = sorted(range(len(source)), key=lambda i: source.records[i].image_id)
    if len(order) <= limit:
        return order
    step = len(order) / limit
    return [order[int(k * step)] for k in range(limit)]


def check_content(store_dir: str | Path, source: DetectionSource, *, limit: int = CHECK_ALL_UP_TO) -> int:
    """Refuse a store built on other pixels, naming the first differing image; returns the images checked.

    Images the store has no digest for (skipped at build) and files that cannot be read now (the
    loader skips and reports them) are not compared.
    """
    stored = store_content(store_dir)
    if stored is None:
        log.info("%s: built before content hashes: the images' content was not checked against it", store_dir)
        return 0
    t0 = time.perf_counter()
    checked = 0
    for i in sample_for_check(source, limit):
        record = source.records[i]
        want = stored.get(str(record.image_id))
        if want is None:
            continue
        got = content_digest(record.file)
        if got is None:
            continue
        checked += 1
        if got != want:
            raise StoreError(
                f"{store_dir} was built on other pixels: image {record.image_id} ({record.file}) differs from "
                "the image the store was built on (its content hash differs); point the run at the images the "
                "store was built on, or rebuild the store with `detkd store build` on these"
            )
    seconds = time.perf_counter() - t0
    log.info("%s: image content checked: %d of %d images in %.2f s", store_dir, checked, len(source), seconds)
    return checked
