"""An exclusive lock on a store directory while it is built, so two builds never write one store.

``flock`` on ``build.lock`` in the store directory: a single build (and a merge) holds it
exclusively; each shard of a sharded build holds it shared (shards of one build run in parallel)
plus ``shard-NNNN.lock`` exclusively. The kernel drops a flock when its process dies, so a killed
build never leaves a stale lock behind; the pid written into the files only names the holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from detkd.store.format import StoreError, os_error

LOCK = "build.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holders(out_dir: Path) -> list[int]:
    pids = set()
    for f in [out_dir / LOCK, *sorted(out_dir.glob("shard-*.lock"))]:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and _alive(int(text)):
            pids.add(int(text))
    return sorted(pids)


class BuildLock:
    """Held while a build or merge writes ``out_dir``; ``shard`` takes the shared lock plus the shard's own."""

    def __init__(self, out_dir: str | Path, *, shard: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard
        self._fds: list[int] = []

    def acquire(self) -> BuildLock:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(self.out_dir, exc) from None
        try:
            self._lock(self.out_dir / LOCK, exclusive=self.shard is None)
            if self.shard is not None:
                self._lock(self.out_dir / f"shard-{self.shard:04d}.lock", exclusive=True)
        except BaseException:
            self.release()
            raise
        return self

    def _lock(self, path: Path, *, exclusive: bool) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(path, exc) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pids = _holders(self.out_dir)
            who = f"pid {', '.join(map(str, pids))}" if pids else "pid unknown"
            raise StoreError(f"{self.out_dir}: another build is writing this store ({who})") from None
        self._fds.append(fd)
        if exclusive:  # names the holder for the next refusal (a shared holder would race the others)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        for fd in reversed(self._fds):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
