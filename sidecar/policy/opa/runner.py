"""Supervise one `opa run --server` process on a private unix socket.

`async with OpaRunner(options) as opa:` starts OPA and returns once
`GET /health?bundles=true` answers 200 (OPA is up and its bundle is
activated); `opa.url` is then `unix:///path/opa.sock` for `OpaClient`.

- Arguments come from `OpaRunOptions` (`argv()`), nothing else: the runner
  reads no config.
- OPA runs in its own process group (a new session), so a Ctrl-C at the
  terminal reaches the sidecar, which stops OPA itself; stopping signals the
  whole group (SIGTERM, then SIGKILL after `stop_grace_seconds`).
- OPA never outlives the sidecar, SIGKILL included: OPA is started through
  util-linux `setpriv --pdeathsig KILL`, which asks the kernel (prctl
  PR_SET_PDEATHSIG, kept across exec) to SIGKILL it when its parent dies.
  Not a Python preexec_fn: that forces fork() instead of vfork(), and fork()
  runs gRPC's atfork handlers in the child, which can abort it. The kernel
  sends the signal when the *thread* that spawned OPA exits; the runner is
  started from the event loop's thread, which lives as long as the process
  (asyncio.run in the main thread). Without setpriv (not Linux) a warning
  says OPA may outlive a killed sidecar.
- OPA runs under SCHED_BATCH when `batch_scheduling` is set (`chrt --batch
  0`, util-linux too): waking it for a decision never preempts the sidecar.
- When OPA dies while serving, it is started again after a capped
  exponential back-off (`restart_backoff_seconds` doubling up to
  `restart_backoff_max_seconds`; back to the first step once it has run
  healthy for the maximum). Meanwhile `health()` is (False, why) and calls
  fail at the client with a deny naming OPA.
- A hung OPA (stopped, deadlocked) is treated as dead: while it serves, its
  `GET /health` is asked every `liveness_timeout_seconds / 4` (at most 1 s);
  when no 200 has come for `liveness_timeout_seconds`, its process group is
  SIGKILLed (logged with the reason) and restarted as above. 0 disables it.
- Every log line OPA writes (JSON, `--log-format json`) goes to this
  module's logger at OPA's level; the last lines are kept for error messages.

Errors: `OpaNotFound` when the binary cannot be found (message names the
fix); `OpaStartError` when OPA exits or is not healthy within
`ready_timeout_seconds` at start (message carries OPA's last log lines).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.policy.opa.probe import probe

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "build the pinned OPA with `make install` (or `tools/build.sh opa`), which puts it in .tools/bin "
    "(outside make, put that on PATH: export PATH=\"$PWD/.tools/bin:$PATH\"); "
    "or install the official OPA release (https://www.openpolicyagent.org/docs/#running-opa) and set "
    "policy.opa.binary to its path"
)


class OpaNotFound(RuntimeError):
    """The `opa` binary is not on PATH / at the configured path."""


class OpaStartError(RuntimeError):
    """OPA exited, or did not become healthy, while starting."""


# Where `make install` builds the pinned OPA in a checkout of this repository (tools/build.sh).
CHECKOUT_TOOLS = Path(__file__).resolve().parents[3] / ".tools" / "bin"


def find_opa(binary: str = "opa") -> str:
    """Absolute path of the OPA binary; OpaNotFound if none.

    `binary` is a path, or a name looked up on PATH and then in the checkout's .tools/bin
    (so `agent-sidecar check` run from a checkout finds the OPA `make install` built).
    """
    found = shutil.which(binary)
    if found is None and os.sep not in binary:
        found = shutil.which(binary, path=str(CHECKOUT_TOOLS))
    if found is None:
        where = f"at {binary}" if os.sep in binary else f"named {binary!r} on PATH or in {CHECKOUT_TOOLS}"
        raise OpaNotFound(f"no OPA binary {where}: {INSTALL_HINT}")
    return os.path.abspath(found)


@dataclass(frozen=True)
class OpaRunOptions:
    """How to run one OPA server. `bundle` is a bundle tarball (`opa build`) or a bundle directory."""

    binary: str
    bundle: Path
    socket: Path
    log_level: str = "error"  # OPA's own: debug | info | error
    ready_timeout_seconds: float = 15.0
    health_timeout_seconds: float = 1.0
    stop_grace_seconds: float = 2.0
    restart_backoff_seconds: float = 0.1
    restart_backoff_max_seconds: float = 5.0
    # Longest time OPA's GET /health may go without a 200 before OPA is killed and restarted; 0 = never.
    liveness_timeout_seconds: float = 0.0
    # GOGC for OPA's Go runtime (percent; 0 = Go's default of 100). A higher target trades
    # some heap for less collection: 400 cut OPA's CPU per decision by about a quarter
    # on the shipped bundle (docs/performance.md).
    gogc: int = 0
    # Start OPA under SCHED_BATCH (util-linux `chrt --batch 0`; sched(7)): a woken batch thread never
    # preempts the running one. The sidecar wakes OPA with each decision's request, and under the
    # default policy the kernel often ran OPA's thread at once on the sidecar's core, leaving the
    # event loop stopped inside send() until OPA yielded: ~0.5 ms per decision when OPA had been
    # idle (docs/performance.md, "OPA's wake-ups"). As a batch task OPA runs on an idle core, or
    # once the loop waits for it. Unprivileged (only real-time policies need CAP_SYS_NICE).
    batch_scheduling: bool = False

    def env(self) -> dict[str, str]:
        """The environment OPA runs with: the sidecar's, plus GOGC when set."""
        return {**os.environ, "GOGC": str(self.gogc)} if self.gogc > 0 else dict(os.environ)

    def argv(self) -> list[str]:
        return [
            self.binary,
            "run",
            "--server",
            "--addr",
            f"unix://{self.socket}",
            "--unix-socket-perm",
            "600",
            "--bundle",
            str(self.bundle),
            "--log-level",
            self.log_level,
            "--log-format",
            "json",
            "--skip-version-check",
            "--shutdown-grace-period",
            "1",
            # The store holds the bundle's data, written once per activation and read by every
            # decision: keep it as OPA's AST values, so reads need no conversion (OPA docs,
            # "Policy Performance", storage optimization). ~8% fewer allocations per decision here.
            "--optimize-store-for-read-speed",
        ]

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def _die_with_parent() -> list[str]:
    """The command prefix that has the kernel SIGKILL the child when its parent dies ([] if unavailable)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        log.warning("no setpriv (util-linux): a managed OPA may outlive a sidecar killed with SIGKILL")
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def _batch_scheduled() -> list[str]:
    """The command prefix that starts the child under SCHED_BATCH ([] with a warning if unavailable)."""
    chrt = shutil.which("chrt") if sys.platform.startswith("linux") else None
    if chrt is None:
        log.warning("no chrt (util-linux): the managed OPA runs under the default scheduling policy")
        return []
    return [chrt, "--batch", "0"]


class OpaRunner:
    def __init__(self, options: OpaRunOptions):
        self.options = options
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task] = []
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self._health: tuple[bool, str] = (False, "OPA not started")
        self._recent: collections.deque[str] = collections.deque(maxlen=20)
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.options.url

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def health(self) -> tuple[bool, str]:
        """Liveness: (OPA running and was healthy, detail)."""
        return self._health

    async def __aenter__(self) -> "OpaRunner":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start OPA and wait until it is healthy; OpaStartError (OPA stopped again) if it is not."""
        self.options.socket.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._spawn_until_ready()
        except BaseException:
            await self._terminate()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"opa-supervisor-{self.pid}")

    async def aclose(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()
        self._health = (False, "OPA stopped")

    # --- process ---------------------------------------------------------------

    async def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.options.socket.unlink()  # a stale socket from a killed OPA
        argv = self.options.argv()
        if not os.access(argv[0], os.X_OK):
            raise OpaNotFound(f"no OPA binary at {argv[0]}: {INSTALL_HINT}")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *_die_with_parent(),
                *(_batch_scheduled() if self.options.batch_scheduling else ()),
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.options.env(),
                start_new_session=True,
            )
        except FileNotFoundError:
            raise OpaNotFound(f"no OPA binary at {argv[0]}: {INSTALL_HINT}") from None
        process = self._process
        self._readers = [
            asyncio.create_task(self._pipe_log(process.stdout, process.pid)),
            asyncio.create_task(self._pipe_log(process.stderr, process.pid)),
        ]

    async def _spawn_until_ready(self) -> None:
        await self._spawn()
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.options.ready_timeout_seconds
        last = "no answer yet"
        while True:
            if process.returncode is not None:
                await asyncio.gather(*self._readers, return_exceptions=True)
                raise OpaStartError(
                    f"OPA exited with status {process.returncode} while starting on {self.options.bundle}"
                    f"{self._last_lines()}"
                )
            if time.monotonic() > deadline:
                raise OpaStartError(
                    f"OPA was not healthy within {self.options.ready_timeout_seconds:.0f} s "
                    f"(last: {last}){self._last_lines()}"
                )
            if self.options.socket.exists():
                answer = await probe(self.url, "/health?bundles=true", self.options.health_timeout_seconds)
                if answer.status == 200:
                    break
                last = answer.problem or f"{answer.status} {answer.body[:200].decode('utf-8', 'replace')}"
            await asyncio.sleep(0.02)
        self._health = (True, f"OPA pid {process.pid} healthy on {self.url}")
        log.info("OPA pid %d serving %s on %s", process.pid, self.options.bundle, self.url)

    async def _supervise(self) -> None:
        options = self.options
        backoff = options.restart_backoff_seconds
        healthy_since = time.monotonic()
        while True:
            process = self._process
            assert process is not None
            hung = await self._wait_while_alive(process)
            code = process.returncode
            await asyncio.gather(*self._readers, return_exceptions=True)
            if self._closing:
                return
            if time.monotonic() - healthy_since >= options.restart_backoff_max_seconds:
                backoff = options.restart_backoff_seconds
            if hung:
                why = f"OPA pid {process.pid} was killed: {hung}"
            else:
                why = f"OPA pid {process.pid} exited with status {code}{self._last_lines()}"
            self._health = (False, f"{why}; restarting in {backoff * 1000:.0f} ms")
            log.error("%s; restarting in %.0f ms", why, backoff * 1000)
            await self._kill_group(process)  # anything it left in its group
            while True:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, options.restart_backoff_max_seconds)
                try:
                    await self._spawn_until_ready()
                except OpaStartError as exc:
                    await self._terminate()
                    self._health = (False, f"OPA restart failed: {exc}; next try in {backoff * 1000:.0f} ms")
                    log.error("OPA restart failed: %s", exc)
                    continue
                self.restarts += 1
                healthy_since = time.monotonic()
                break

    async def _wait_while_alive(self, process: asyncio.subprocess.Process) -> str:
        """Wait until `process` exits; "" when it exited by itself, the reason when it hung and was SIGKILLed.

        Without a liveness timeout this is just `process.wait()`. With one, `GET /health` is asked
        on a fresh connection every quarter of the timeout (at most 1 s), each ask bounded by
        `health_timeout_seconds` and by the timeout itself.
        """
        limit = self.options.liveness_timeout_seconds
        if limit <= 0:
            await process.wait()
            return ""
        exited = asyncio.ensure_future(process.wait())
        interval = min(limit / 4, 1.0)
        answered = time.monotonic()
        last = "no answer"
        try:
            while not exited.done():
                # From a worker thread (probe.py): a saturated event loop must not make a healthy OPA look hung.
                answer = await probe(self.url, "/health", min(self.options.health_timeout_seconds, limit))
                if answer.status == 200:
                    answered = time.monotonic()
                else:
                    last = answer.problem or f"status {answer.status}"
                if exited.done():
                    break
                silent = time.monotonic() - answered
                if silent >= limit:
                    why = (f"hung: GET /health on {self.url} has not answered 200 for {silent * 1000:.0f} ms "
                           f"(liveness timeout {limit * 1000:.0f} ms; last: {last})")
                    log.error("OPA pid %d %s; killing its process group", process.pid, why)
                    await self._kill_group(process)
                    await exited
                    return why
                await asyncio.wait({exited}, timeout=interval)
        finally:
            if not exited.done():  # cancelled (aclose): stop waiting here, _terminate waits
                exited.cancel()
        return ""

    async def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self.options.stop_grace_seconds):
                    await process.wait()
            except TimeoutError:
                log.warning("OPA pid %d did not stop on SIGTERM; killing it", process.pid)
        await self._kill_group(process)
        await process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []
        with contextlib.suppress(FileNotFoundError):
            self.options.socket.unlink()

    @staticmethod
    async def _kill_group(process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    # --- logs ------------------------------------------------------------------

    async def _pipe_log(self, stream: asyncio.StreamReader | None, pid: int) -> None:
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the reader's limit: skip it
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                level, message = _parse_log_line(text)
                self._recent.append(message)
                log.log(level, "opa[%d]: %s", pid, message)

    def _last_lines(self) -> str:
        if not self._recent:
            return ""
        return "; OPA said: " + " | ".join(list(self._recent)[-5:])


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR, "fatal": logging.CRITICAL}


def _parse_log_line(text: str) -> tuple[int, str]:
    """(logging level, message) of one OPA log line (JSON when --log-format json; else the raw text)."""
    try:
        record = json.loads(text)
    except ValueError:
        return logging.INFO, text
    if not isinstance(record, dict):
        return logging.INFO, text
    level = _LEVELS.get(str(record.get("level", "info")).lower(), logging.INFO)
    message = str(record.get("msg", ""))
    extra = {k: v for k, v in record.items() if k not in ("level", "msg", "time")}
    if extra:
        message += " " + json.dumps(extra, sort_keys=True, ensure_ascii=False)
    return level, message
