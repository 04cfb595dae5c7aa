"""The knowledge-store format: per-level records and their checksummed binary encoding (the
manifest is ``detkd.store.manifest``).

A store is a directory::

    manifest.json        format version, teacher / preprocessing / dataset identity, levels, policy, counts
    records.lmdb/        LMDB environment: key "<image_id>/<view.key>" -> encoded record
    shard-NNNN.lmdb/     (sharded builds before ``merge_shards``) one environment per build process
    shard-NNNN.json      (idem) {"shard", "num_shards", "counts", "complete": its writer closed cleanly}

An encoded record (all integers little-endian)::

    b"DK" | version u8 | blake2b-128 digest of the payload (16 bytes) | payload
    payload = n varint | n x (name_len u8, name utf-8, dtype u8, ndim u8, ndim x dim varint) | raw arrays, same order

Array names are ``"<level>/<part>"``: one-letter parts for cells, values, scores, dense maps,
low-rank coefficient maps and their integer scales (their layout is ``detkd.store.codec``'s), any
longer name for extra per-level arrays. Names are one letter because at the NMS-KSD operating
point a record is a few hundred bytes and headers count.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from detkd.data.views import View
from detkd.errors import DetkdError

FORMAT_VERSION = 1
RECORDS = "records.lmdb"
_MAGIC = b"DK"
_DIGEST = 16
_PREAMBLE = len(_MAGIC) + 1 + _DIGEST

# dtype codes of the binary encoding; never renumber (stores on disk use them).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f2"),
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("i1"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    8: np.dtype("?"),
}
_CODES = {dt.str: code for code, dt in _DTYPES.items()}
# What the manifest records of the record layout (stores written before the flat cell index say "yx": "int16").
DEFAULT_DTYPES = {
    "cell_index": "flat y*W+x, uint8 / int16 / int32 by map size",
    "values": "float16",
    "score": "float16",
    "dense": "float16",
}
_PARTS = {"i": "yx", "v": "values", "s": "score", "d": "dense", "c": "coefficients"}


class StoreError(DetkdError):
    """A knowledge store is missing, corrupt, incomplete or does not match the run."""


def os_error(path, exc: OSError) -> StoreError:
    """A disk-full / permission / I/O error while writing a store, said as such and naming the file
    (errors of ``write`` and ``fsync`` carry no file name of their own)."""
    reason = (exc.strerror or str(exc)).lower()
    hint = " (free some space, then rerun the same command: the build resumes)" if exc.errno in _NO_SPACE else ""
    return StoreError(f"{exc.filename or path}: {reason}{hint}")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def record_key(image_id: int, view: View) -> str:
    return f"{int(image_id)}/{view.key}"


def parse_key(key: str | bytes) -> tuple[int, View]:
    text = bytes(key).decode() if isinstance(key, bytes | bytearray | memoryview) else key
    image_id, _, view_key = str(text).partition("/")
    try:
        return int(image_id), View.from_key(view_key)
    except ValueError:
        raise StoreError(f"malformed record key {text!r}: expected '<image_id>/<view key>'") from None


@dataclass
class LevelRecord:
    """What the store holds for one level of one image view: sparse cells or a dense map."""

    yx: Tensor | None = None  # int16 [K, 2] cell (y, x) on the level's feature map
    values: Tensor | None = None  # float16 [K, C/r]
    score: Tensor | None = None  # float16 [K], selection score (saliency or detection score)
    dense: Tensor | None = None  # float16 [C/r, h, w], the valid (unpadded) region only
    # float16 [r, h, w]: the valid region as coefficients on the store's low-rank basis of the level
    coefficients: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def is_dense(self) -> bool:
        """A whole (valid) map, kept as such or as low-rank coefficients."""
        return self.dense is not None or self.coefficients is not None

    @property
    def map_hw(self) -> tuple[int, int] | None:
        """(h, w) of the stored valid map, for a dense record."""
        m = self.dense if self.dense is not None else self.coefficients
        return None if m is None else (int(m.shape[-2]), int(m.shape[-1]))

    @property
    def num_cells(self) -> int:
        return 0 if self.yx is None else int(self.yx.shape[0])

    def arrays(self) -> dict[str, Tensor]:
        """{part: tensor}: one-letter codes for the standard parts, extras under their own names."""
        short = [name for name in self.extras if len(name) < 2 or "/" in name]
        if short:
            raise StoreError(f"extra array name(s) {short} are reserved: use 2+ characters and no '/'")
        out = {code: getattr(self, name) for code, name in _PARTS.items() if getattr(self, name) is not None}
        out.update(self.extras)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, Tensor]) -> LevelRecord:
        """Inverse of ``arrays``."""
        rec = cls()
        for part, array in arrays.items():
            if part in _PARTS:
                setattr(rec, _PARTS[part], array)
            else:
                rec.extras[part] = array
        return rec

    def __reduce__(self):
        # DataLoader workers hand records to the trainer by pickling. A tensor travels as its own
        # shared-memory segment plus a file descriptor; a numpy array travels inline in the pickle.
        # Measured on the shapes store with 2 workers: 14 batches/s with tensors vs 61 for a loader
        # without records, which made stored distillation ~1.3x slower per epoch than the student alone.
        return (_record_from_numpy, ({k: _to_numpy(v) for k, v in self.arrays().items()},))


def _to_numpy(t: Tensor):
    """A CPU tensor as a numpy array when numpy has its dtype (bfloat16 has none: kept a tensor)."""
    if isinstance(t, Tensor) and t.device.type == "cpu" and t.dtype != torch.bfloat16 and not t.requires_grad:
        return t.numpy()
    return t


def _record_from_numpy(arrays: dict) -> LevelRecord:
    return LevelRecord.from_arrays(
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    )


def flatten_record(levels: dict[str, LevelRecord]) -> dict[str, Tensor]:
    """{level: LevelRecord} -> {"<level>/<part>": tensor}, the input of ``encode_record``."""
    return {f"{level}/{part}": array for level, rec in levels.items() for part, array in rec.arrays().items()}


def group_by_level(arrays: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{"<level>/<part>": array} -> {level: {part: array}}."""
    parts: dict[str, dict[str, Tensor]] = {}
    for name, array in arrays.items():
        level, sep, part = name.rpartition("/")
        if not sep:
            raise StoreError(f"record array {name!r} has no level prefix")
        parts.setdefault(level, {})[part] = array
    return parts


def unflatten_record(arrays: dict[str, Tensor]) -> dict[str, LevelRecord]:
    return {level: LevelRecord.from_arrays(p) for level, p in group_by_level(arrays).items()}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, pos


def _as_numpy(name: str, x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        try:
            x = x.detach().cpu().numpy()
        except TypeError:
            raise StoreError(f"array {name!r}: dtype {x.dtype} cannot be stored") from None
    x = np.asarray(x)
    return np.asarray(x, dtype=x.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray makes 0-d 1-d)


def encode_record(arrays: dict[str, np.ndarray | Tensor]) -> bytes:
    """Encode named arrays into one checksummed blob. Deterministic: names are sorted."""
    header = bytearray(_varint(len(arrays)))
    data = []
    for name in sorted(arrays):
        a = _as_numpy(name, arrays[name])
        code = _CODES.get(a.dtype.str)
        if code is None:
            raise StoreError(f"array {name!r}: dtype {a.dtype} cannot be stored")
        raw_name = name.encode()
        if len(raw_name) > 255 or a.ndim > 255:
            raise StoreError(f"array {name!r}: name longer than 255 bytes or more than 255 dimensions")
        header += struct.pack("<B", len(raw_name)) + raw_name + struct.pack("<BB", code, a.ndim)
        header += b"".join(_varint(d) for d in a.shape)
        data.append(a.tobytes())
    payload = bytes(header) + b"".join(data)
    digest = hashlib.blake2b(payload, digest_size=_DIGEST).digest()
    return _MAGIC + bytes([FORMAT_VERSION]) + digest + payload


def decode_record(blob: bytes | memoryview, *, verify: bool = True, key: str | None = None) -> dict[str, Tensor]:
    """Decode ``encode_record``'s output into tensors (copies: safe after an LMDB txn ends).

    With ``verify`` the payload's checksum is checked; any damage raises StoreError naming ``key``.
    """
    buf = memoryview(blob)
    where = f"record {key!r}" if key is not None else "record"
    if len(buf) < _PREAMBLE or bytes(buf[:2]) != _MAGIC:
        raise StoreError(f"{where}: not a detkd record (bad magic or truncated); the store is corrupt")
    if buf[2] != FORMAT_VERSION:  # the version byte is outside the checksum: accept only known versions
        raise StoreError(
            f"{where}: record format v{buf[2]} is not one this detkd reads (v{FORMAT_VERSION}); "
            f"the store is corrupt or from another detkd version"
        )
    payload = buf[_PREAMBLE:]
    if verify and hashlib.blake2b(payload, digest_size=_DIGEST).digest() != bytes(buf[3:_PREAMBLE]):
        raise StoreError(f"{where}: checksum mismatch, the stored bytes are damaged; rebuild this store")
    try:
        count, pos = _read_varint(payload, 0)
        specs = []
        for _ in range(count):
            n = payload[pos]
            name = bytes(payload[pos + 1 : pos + 1 + n]).decode()
            code, ndim = payload[pos + 1 + n], payload[pos + 2 + n]
            pos += 3 + n
            shape = []
            for _ in range(ndim):
                d, pos = _read_varint(payload, pos)
                shape.append(d)
            specs.append((name, _DTYPES[code], tuple(shape)))
        out: dict[str, Tensor] = {}
        for name, dtype, shape in specs:
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if pos + nbytes > len(payload):
                raise ValueError("truncated")
            a = np.frombuffer(payload, dtype=dtype, count=nbytes // dtype.itemsize, offset=pos).reshape(shape)
            out[name] = torch.from_numpy(a.astype(dtype.newbyteorder("="), copy=True))
            pos += nbytes
        if pos != len(payload):
            raise ValueError("trailing bytes")
    except (IndexError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{where}: cannot be decoded ({exc}); the store is corrupt") from None
    return out
