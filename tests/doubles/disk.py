"""TEST DOUBLE: a LogFileIO (sidecar/evidence/log.py) that makes the real system calls until a test makes the data sync fail or hang.

A double only for what no real disk does on demand in a test: fdatasync failing
with EIO, or not returning. A full disk is real (tests/infra/volume.py).

    disk = FaultyDisk()
    log = EvidenceLog.open(directory, instance_id="s", file_io=disk)
    disk.sync_error = OSError(errno.EIO, "Input/output error")   # every later sync fails
    disk.hold()  ...  disk.release()                             # syncs wait until released
"""

from __future__ import annotations

import os
import threading


class FaultyDisk:
    def __init__(self) -> None:
        self.sync_error: OSError | None = None
        # (fd, file size) after each successful sync: what was durable when it returned
        self.synced: list[tuple[int, int]] = []
        self._released = threading.Event()
        self._released.set()

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def datasync(self, fd: int) -> None:
        self._released.wait()
        if self.sync_error is not None:
            raise self.sync_error
        os.fdatasync(fd)
        self.synced.append((fd, os.fstat(fd).st_size))

    def hold(self) -> None:
        """Make every sync from now on wait until release()."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()
