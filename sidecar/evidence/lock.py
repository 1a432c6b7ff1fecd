"""One writer per evidence directory: two sidecars appending to one chain would fork it.

    lock = await WriterLock.acquire(directory, wait_seconds=60)   # the sidecar, before any stage starts
    log = EvidenceLog.open(directory, lock=lock, ...)             # the log owns it from here
    log = EvidenceLog.open(directory, ...)                        # tools and tests: WriterLock.take, no wait

The lock is an flock on `<directory>/LOCK`, which holds the holder's pid. It is
released when the holder closes it or dies. A writer still holding it (a replaced
pod draining on the same volume) is waited for up to `wait_seconds`. The wait
polls on the event loop, so the sidecar takes the lock before it starts OPA or
writes anything, and a start cancelled during the wait (server.serve: SIGINT or
SIGTERM) ends it at once instead of when it runs out.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path

from sidecar.evidence import EvidenceError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1


class WriterLock:
    """The held lock of one evidence directory; `release()` (idempotent) lets the next writer in."""

    def __init__(self, directory: Path, fd: int):
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def take(cls, directory: str | Path) -> "WriterLock":
        """The lock, now; EvidenceError naming the holder when another writer has it."""
        directory, fd = _open(directory)
        if not _try(fd):
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(directory, holder, 0)
        return cls._held(directory, fd)

    @classmethod
    async def acquire(cls, directory: str | Path, *, wait_seconds: float) -> "WriterLock":
        """The lock, waiting up to `wait_seconds` for another writer to let go; EvidenceError after that.

        Cancelling the wait (the start interrupted) closes the file and leaves the directory as it was.
        """
        directory, fd = _open(directory)
        try:
            deadline = time.monotonic() + wait_seconds
            waiting = False
            while not _try(fd):
                holder = _holder(fd)
                if time.monotonic() >= deadline:
                    raise _in_use(directory, holder, wait_seconds)
                if not waiting:
                    log.warning("evidence: %s is locked by pid %s; waiting up to %g s for it to close",
                                directory, holder, wait_seconds)
                    waiting = True
                await asyncio.sleep(POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise
        return cls._held(directory, fd)

    @classmethod
    def _held(cls, directory: Path, fd: int) -> "WriterLock":
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _open(directory: str | Path) -> tuple[Path, int]:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise EvidenceError(f"cannot open evidence log in {directory}: {exc.strerror or exc}") from None
    return directory, fd


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
