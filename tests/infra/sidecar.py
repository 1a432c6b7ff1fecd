"""TEST INFRASTRUCTURE: the real sidecar, `agent-sidecar serve --config CONFIG`, as its own process.

    sidecar = SidecarProcess(config, tmp_path / "sidecar.log")
    sidecar.start()                       # returns at once
    sidecar.wait_serving()                # until its banner: every listener bound, every stage up
    sidecar.send_signal(signal.SIGKILL)   # to the sidecar alone (a crash); its managed OPA follows by itself
    sidecar.wait(15)                      # its exit code
    sidecar.start(); sidecar.wait_serving()   # again, on the same files: a restart
    sidecar.stop()                        # SIGTERM and wait: the drain; its exit code
    sidecar.log_tail()                    # stdout and stderr of every run, appended to the log file

Serving means the banner `agent-sidecar PID serving`, printed once `start_sidecar`
returned: a socket file alone is not enough (it exists before the start is
over, and stays behind when a start fails). A sidecar that exits or hangs while
starting fails the test with its log's tail. Built on tests/infra/process.py:
own session, stopped at interpreter exit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tests.infra.process import NotReady, Process, wait_ready

REPO = Path(__file__).resolve().parents[2]


class SidecarProcess:
    """One `agent-sidecar serve` process at a time on `config`; its output appended to `log_path`."""

    def __init__(self, config: Path, log_path: Path):
        self.process = Process([sys.executable, "-m", "sidecar", "serve", "--config", str(config)], log_path, cwd=REPO)
        self._run_started_at = 0  # log offset where the current run's output begins

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    def start(self) -> None:
        self._run_started_at = self.process.log_size()
        self.process.start()

    def wait_serving(self, timeout: float = 60) -> None:
        """Until this run printed its banner; AssertionError with the log's tail if it exited or hung first."""
        banner = f"agent-sidecar {self.process.pid} serving"
        self.wait_for(lambda: banner in self.process.log_since(self._run_started_at), "serving", timeout)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Poll `condition` while the sidecar runs; AssertionError naming `what`, with the log's tail,
        if the sidecar exits first or `timeout` s pass."""
        try:
            wait_ready(self.process, condition, timeout, 0.05)
        except NotReady as not_ready:
            raise AssertionError(f"the sidecar {not_ready} while waiting for {what}:\n{self.log_tail()}") from None

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        """`signum` to the sidecar alone, then its exit code; its whole group is killed if it outlives `timeout` s."""
        if not self.process.alive:
            return self.process.returncode
        self.send_signal(signum)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the sidecar did not exit within {timeout:g} s of signal {signum}:\n{self.log_tail()}")

    def close(self) -> None:
        """Whatever is left of it, gone: SIGKILL to its group (for `finally` blocks)."""
        self.process.kill()

    def text(self) -> str:
        return self.process.log_since()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)
