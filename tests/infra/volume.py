"""A small real filesystem (a tmpfs) a test can fill, so that the kernel itself answers ENOSPC.

    with TinyVolume(tmp_path / "tiny", size_kib=256) as volume:
        ...                  # put the evidence directory under volume.path
        volume.fill()        # every free block taken: the next write that needs a block is short, then ENOSPC
        volume.free()        # space again

Mounting needs root (CAP_SYS_ADMIN); without it entering raises RuntimeError, so a test
that needs a full disk fails instead of being skipped.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


class TinyVolume:
    def __init__(self, path: Path, *, size_kib: int = 256):
        self.path = Path(path)
        self.size_kib = size_kib
        self.filler = self.path / "filler"
        self._mounted = False

    def __enter__(self) -> "TinyVolume":
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kib}k", "tmpfs", str(self.path)],
                              capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"cannot mount a {self.size_kib} KiB tmpfs at {self.path} (needs root): "
                               f"{done.stderr.decode().strip()}")
        self._mounted = True
        return self

    def fill(self) -> int:
        """Write `filler` until the kernel says ENOSPC; the bytes it holds."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        written = 0
        try:
            chunk = b"x" * 4096
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    return written
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def __exit__(self, *exc_info: object) -> None:
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self._mounted = False
