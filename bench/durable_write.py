"""What one durable evidence write costs from idle: the disk's part of a decision's fixed hops.

The sidecar answers a call only once its evidence record is on disk: appended
and `fdatasync`ed (sidecar/evidence/log.py). At 100 calls/s each record meets
an idle disk queue; this measures that alone, a record-sized line appended to
a file and synced every 10 ms and every 1 ms, in the bench's work directory
(the file system of the runs' evidence logs). bench/targets.py adds it to
OPA's round trip from idle (bench/opa_wakeup.py) and the floor's own p50: the
least a call at 100/s can take when policy is decided by another process and
the record is durable before the answer, whatever the sidecar's own code does.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

GAPS_MS = (10.0, 1.0)  # the pause between writes: 100 and 1,000 calls/s
RECORD = b"x" * 1500 + b"\n"  # about one decision record of the bench mix


def measure(directory: Path, count: int) -> dict[str, dict[str, float]]:
    """`count` appends of one record-sized line, each followed by fdatasync(2), per pause:
    {"every N ms": {"p50_us", "p90_us", "mean_us"}}. The file is removed afterwards."""
    path = directory / "durable-write.bin"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    figures = {}
    try:
        for gap_ms in GAPS_MS:
            times = []
            for _ in range(count):
                time.sleep(gap_ms / 1000)
                start = time.perf_counter()
                os.write(fd, RECORD)
                os.fdatasync(fd)
                times.append((time.perf_counter() - start) * 1e6)
            cuts = statistics.quantiles(times, n=10)
            figures[f"every {gap_ms:g} ms"] = {"p50_us": round(statistics.median(times), 1),
                                               "p90_us": round(cuts[-1], 1),
                                               "mean_us": round(statistics.mean(times), 1)}
    finally:
        os.close(fd)
        path.unlink()
    return figures


def print_table(figures: dict[str, dict[str, float]]) -> None:
    print("\nOne durable evidence write (1.5 KB append + fdatasync), from idle (bench/durable_write.py)")
    print(f"{'pause':<14}{'p50 us':>10}{'p90 us':>10}{'mean us':>10}")
    for gap, row in figures.items():
        print(f"{gap:<14}{row['p50_us']:>10.1f}{row['p90_us']:>10.1f}{row['mean_us']:>10.1f}")
