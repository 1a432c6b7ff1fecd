"""Soak (not in CI): the sidecar at a steady rate for minutes, memory and descriptors sampled.

    python bench/soak.py --minutes 10 --rate 500

Starts the sidecar (managed OPA, durable evidence) as its own process,
drives it open-loop from a load process, samples RSS and open file
descriptors of the sidecar's whole process tree (the sidecar and its OPA)
from /proc every `--every` seconds, and prints them with the
growth between the first and the second half of the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calls import call_mix, write_calls  # noqa: E402
from run import PYTHON, build_loadgen, bench_bundle, loader_command, start  # noqa: E402


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the engine's worker processes live under a forkserver)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def sample(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, open fds, processes) summed over the sidecar's process tree."""
    rss_kib = fds = count = 0
    for process in descendants(pid):
        try:
            status = Path(f"/proc/{process}/status").read_text()
            rss_kib += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            fds += len(list(Path(f"/proc/{process}/fd").iterdir()))
            count += 1
        except (OSError, StopIteration):
            continue
    return rss_kib / 1024, fds, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    args = parser.parse_args()

    build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    calls_file = write_calls(workdir / "calls.bin", call_mix())
    config = {
        "listen": {"tcp": "", "unix": str(workdir / "s.sock")},
        "policy": {"dir": str(bench_bundle(workdir)), "reload": False},
        "evidence": {"dir": str(workdir / "evidence")},
        "telemetry": {"exporter": "none"},
        "sidecar": {"instance_id": "soak"},
        "identity": {"sources": ["dev"]},  # dev mode on purpose: the default is workload_api
    }
    (workdir / "soak.yaml").write_text(yaml.safe_dump(config))
    sidecar = start([PYTHON, "-m", "sidecar", "serve", "--config", str(workdir / "soak.yaml")], "serving",
                    workdir / "sidecar.log")
    seconds = args.minutes * 60
    load = subprocess.Popen(loader_command(f"unix:{workdir / 's.sock'}", ["open", "--rate", str(args.rate)], seconds,
                                           calls_file), stdout=subprocess.PIPE, text=True)
    samples = []
    began = time.monotonic()
    try:
        while load.poll() is None:
            rss, fds, processes = sample(sidecar.pid)
            samples.append((time.monotonic() - began, rss, fds))
            print(f"{samples[-1][0]:7.0f} s  rss {rss:8.1f} MiB  fds {fds:5d}  processes {processes}", flush=True)
            time.sleep(args.every)
        result = json.loads(load.stdout.read().strip().splitlines()[-1])
    finally:
        if load.poll() is None:
            load.kill()
        sidecar.terminate()
        sidecar.wait(timeout=30)
    half = len(samples) // 2
    first, second = samples[1:half] or samples[:1], samples[half:]
    growth = max(s[1] for s in second) - max(s[1] for s in first)
    print(f"\ncalls {result['calls']} ({result['throughput']:.0f}/s), errors {result['errors']}, "
          f"latency ms {json.dumps({k: round(v, 3) for k, v in result['latency_ms'].items()})}")
    print(f"rss max first half {max(s[1] for s in first):.1f} MiB, second half {max(s[1] for s in second):.1f} MiB "
          f"(growth {growth:+.1f} MiB); fds max {max(s[2] for s in samples)}")
    print(f"evidence and logs: {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
