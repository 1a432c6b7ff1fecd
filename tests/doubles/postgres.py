"""TEST HELPER: a real PostgreSQL server (Debian's `postgresql` package) in a temp dir.

Not a fake: `initdb` + `pg_ctl start` of the installed server, listening only
on a unix socket in a short /tmp directory (no TCP port is opened), trust
authentication, fsync off (tests do not need durability across power loss).

    server = PostgresServer.shared()        # started once per test process
    dsn = server.new_database()             # a fresh, empty database per test

A server configured like a deployment's (tests/test_deploy_tls.py) also listens
on 127.0.0.1:`tcp_port`, takes `settings` as `-c name=value` (ssl, hba_file,
...), and gives the superuser `password` at initdb, as the postgres image does
with POSTGRES_PASSWORD; its own DSNs then carry the password.

initdb refuses to run as root, so as root the server runs as the `postgres`
system user (created by the Debian package) through `runuser`. `make test`
installs the package (Makefile target `system-deps`).
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SUPERUSER = "sidecar"


def find_bindir() -> Path | None:
    """The newest installed server's bin directory (/usr/lib/postgresql/N/bin), or None."""
    candidates = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        try:
            version = int(Path(path).parent.name.split(".")[0])
        except ValueError:
            continue
        if (Path(path) / "initdb").exists() and (Path(path) / "pg_ctl").exists():
            candidates.append((version, Path(path)))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PostgresUnavailable(RuntimeError):
    pass


class PostgresServer:
    _shared: "PostgresServer | None" = None
    _lock = threading.Lock()

    def __init__(self, *, tcp_port: int | None = None, settings: dict[str, str] | None = None,
                 password: str | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin): "
                "`make test` installs Debian's postgresql package (make system-deps)"
            )
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        # Without tcp_port, the port names the socket file only: no TCP listener.
        self.port = tcp_port or 20000 + secrets.randbelow(40000)
        self.tcp = tcp_port is not None
        self.settings = dict(settings or {})
        self.password = password
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self._started = False
        self._databases = 0

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=self.dir, check=False
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def start(self) -> "PostgresServer":
        password_file = []
        if self.password is not None:
            (self.dir / "pwfile").write_text(self.password + "\n")
            if self._as_user:
                shutil.chown(self.dir / "pwfile", "postgres", "postgres")
            password_file = [f"--pwfile={self.dir / 'pwfile'}"]
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync", *password_file,
        )
        listen = "127.0.0.1" if self.tcp else ""
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses='{listen}' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._options = options
        self.resume()
        return self

    def pause(self) -> None:
        """Stop the server cleanly (committed data kept although fsync is off); clients are
        disconnected and refused until resume()."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._started = False

    def resume(self) -> None:
        """Start the (initialised) server again on the same socket."""
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-o", self._options, "-w", "-t", "60", "start",
        )
        self._started = True

    def stop(self) -> None:
        if self._started:
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (PostgresUnavailable, subprocess.TimeoutExpired):
                pass
            self._started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        password = f" password={self.password}" if self.password is not None else ""
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}{password}"

    def new_database(self) -> str:
        """Create an empty database and return its DSN."""
        import psycopg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}_{secrets.token_hex(3)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    @classmethod
    def shared(cls) -> "PostgresServer":
        """One server for the whole test process, stopped at exit."""
        with cls._lock:
            if cls._shared is None:
                server = cls()
                try:
                    server.start()
                except BaseException:
                    server.stop()
                    raise
                atexit.register(server.stop)
                cls._shared = server
            return cls._shared

