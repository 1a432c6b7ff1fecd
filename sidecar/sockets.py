"""A listener's unix socket path, made ready without taking it from a server that still answers on it.

A sidecar killed with SIGKILL leaves its socket file behind, and binding needs
the path free, so a start removes it. But a file there may also be the socket
of a server still running (another sidecar given the same path), whose callers
a blind unlink would silently take; or not a socket at all (a mistyped path).
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path

from sidecar.config import ConfigError


def remove_stale_socket(path: Path, key: str) -> None:
    """Remove the socket file at `path` when nobody answers on it.

    Raises ConfigError naming `key` when a server accepts a connection there (it is left
    serving), or when `path` is something other than a socket (it is left as it is).
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{key}: {path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:  # nobody listens (ECONNREFUSED): left behind
            path.unlink()
            return
    raise ConfigError(f"{key}: {path} is in use: a server is listening on it (another sidecar?)")
