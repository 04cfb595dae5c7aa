"""LMDB environments for the store: per-process read-only handles and growing writable ones.

py-lmdb refuses to open one environment twice in a process, and an environment must not be used
across fork. Read-only handles are therefore cached per process and shared by every StoreReader in
it; a forked child (a DataLoader worker) drops the handles it inherited and opens its own.
Every open first checks the data file against its meta pages (``integrity.check_data_file``):
LMDB maps the file, and a truncated one would kill the process with SIGBUS on the first read.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from detkd.store.format import StoreError, os_error
from detkd.store.integrity import check_data_file

MAX_READERS = 2048
INITIAL_MAP_SIZE = 64 << 20  # grows by doubling on demand; LMDB does not preallocate the file on Linux/macOS

_readonly: dict[str, lmdb.Environment] = {}
_owner_pid = os.getpid()


_realpaths: dict[str, str] = {}


def _key(path: str | Path) -> str:
    # realpath walks the path's components on every call; loader workers ask once per record
    name = os.fspath(path)
    key = _realpaths.get(name)
    if key is None:
        key = _realpaths[name] = os.path.realpath(name)
    return key


def _drop_inherited() -> None:
    global _owner_pid
    if os.getpid() != _owner_pid:
        # Closing a read-only, lock-free handle in the child unmaps only the child's copy.
        for env in _readonly.values():
            env.close()
        _readonly.clear()
        _owner_pid = os.getpid()


def open_readonly(path: str | Path) -> lmdb.Environment:
    """This process's read-only handle of an environment (readahead off: random access)."""
    _drop_inherited()
    key = _key(path)
    env = _readonly.get(key)
    if env is None:
        if not os.path.isfile(os.path.join(key, "data.mdb")):
            raise StoreError(f"{path}: no LMDB environment here (missing data.mdb)")
        check_data_file(path)  # before LMDB maps it: a short file must not SIGBUS this process
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, max_readers=MAX_READERS, create=False)
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot open the LMDB environment ({exc})") from None
        _readonly[key] = env
    return env


def release(path: str | Path) -> None:
    """Close this process's read-only handle of ``path`` (before writing to or deleting it)."""
    _drop_inherited()
    env = _readonly.pop(_key(path), None)
    if env is not None:
        env.close()


# errno values py-lmdb reports only in its message ("<call>: <strerror>"): said as such, naming the file.
_OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO)


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a disk-full / permission / I/O failure of LMDB or the OS into a StoreError naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise os_error(path, exc) from None
    except lmdb.Error as exc:
        text = str(exc)
        code = next((c for c in _OS_ERRNOS if text.endswith(os.strerror(c))), None)
        if code is None or isinstance(exc, lmdb.MapFullError):
            raise
        raise os_error(path, OSError(code, os.strerror(code))) from None


class WritableEnv:
    """An LMDB environment opened for writing whose map grows when it fills up.

    Every ``put_many`` is one transaction: it is either fully on disk or absent, so a killed
    writer never leaves a half record behind.
    """

    def __init__(self, path: str | Path, *, initial_map_size: int = INITIAL_MAP_SIZE) -> None:
        self.path = Path(path)
        release(self.path)
        self.data = self.path / "data.mdb"
        used = self.data.stat().st_size if self.data.is_file() else 0
        if used:  # resuming: a damaged file must be refused, not mapped
            check_data_file(self.path)
        try:
            with disk_errors(self.data):
                self.env = lmdb.open(
                    str(self.path),
                    map_size=max(initial_map_size, 2 * used),
                    subdir=True,
                    readahead=False,
                    max_readers=MAX_READERS,
                )
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open the LMDB environment for writing ({exc})") from None

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(key)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> list[bytes | None]:
        """Write items in one transaction; returns each key's previous value (None if new)."""
        while True:
            try:
                with disk_errors(self.data), self.env.begin(write=True) as txn:
                    return [txn.replace(k, v) for k, v in items]
            except lmdb.MapFullError:
                # The aborted transaction left nothing behind; retry with twice the map.
                self.env.set_mapsize(2 * self.env.info()["map_size"])

    def scan(self) -> Iterator[tuple[bytes, int]]:
        """(key, value length) of every record, in key order."""
        with self.env.begin(buffers=True) as txn:
            for k, v in txn.cursor():
                yield bytes(k), len(v)

    def close(self) -> None:
        try:
            with disk_errors(self.data):
                self.env.sync(True)
        finally:
            self.env.close()


def iter_items(env: lmdb.Environment) -> Iterator[tuple[bytes, memoryview]]:
    """(key, value buffer) of every record; a buffer is valid until the next item."""
    with env.begin(buffers=True) as txn:
        for k, v in txn.cursor():
            yield bytes(k), v
