"""One writer per evidence directory: two sidecars appending to one chain would fork it.

    lock = await WriterLock.acquire(directory, wait_seconds=60)   # the sidecar, before any stage starts
    log = EvidenceLog.recover(directory, lock=lock, ...)          # read back under it; the sidecar releases it
    lock.keep()                                                   # the start is committed: its pid stays in LOCK
    log = EvidenceLog.open(directory, ...)                        # tools and tests: `opening`, WriterLock.take, no wait

The lock is an flock on `<directory>/LOCK`, which holds the holder's pid. It is
released when the holder closes it or dies. A writer still holding it (a replaced
pod draining on the same volume) is waited for up to `wait_seconds`. The wait
polls on the event loop, so the sidecar takes the lock before it starts OPA or
writes anything, and a start cancelled during the wait (server.serve: SIGINT or
SIGTERM) ends it at once instead of when it runs out.

A start that is refused after taking the lock leaves LOCK as it found it: released
before `keep()`, the lock removes the LOCK file it created, or puts back the content
and times of the one it found, while still holding it. Removing a lock file is safe
only because every taker checks, once its flock is granted, that the file it locked is
still the one at `<directory>/LOCK` (`_same_file`), and starts over when it is not: a
writer waiting on the removed file never believes it holds the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sidecar.evidence import EvidenceError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
LOCK_NAME = "LOCK"


@dataclass(frozen=True)
class _Found:
    """A LOCK file that was there before this holder: what to put back if its start is refused."""

    content: bytes
    atime_ns: int
    mtime_ns: int


class WriterLock:
    """The held lock of one evidence directory; `release()` (idempotent) lets the next writer in."""

    def __init__(self, directory: Path, fd: int, found: _Found | None):
        self.directory = directory
        self._fd: int | None = fd
        self._found = found  # None: this holder created LOCK
        self._kept = False

    @classmethod
    def take(cls, directory: str | Path) -> "WriterLock":
        """The lock, now; EvidenceError naming the holder when another writer has it."""
        directory = Path(directory)
        while True:
            fd, created = _open(directory)
            if _try(fd):
                if _same_file(directory, fd):
                    return cls._held(directory, fd, created)
                os.close(fd)  # locked a LOCK a refused start removed: take the one there now
                continue
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(directory, holder, 0)

    @classmethod
    async def acquire(cls, directory: str | Path, *, wait_seconds: float) -> "WriterLock":
        """The lock, waiting up to `wait_seconds` for another writer to let go; EvidenceError after that.

        Cancelling the wait (the start interrupted) closes the file and leaves the directory as it was.
        """
        directory = Path(directory)
        deadline = time.monotonic() + wait_seconds
        waiting = False
        while True:
            fd, created = _open(directory)
            try:
                while not _try(fd):
                    holder = _holder(fd)
                    if time.monotonic() >= deadline:
                        raise _in_use(directory, holder, wait_seconds)
                    if not waiting:
                        log.warning("evidence: %s is locked by pid %s; waiting up to %g s for it to close",
                                    directory, holder, wait_seconds)
                        waiting = True
                    await asyncio.sleep(POLL_SECONDS)
                    created = False  # another start may have made it since; whoever holds it now, it is not ours
            except BaseException:
                os.close(fd)
                raise
            if _same_file(directory, fd):
                return cls._held(directory, fd, created)
            os.close(fd)  # the holder was a refused start that removed it: take the one there now

    @classmethod
    def _held(cls, directory: Path, fd: int, created: bool) -> "WriterLock":
        """The lock whose flock `fd` holds, LOCK naming this pid (EvidenceError, the lock let go, when it
        cannot be written: a full volume, say)."""
        found = None
        if not created:
            stat = os.fstat(fd)
            found = _Found(os.pread(fd, 4096, 0), stat.st_atime_ns, stat.st_mtime_ns)
        lock = cls(directory, fd, found)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            lock.release()
            raise _cannot_open(directory, exc) from None
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def keep(self) -> None:
        """The start is committed (its `startup` record is being written): LOCK keeps this pid when released."""
        self._kept = True

    def release(self) -> None:
        """Let the next writer in. Before `keep()`, first put LOCK back as it was found (removed when this
        holder created it), while still holding it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self._kept:
                self._restore(fd)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def _restore(self, fd: int) -> None:
        try:
            if self._found is None:
                if _same_file(self.directory, fd):
                    os.unlink(self.directory / LOCK_NAME)
                return
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._found.content, 0)
            os.utime(fd, ns=(self._found.atime_ns, self._found.mtime_ns))
        except OSError as exc:
            log.warning("evidence: could not put %s back as it was found: %s", self.directory / LOCK_NAME, exc)


@contextlib.contextmanager
def opening(directory: str | Path, lock: WriterLock | None) -> Iterator[tuple[WriterLock, bool]]:
    """(`lock`, False) when the caller holds one; else (the directory's lock, taken now, True) for a log
    that is opened and written at once (tools and tests): released if the opening fails, LOCK then as
    it was found, and kept once it succeeded (the log releases it when it closes)."""
    if lock is not None:
        yield lock, False
        return
    own = WriterLock.take(directory)
    try:
        yield own, True
    except BaseException:
        own.release()
        raise
    own.keep()


def _open(directory: Path) -> tuple[int, bool]:
    """The LOCK file's descriptor, and whether this call created it (with `directory`, when missing)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    for _ in range(100):  # a refused start may remove LOCK, or the directory it made, between two steps here
        try:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(directory / LOCK_NAME, flags), False
            except FileNotFoundError:
                return os.open(directory / LOCK_NAME, flags | os.O_CREAT | os.O_EXCL, 0o640), True
        except (FileNotFoundError, FileExistsError):
            continue
        except OSError as exc:
            raise _cannot_open(directory, exc) from None
    raise _cannot_open(directory, OSError(errno.EAGAIN, "LOCK keeps appearing and disappearing"))


def _cannot_open(directory: Path, exc: OSError) -> EvidenceError:
    return EvidenceError(f"cannot open evidence log in {directory}: {exc.strerror or exc}")


def _same_file(directory: Path, fd: int) -> bool:
    """Whether `fd` is the file at `<directory>/LOCK` (not one removed from there, or replaced)."""
    try:
        here = os.stat(directory / LOCK_NAME)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"


def _in_use(directory: Path, holder: str, waited_seconds: float) -> EvidenceError:
    waited = f" after waiting {waited_seconds:g} s" if waited_seconds else ""
    return EvidenceError(
        f"{directory} is in use by another evidence writer (pid {holder}){waited}; each sidecar needs its own evidence.dir"
    )
