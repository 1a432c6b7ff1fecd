"""Real SPIRE for the tests and `make demo`: a server and its agents in a temp dir.

Not a double: `spire-server` and `spire-agent` built from the pinned
`github.com/spiffe/spire` module into `.tools/bin` by `make install`
(tools/build.sh, tools/pins.env). Everything lives in one short /tmp
directory (unix socket paths must stay under ~108 bytes):

    with SpireServer("sidecar.test") as server:          # PostgreSQL datastore, in-memory CA keys
        agent = server.agent("node1")                     # join token, node alias spiffe://sidecar.test/node/node1
        sidecar = agent.register("/ns/agents/sa/sidecar", *own_process_selectors(), dns=("sidecar.local",))
        planner = agent.workload("planner")               # a caller: its own binary path, hence its own identity
        agent.register("/ns/agents/sa/planner", *planner.selectors, x509_ttl=60)
        planner.wait_for_identity(); token = planner.fetch_jwt("aud")
        agent.endpoint                                    # unix:///tmp/spire.../node1/api.sock, for SPIFFE_ENDPOINT_SOCKET

Shapes and rules:
- The server's datastore is PostgreSQL (the pinned SPIRE is built without
  cgo, and SPIRE's sqlite3 needs cgo): by default a fresh database on the
  test process's shared server (tests/doubles/postgres.py; `make test`
  installs Debian's postgresql). The server's CLI is `SpireServer.cli(...)`,
  e.g. `cli("localauthority", "jwt", "show", "-output", "json")`.
- Node attestation is `join_token`: each agent gets a fresh token whose
  node alias is `spiffe://<td>/node/<name>`; registration entries are
  parented to that alias. `SpireAgent.start()` after `stop()` reuses the
  data dir and the agent SVID kept there.
- Workload attestation is `unix` with `discover_workload_path = true`, so
  an entry can select on `unix:uid`, `unix:gid` and `unix:path`. All
  processes of the test run as the test's own uid; what tells two workloads
  apart is the binary they run: `own_process_selectors()` (the Python
  process, i.e. the in-process sidecar) versus a `Workload`, a hard link of
  `spire-agent` under a name of its own whose `api fetch` calls are attested
  by that path.
- TTLs are SPIRE's: an X.509-SVID is issued with NotBefore backdated 10 s
  (pkg/server/ca/ca.go `backdate`) and the agent rotates it once less than
  half of NotAfter-NotBefore remains (pkg/common/rotationutil).
- The agent synchronises with the server every `sync_interval` (500 ms here,
  SPIRE's default is 5 s) and the server reloads its entry cache every
  `cache_reload_interval` (500 ms here): an entry created or deleted reaches
  workloads within about a second, not at once; wait for the outcome.
- Processes (tests/infra/process.py) run in their own process group, die
  with the thread that started them (`setpriv --pdeathsig`), and are stopped
  by `stop()`/`close()`, the context manager, or at interpreter exit: none is
  left behind. Start them from the main thread.

Errors: `SpireUnavailable` when the binaries are missing (the message says
`make install` builds them), `SpireError` when a process does not become
ready or a CLI call fails (with the command's output or the log's tail).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tests.infra.process import NotReady, Process, free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".tools" / "bin"
PINS = REPO / "tools" / "pins.env"

STARTUP_TIMEOUT = 60.0  # seconds; a cold start on a busy 2-core machine
CLI_TIMEOUT = 30.0


class SpireUnavailable(RuntimeError):
    """spire-server / spire-agent are not built; `make install` builds them."""


class SpireError(RuntimeError):
    """A SPIRE process did not start, or a CLI call failed."""


def pinned_version() -> str:
    """The SPIRE release tools/pins.env pins (e.g. "v1.13.3")."""
    for line in PINS.read_text().splitlines():
        if line.startswith("SPIRE_VERSION="):
            return line.split("=", 1)[1].strip()
    raise SpireError(f"no SPIRE_VERSION in {PINS}")


def binary(name: str) -> Path:
    """`.tools/bin/<name>`, or SpireUnavailable saying how to build it."""
    path = BIN / name
    if not (path.exists() and os.access(path, os.X_OK)):
        raise SpireUnavailable(
            f"{name} is not built ({path} is missing): run `make install` in {REPO}, which builds "
            f"SPIRE {pinned_version()} (spire-server, spire-agent) into .tools/bin (tools/build.sh)"
        )
    return path


def version() -> str:
    """What `spire-server --version` prints, e.g. "1.13.3"."""
    out = subprocess.run([str(binary("spire-server")), "--version"], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    return (out.stdout or out.stderr).strip()


def own_process_selectors() -> tuple[str, ...]:
    """The `unix` selectors SPIRE sees for this Python process (uid and binary path).

    The in-process sidecar of a test (and any other Python process of the same
    interpreter and uid) is attested with these.
    """
    return (f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath('/proc/self/exe')}")


# ---------------------------------------------------------------- processes
def _run(argv: Sequence[str], what: str, timeout: float = CLI_TIMEOUT) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SpireError(f"{what}: no answer within {timeout:g}s ({' '.join(argv)})") from None
    if out.returncode != 0:
        raise SpireError(f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.stdout


def _start(process: Process, check: Sequence[str], what: str, timeout: float = STARTUP_TIMEOUT) -> None:
    """Start `process` and wait until the `check` command (its healthcheck) succeeds; SpireError if not."""
    answer = [""]

    def healthy() -> bool:
        probe = subprocess.run(list(check), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        answer[0] = (probe.stderr or probe.stdout).strip()
        return probe.returncode == 0

    process.start()
    try:
        wait_ready(process, healthy, timeout)
    except NotReady as exc:
        process.stop()
        problem = "exited during startup" if exc.exited else f"not healthy after {timeout:g}s ({answer[0]})"
        raise SpireError(f"{what} {problem}; its log ({process.log_path}):\n{process.log_tail()}") from None


# ---------------------------------------------------------------- server
@dataclass(frozen=True)
class Entry:
    """A registration entry as `spire-server entry create` made it."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]


class SpireServer:
    """A SPIRE server for one trust domain: PostgreSQL datastore, in-memory keys, API on a unix socket.

    The datastore is PostgreSQL (`database`, a libpq DSN; default: a fresh
    database on tests/doubles/postgres.py's shared server) because the
    pinned SPIRE is built without cgo, and SPIRE's sqlite3 dialect needs cgo.

    `ca_ttl` and `default_x509_svid_ttl` are SPIRE durations ("24h", "1h").
    The agent port is a free loopback TCP port (agents always reach the
    server over TCP).
    """

    def __init__(
        self,
        trust_domain: str = "sidecar.test",
        *,
        directory: str | None = None,
        ca_ttl: str = "24h",
        default_x509_svid_ttl: str = "1h",
        default_jwt_svid_ttl: str = "5m",
        log_level: str = "INFO",
        database: str | None = None,
    ):
        self._binary = binary("spire-server")  # first: nothing is created when SPIRE is not built
        binary("spire-agent")
        self.trust_domain = trust_domain
        self._database = database
        self._owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="spire", dir="/tmp"))
        self.directory.chmod(0o755)
        self.ca_ttl = ca_ttl
        self.default_x509_svid_ttl = default_x509_svid_ttl
        self.default_jwt_svid_ttl = default_jwt_svid_ttl
        self.log_level = log_level
        self.home = self.directory / "server"
        self.socket_path = self.home / "api.sock"
        self.port = 0
        self.agents: list[SpireAgent] = []
        self._process: Process | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SpireServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def database(self) -> str:
        """The datastore's libpq DSN; by default a fresh database on the test process's PostgreSQL."""
        if self._database is None:
            from tests.doubles.postgres import PostgresServer

            self._database = PostgresServer.shared().new_database()
        return self._database

    def start(self) -> "SpireServer":
        if self._process is not None and self._process.alive:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        config = self.home / "server.conf"
        config.write_text(self._config())
        self._process = Process([str(self._binary), "run", "-config", str(config)], self.home / "server.log")
        _start(self._process, [str(self._binary), "healthcheck", "-socketPath", str(self.socket_path)],
               f"spire-server ({self.trust_domain})")
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def close(self) -> None:
        """Stop the agents and the server, and remove the directory if this server made it."""
        for agent in self.agents:
            agent.stop()
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _config(self) -> str:
        return f"""\
server {{
    bind_address = "127.0.0.1"
    bind_port = "{self.port}"
    socket_path = "{self.socket_path}"
    trust_domain = "{self.trust_domain}"
    data_dir = "{self.home / 'data'}"
    log_level = "{self.log_level}"
    ca_ttl = "{self.ca_ttl}"
    default_x509_svid_ttl = "{self.default_x509_svid_ttl}"
    default_jwt_svid_ttl = "{self.default_jwt_svid_ttl}"
    experimental {{
        cache_reload_interval = "500ms"
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "postgres"
            connection_string = "{self.database} sslmode=disable"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
}}
"""

    # ------------------------------------------------------------ CLI
    def cli(self, *args: str) -> str:
        """`spire-server <command words> -socketPath <ours> <flags...>`; stdout.

        The command is the words before the first flag: `cli("entry", "show")`,
        `cli("localauthority", "jwt", "taint", "-authorityID", kid)`.
        """
        split = next((i for i, arg in enumerate(args) if arg.startswith("-")), len(args))
        command, rest = list(args[:split]), list(args[split:])
        return _run([str(self._binary), *command, "-socketPath", str(self.socket_path), *rest],
                    f"spire-server {' '.join(command)}")

    def spiffe_id(self, path: str) -> str:
        return f"spiffe://{self.trust_domain}{path}"

    def join_token(self, alias_path: str, ttl: int = 600) -> str:
        """A fresh join token whose agent is also known as `spiffe://<td><alias_path>`."""
        out = json.loads(self.cli("token", "generate", "-spiffeID", self.spiffe_id(alias_path),
                                  "-ttl", str(ttl), "-output", "json"))
        return out["value"]

    def create_entry(
        self,
        parent_id: str,
        spiffe_id: str,
        selectors: Iterable[str],
        *,
        x509_ttl: int | None = None,
        jwt_ttl: int | None = None,
        dns: Iterable[str] = (),
        federates_with: Iterable[str] = (),
    ) -> Entry:
        """`spire-server entry create`; TTLs in seconds (None: the server's defaults)."""
        args = ["-parentID", parent_id, "-spiffeID", spiffe_id]
        selectors = tuple(selectors)
        for selector in selectors:
            args += ["-selector", selector]
        if x509_ttl is not None:
            args += ["-x509SVIDTTL", str(x509_ttl)]
        if jwt_ttl is not None:
            args += ["-jwtSVIDTTL", str(jwt_ttl)]
        for name in dns:
            args += ["-dns", name]
        for td in federates_with:
            args += ["-federatesWith", f"spiffe://{td}"]
        out = json.loads(self.cli("entry", "create", *args, "-output", "json"))
        result = out["results"][0]
        if result["status"]["code"] != 0:
            raise SpireError(f"spire-server entry create {spiffe_id}: {result['status']['message']}")
        return Entry(result["entry"]["id"], spiffe_id, parent_id, selectors)

    def delete_entry(self, entry: Entry) -> None:
        self.cli("entry", "delete", "-entryID", entry.id)

    def bundle_pem(self) -> str:
        """This trust domain's X.509 authorities, PEM (`spire-server bundle show`)."""
        return self.cli("bundle", "show", "-format", "pem")

    def bundle_spiffe(self) -> str:
        """This trust domain's bundle as a SPIFFE bundle (JWKS with X.509 and JWT authorities)."""
        return self.cli("bundle", "show", "-format", "spiffe")

    def trust(self, other: "SpireServer") -> None:
        """Static federation: store `other`'s SPIFFE bundle here (`spire-server bundle set`)."""
        path = self.home / f"bundle-{other.trust_domain}.json"
        path.write_text(other.bundle_spiffe())
        self.cli("bundle", "set", "-id", f"spiffe://{other.trust_domain}", "-path", str(path), "-format", "spiffe")

    # ------------------------------------------------------------ agents
    def agent(self, name: str = "node1", *, start: bool = True, **kwargs) -> "SpireAgent":
        """An agent of this server, started unless `start=False` (see SpireAgent); `close()` stops it."""
        agent = SpireAgent(self, name, **kwargs)
        self.agents.append(agent)
        return agent.start() if start else agent


# ---------------------------------------------------------------- agent
class SpireAgent:
    """A SPIRE agent: join_token node attestation, unix workload attestation, Workload API on a unix socket."""

    def __init__(self, server: SpireServer, name: str, *, log_level: str = "INFO"):
        self.server = server
        self.name = name
        self.home = server.directory / name
        self.socket_path = self.home / "api.sock"
        self.node_id = server.spiffe_id(f"/node/{name}")
        self.agent_id = ""  # spiffe://<td>/spire/agent/join_token/<token>, once started
        self.log_level = log_level
        self.entries: list[Entry] = []
        self._process: Process | None = None
        self._binary = binary("spire-agent")

    @property
    def endpoint(self) -> str:
        """What SPIFFE_ENDPOINT_SOCKET would hold: unix:///abs/path."""
        return f"unix://{self.socket_path}"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    def start(self) -> "SpireAgent":
        """Start (or restart) the agent; returns once its Workload API answers health checks.

        The first start attests with a fresh join token. A restart reuses the
        data dir: the agent presents the agent SVID it kept on disk (valid for
        the server's agent TTL, 1 h by default) and the token is not used again.
        """
        if self.alive:
            return self
        config = self.home / "agent.conf"
        if not config.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            self.home.chmod(0o755)  # workloads connect to the socket inside it
            bundle = self.home / "bootstrap.pem"
            bundle.write_text(self.server.bundle_pem())
            token = self.server.join_token(f"/node/{self.name}")
            self.agent_id = self.server.spiffe_id(f"/spire/agent/join_token/{token}")
            config.write_text(self._config(token, bundle))
        self._process = Process([str(self._binary), "run", "-config", str(config)], self.home / "agent.log")
        _start(self._process, [str(self._binary), "healthcheck", "-socketPath", str(self.socket_path)],
               f"spire-agent {self.name} ({self.server.trust_domain})")
        return self

    def svid_serial(self) -> str:
        """The serial number of the agent's own X.509-SVID, as the server knows it (`agent show`)."""
        out = json.loads(self.server.cli("agent", "show", "-spiffeID", self.agent_id, "-output", "json"))
        return out["x509svid_serial_number"]

    def jwt_svid_fetches(self, spiffe_id: str) -> int:
        """How many Workload API FetchJWTSVID calls this agent answered for `spiffe_id`, over all its runs.

        Counted from the agent's own log lines `msg="Fetched JWT SVID" ... spiffe_id="<id>"`
        (pkg/agent/endpoints/workload/handler.go), which SPIRE writes at DEBUG
        level only: make the agent with `log_level="DEBUG"` (else SpireError).
        A fetch the agent answered from its own JWT-SVID cache counts too.
        """
        if self.log_level.upper() != "DEBUG":
            raise SpireError(f"agent {self.name}: jwt_svid_fetches() needs log_level='DEBUG'")
        try:
            lines = (self.home / "agent.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return 0
        return sum(1 for line in lines if 'msg="Fetched JWT SVID"' in line and f'spiffe_id="{spiffe_id}"' in line)

    def pause(self) -> None:
        """SIGSTOP: the agent keeps its socket but answers nothing (a hung agent); `resume()` undoes it."""
        if self._process is not None:
            self._process.pause()

    def resume(self) -> None:
        if self._process is not None:
            self._process.resume()

    def stop(self) -> None:
        """Stop the agent (its socket goes away); `start()` brings it back on the same path."""
        if self._process is not None:
            self._process.stop()

    def _config(self, token: str, bundle: Path) -> str:
        return f"""\
agent {{
    data_dir = "{self.home / 'data'}"
    log_level = "{self.log_level}"
    server_address = "127.0.0.1"
    server_port = "{self.server.port}"
    socket_path = "{self.socket_path}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{self.server.trust_domain}"
    join_token = "{token}"
    experimental {{
        sync_interval = "500ms"
    }}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{self.home / 'data'}"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{
            discover_workload_path = true
        }}
    }}
}}
"""

    # ------------------------------------------------------------ registrations
    def register(self, path: str, *selectors: str, **options) -> Entry:
        """An entry `spiffe://<td><path>` for workloads of this agent matching every selector.

        Options as `SpireServer.create_entry` (x509_ttl, jwt_ttl, dns, federates_with).
        """
        entry = self.server.create_entry(self.node_id, self.server.spiffe_id(path), selectors, **options)
        self.entries.append(entry)
        return entry

    def unregister(self, entry: Entry) -> None:
        self.server.delete_entry(entry)
        self.entries = [e for e in self.entries if e.id != entry.id]

    def workload(self, name: str) -> "Workload":
        return Workload(self, name)


# ---------------------------------------------------------------- workloads
class Workload:
    """A caller with an identity of its own: `spire-agent api fetch` run from a binary path of its own.

    The binary is a hard link of `.tools/bin/spire-agent` at
    `<dir>/workloads/<name>/<name>` (same inode, so no copy), and the agent
    attests each `api fetch` by that path: register it with `selectors`.
    """

    def __init__(self, agent: SpireAgent, name: str):
        self.agent = agent
        self.name = name
        self.home = agent.server.directory / "workloads" / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / name
        if not self.path.exists():
            try:
                os.link(binary("spire-agent"), self.path)
            except OSError:  # another filesystem: a copy works the same
                shutil.copy2(binary("spire-agent"), self.path)

    @property
    def selectors(self) -> tuple[str, ...]:
        return (f"unix:uid:{os.getuid()}", f"unix:path:{self.path}")

    def _fetch(self, *args: str, timeout: float = 10.0) -> str:
        return _run([str(self.path), "api", "fetch", *args, "-socketPath", str(self.agent.socket_path),
                     "-timeout", f"{int(timeout)}s"], f"{self.name}: spire-agent api fetch", timeout=timeout + 5)

    def fetch_x509(self) -> "X509Svid":
        """This workload's X.509-SVID, key and bundle from the agent, as PEM."""
        out = self.home / "x509"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        self._fetch("x509", "-write", str(out), "-silent")
        return X509Svid(
            chain_pem=(out / "svid.0.pem").read_bytes(),
            key_pem=(out / "svid.0.key").read_bytes(),
            bundle_pem=(out / "bundle.0.pem").read_bytes(),
        )

    def fetch_jwt(self, *audiences: str) -> str:
        """A JWT-SVID for these audiences, minted by SPIRE for this workload."""
        out = json.loads(self._fetch("jwt", "-audience", ",".join(audiences), "-output", "json"))
        return out[0]["svids"][0]["svid"]

    def wait_for_identity(self, timeout: float = 30.0) -> "X509Svid":
        """Fetch until the agent has synced this workload's entry (PERMISSION_DENIED until then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.fetch_x509()
            except SpireError as exc:
                if time.monotonic() > deadline:
                    raise SpireError(f"{self.name} got no identity within {timeout:g}s: {exc}") from None
                time.sleep(0.2)


@dataclass(frozen=True)
class X509Svid:
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes


def main() -> None:  # pragma: no cover - manual check: python -m tests.infra.spire
    """Start a server and an agent, register this process, print the agent socket; Ctrl-C stops."""
    with SpireServer() as server:
        agent = server.agent()
        agent.register("/demo", *own_process_selectors())
        print(f"SPIRE {version()}: SPIFFE_ENDPOINT_SOCKET={agent.endpoint}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
