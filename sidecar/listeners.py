"""Every listener the sidecar owns, bound before any stage starts or writes anything.

    listeners = bind_listeners(server, tcp=..., unix=..., tls=..., metrics="...", mcp_tcp="...", mcp_unix="...")
    ...                                  # the stages start; each server is handed its bound socket
    listeners.close()                    # when the sidecar stops, or its start fails

A start refused for a config problem must leave nothing behind (server.read_start_files).
A port another server holds is such a problem, and it can only be found by binding; so
the gRPC server's ports (listen.tcp, listen.unix), the Prometheus port (metrics.listen)
and the MCP gateway's (mcp.listen, mcp.unix) are all bound first: a taken one refuses
the start with a ConfigError naming its key before OPA starts or a `startup` record is
written. Bound is also held: nobody can take the port between this check and serving
(each socket listens from here; connections wait in its backlog until its server runs).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sidecar.config import ConfigError
from sidecar.newpaths import NewPaths
from sidecar.sockets import SocketFile, cannot_listen, prepare_socket_path, tcp_bind_error, tcp_listener, unix_listener


@dataclass
class Listeners:
    """The bound listeners; `close()` closes the sockets and removes the socket files bound here."""

    addresses: list[str]  # the gRPC server's, as a client dials them (host:port, unix:/path)
    metrics: socket.socket | None = None  # metrics.listen
    mcp_tcp: socket.socket | None = None  # mcp.listen
    mcp_unix: socket.socket | None = None  # mcp.unix
    _files: list[SocketFile] = field(default_factory=list)
    # The socket files' directories binding created (var/run for var/run/agent-sidecar.sock): removed by
    # close() unless the start committed (made.keep()), as server._claim does with evidence.dir's.
    made: NewPaths = field(default_factory=NewPaths)

    def close(self) -> None:
        """Idempotent. The gRPC server's own sockets are its to close (grpc stops, or the process exits)."""
        for sock in (self.metrics, self.mcp_tcp, self.mcp_unix):
            if sock is not None:
                sock.close()
        for bound in self._files:
            bound.remove()
        self.made.remove()


def bind_listeners(
    server: grpc.aio.Server,
    *,
    tcp: str,
    unix: str,
    tls: grpc.ServerCredentials | None,
    metrics: str,
    mcp_tcp: str,
    mcp_unix: str,
) -> Listeners:
    """Bind each configured listener ("" = none); ConfigError naming the key of the first one that
    cannot be had, with the ones bound before it closed again."""
    listeners = Listeners(addresses=[])
    try:
        if tcp:
            port = _add_port(server, "listen.tcp", tcp, tls)
            listeners.addresses.append(f"{tcp.rsplit(':', 1)[0]}:{port}")
        if unix:
            path = Path(unix)
            listeners.made.note(path.parent)
            prepare_socket_path(path, "listen.unix")
            _add_port(server, "listen.unix", f"unix:{path}", None)
            listeners._files.append(SocketFile.bound_at(path))
            listeners.addresses.append(f"unix:{path}")
        if metrics:
            listeners.metrics = tcp_listener("metrics.listen", metrics)
        if mcp_tcp:
            listeners.mcp_tcp = tcp_listener("mcp.listen", mcp_tcp)
        if mcp_unix:
            listeners.made.note(Path(mcp_unix).parent)
            listeners.mcp_unix, bound = unix_listener("mcp.unix", Path(mcp_unix))
            listeners._files.append(bound)
    except BaseException:
        listeners.close()
        raise
    return listeners


def _add_port(server: grpc.aio.Server, key: str, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """grpc binds (and listens on) `address` here, not at `server.start()`: the bound port, or
    ConfigError naming `key`."""
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind to address", whatever the cause: find it for TCP
        cause = None if address.startswith("unix:") else tcp_bind_error(address)
        if cause is not None:
            raise cannot_listen(key, address, cause) from None
        raise ConfigError(f"{key}: cannot listen on {address} ({exc})") from None
