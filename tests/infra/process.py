"""TEST INFRASTRUCTURE: one long-running real program (SPIRE, Jaeger) started, waited for, stopped.

Shared by tests/infra/spire.py and tests/infra/jaeger.py:

    process = Process([binary, "run", ...], log_path, cwd=..., env=...)
    process.start()                    # own session; stdout+stderr appended to log_path
    wait_ready(process, probe, 60.0)   # poll probe() until true; NotReady if it exits or time runs out
    process.pause(); process.resume()  # SIGSTOP / SIGCONT to its group: a program that hangs
    process.stop(timeout=10.0)         # SIGTERM (+SIGCONT) to its group, SIGKILL after `timeout` s
    process.kill()                     # SIGKILL to its group at once
    process.send_signal(signal.SIGTERM); process.wait(30)   # to the program alone, as a kubelet would
    process.log_tail(30); process.log_since(offset)

Every process runs in its own session (process group), so stopping it stops
whatever it started. It gets SIGKILL when the thread that started it ends
(`setpriv --pdeathsig`, util-linux, when installed): start it from the main
thread. Processes still running at interpreter exit are stopped (5 s grace):
even a test run that dies leaves none behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# The process gets SIGKILL when the thread that started it ends.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--") if shutil.which("setpriv") else ()

_RUNNING: set["Process"] = set()
_RUNNING_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` seconds pass (falsy result)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


class NotReady(RuntimeError):
    """The process exited while starting (`exited` True, `returncode` set) or was not ready in time."""

    def __init__(self, message: str, *, exited: bool, returncode: int | None):
        super().__init__(message)
        self.exited = exited
        self.returncode = returncode


class Process:
    """One long-running program in its own session, its output appended to `log_path`. One owner."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self._popen: subprocess.Popen | None = None
        self._paused = False
        self.returncode: int | None = None  # of the last run, once it ended

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                [*DIE_WITH_PARENT, *self.argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.cwd, env=self.env,
            )
        self.returncode = None
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    @property
    def alive(self) -> bool:
        if self._popen is None:
            return False
        self.returncode = self._popen.poll()
        return self.returncode is None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def _signal(self, signum: int) -> None:
        if self._popen is not None:
            try:
                os.killpg(self._popen.pid, signum)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP to the group: it keeps its sockets but answers nothing (a program that hangs)."""
        if self.alive:
            self._signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._signal(signal.SIGCONT)
            self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group (and SIGCONT, so a paused one can act on it), SIGKILL after `timeout` s."""
        if self._popen is not None and self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        self._forget()

    def kill(self) -> None:
        """SIGKILL to the group; waits for the exit."""
        self._signal(signal.SIGKILL)
        self._forget()

    def send_signal(self, signum: int) -> None:
        """`signum` to the program alone, not its group: what a kubelet (SIGTERM) or a crash (SIGKILL)
        does to a container's main process, whose children must then follow by themselves."""
        if self._popen is not None:
            self._popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait up to `timeout` s for the program to exit (subprocess.TimeoutExpired after); its exit code."""
        assert self._popen is not None, "not started"
        self.returncode = self._popen.wait(timeout)
        return self.returncode

    def _forget(self) -> None:
        popen, self._popen = self._popen, None
        self._paused = False
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        if popen is not None:
            self.returncode = popen.wait()

    # -- the log ---------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int = 0) -> str:
        """What the program logged from byte `offset` on (over all its runs: the file is appended to)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_since().splitlines()[-lines:])


def wait_ready(process: Process, probe: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
    """Poll `probe()` until it is true. Raises NotReady when the process exits first or
    `timeout` seconds pass; the process is left as it is (the caller stops it and reports)."""
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive:
            raise NotReady(f"exited ({process.returncode})", exited=True, returncode=process.returncode)
        if probe():
            return
        if time.monotonic() > deadline:
            raise NotReady(f"was not ready within {timeout:g} s", exited=False, returncode=None)
        time.sleep(interval)


@atexit.register
def _stop_all() -> None:
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for process in running:
        process.stop(timeout=5)
