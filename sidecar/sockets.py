"""A listener's socket, bound for its config key, and its unix socket path made ready without
taking it from a server that still answers on it.

A sidecar killed with SIGKILL leaves its socket file behind, and binding needs
the path free, so a start removes it. But a file there may also be the socket
of a server still running (another sidecar given the same path), whose callers
a blind unlink would silently take; or not a socket at all (a mistyped path).
A socket file this process bound is removed when it closes, but only while the
path is still that socket (SocketFile): a path another server has since taken
is left to it.
"""

from __future__ import annotations

import errno
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import ConfigError

# What a ConfigError for a listener whose address is in use adds after the key, address and cause.
ALREADY_LISTENING = "is another server, another sidecar perhaps, already listening there?"


def cannot_listen(key: str, address: object, exc: OSError) -> ConfigError:
    """`key: cannot listen on ADDRESS (cause)`, asking about another server only when the address is in use
    (not for an address this host does not have, a permission, a path too long for a unix socket)."""
    hint = f": {ALREADY_LISTENING}" if exc.errno == errno.EADDRINUSE else ""
    return ConfigError(f"{key}: cannot listen on {address} ({exc.strerror or exc}){hint}")


def tcp_bind_error(address: str) -> OSError | None:
    """Why `address` (host:port) cannot be bound now, found by binding a throwaway socket there; None if it can.
    grpc's own bind failure says only "Failed to bind", whatever the cause."""
    try:
        _bound_tcp(address).close()
    except OSError as exc:
        return exc
    return None


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


@dataclass(frozen=True)
class SocketFile:
    """The socket file this process bound at `path`, known by its inode."""

    path: Path
    inode: tuple[int, int]

    @classmethod
    def bound_at(cls, path: Path) -> "SocketFile":
        found = path.lstat()
        return cls(path, (found.st_dev, found.st_ino))

    def remove(self) -> None:
        """Unlink the path while it is still this socket: never one another server bound there since."""
        try:
            found = self.path.lstat()
            if (found.st_dev, found.st_ino) == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def tcp_listener(key: str, address: str) -> socket.socket:
    """A listening, non-blocking TCP socket on `address` (host:port, [v6]:port; port 0 = any);
    ConfigError naming `key` when it cannot be had."""
    try:
        sock = _bound_tcp(address)
    except OSError as exc:
        raise cannot_listen(key, address, exc) from None
    sock.setblocking(False)
    return sock


def _bound_tcp(address: str) -> socket.socket:
    """A socket bound to `address` and listening (OSError when it cannot be)."""
    host, _, port = address.rpartition(":")
    bare = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: a port whose last server left connections in TIME_WAIT can be had again at once.
    # (Linux still refuses a port a server listens on; SO_REUSEPORT, which would share it, stays off.)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, int(port)))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def unix_listener(key: str, path: Path) -> tuple[socket.socket, SocketFile]:
    """A listening, non-blocking unix socket at `path` (a stale socket file there replaced:
    remove_stale_socket); ConfigError naming `key` when it cannot be had."""
    prepare_socket_path(path, key)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise cannot_listen(key, path, exc) from None
    sock.setblocking(False)
    return sock, SocketFile.bound_at(path)


def prepare_socket_path(path: Path, key: str) -> None:
    """Make `path` bindable: its directory made, a stale socket file there removed (remove_stale_socket)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot make the directory of {path} ({exc.strerror})") from None
    remove_stale_socket(path, key)

