"""bench/run.py's account of the CPU it does not measure (other_work): a busy process outside the
bench must show as other work, and what the bench counts as its own must not."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run import cpu_seconds, machine_cpu, other_work  # noqa: E402


def test_a_busy_process_outside_the_bench_is_other_work_and_the_benchs_own_cpu_is_not():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        machine_before, spun_before = machine_cpu(), cpu_seconds(spinner.pid)
        time.sleep(1.5)
        machine_after, spun_after = machine_cpu(), cpu_seconds(spinner.pid)
    finally:
        spinner.kill()
        spinner.wait()
    spun_ms = (spun_after - spun_before) * 1000
    wall = machine_after["at"] - machine_before["at"]
    assert spun_ms > 300  # it ran

    as_other = other_work(machine_before, machine_after, {"total": 0.0}, calls=1)
    as_ours = other_work(machine_before, machine_after, {"total": spun_ms}, calls=1)

    # Unclaimed, the spinner's core is other work; claimed as the bench's own, it is taken out.
    assert as_other["other"] >= spun_ms / 1000 / wall - 0.05
    assert as_ours["other"] <= as_other["other"] - spun_ms / 1000 / wall + 0.05
    assert as_ours["other"] >= 0 and as_other["steal"] >= 0
