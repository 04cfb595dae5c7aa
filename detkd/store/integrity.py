"""Checks an LMDB data file before LMDB maps it: a short or garbage file must give a message, not SIGBUS.

LMDB memory-maps ``data.mdb`` and trusts it: reading a page past the end of a truncated file
raises SIGBUS, which kills the process before Python can say anything. So every path that opens
a store environment first reads the two meta pages with plain file reads (never the map), checks
that they parse, and that the file holds every page the committed meta page says is in use:
``(last_pgno + 1) * page_size <= file size``. That costs two small reads per environment and process.

``deep_check`` walks every page offline (py-lmdb's pure-Python verifier, which never maps the
file); ``detkd store verify`` runs it, so interior damage is reported, not crashed on.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from detkd.store.format import StoreError

DATA_FILE = "data.mdb"
_MAGIC = 0xBEEFC0DE
_VERSION = 1  # LMDB 0.9's data version (py-lmdb bundles 0.9)
_PAGE_HEADER = 16  # 64-bit LMDB 0.9: pgno u64, pad u16, flags u16, lower/upper u16 x 2
_P_META = 0x08
_MIN_META_BYTES = _PAGE_HEADER + 152  # MDB_meta through mm_txnid
_MIN_PAGE = 4096  # the page size LMDB uses on Linux/macOS: two meta pages at least


@dataclass(frozen=True)
class MetaPage:
    txnid: int
    last_pgno: int
    page_size: int


def _parse_meta(buf: bytes, index: int, path: Path) -> MetaPage:
    if len(buf) < _MIN_META_BYTES:
        raise StoreError(f"{path} is damaged: meta page {index} is cut short; the store must be rebuilt")
    (flags,) = struct.unpack_from("<H", buf, 10)
    magic, version = struct.unpack_from("<II", buf, _PAGE_HEADER)
    if magic != _MAGIC or not flags & _P_META:
        raise StoreError(
            f"{path} is not an LMDB data file (meta page {index} is garbage): the store is damaged; rebuild it"
        )
    if version != _VERSION:
        raise StoreError(f"{path}: LMDB data version {version}, this detkd reads version {_VERSION}")
    m = _PAGE_HEADER
    (page_size,) = struct.unpack_from("<I", buf, m + 24)  # mm_psize aliases the free DB's md_pad
    last_pgno, txnid = struct.unpack_from("<QQ", buf, m + 24 + 2 * 48)
    return MetaPage(txnid=txnid, last_pgno=last_pgno, page_size=page_size)


def _truncated(path: Path, size: int, needed: int) -> str:
    return f"{path} is truncated: {size} bytes, the store needs at least {needed}; rebuild the store"


def check_data_file(env_dir: str | Path) -> MetaPage:
    """Raise StoreError naming ``env_dir/data.mdb`` unless it is an LMDB file holding every page it claims.

    Returns the committed meta page (the one with the higher transaction id, as LMDB picks it).
    """
    path = Path(env_dir) / DATA_FILE
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < _MIN_META_BYTES:
                raise StoreError(_truncated(path, size, 2 * _MIN_PAGE))
            first = _parse_meta(fh.read(_MIN_META_BYTES), 0, path)
            page = first.page_size
            if page < 256 or page & (page - 1) or page > 1 << 16:
                raise StoreError(f"{path} is damaged: implausible page size {page}; rebuild the store")
            if size < page + _MIN_META_BYTES:  # meta page 1 is gone: meta page 0 still bounds what is needed
                raise StoreError(_truncated(path, size, max(2 * page, (first.last_pgno + 1) * page)))
            fh.seek(page)
            second = _parse_meta(fh.read(_MIN_META_BYTES), 1, path)
    except FileNotFoundError:
        raise StoreError(f"{env_dir}: no LMDB environment here (missing {DATA_FILE})") from None
    meta = second if second.txnid > first.txnid else first
    if second.page_size != page:
        raise StoreError(f"{path} is damaged: its meta pages disagree on the page size; rebuild the store")
    needed = (meta.last_pgno + 1) * page
    if size < needed:
        raise StoreError(_truncated(path, size, needed))
    return meta


def deep_check(env_dir: str | Path) -> list[str]:
    """Every structural problem of ``env_dir/data.mdb`` found by reading all its pages (no map)."""
    path = Path(env_dir) / DATA_FILE
    try:
        from lmdb.verify import VerifyError, verify
    except ImportError:  # py-lmdb before its offline verifier: the meta-page check above still ran
        return []
    try:
        problems = verify(str(path))
    except VerifyError as exc:
        return [f"{path}: {exc}"]
    return [f"{path}: {p}" for p in problems]
