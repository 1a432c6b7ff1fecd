"""The benchmark's call mix, defined once, and the file the Go load generator reads it from.

`call_mix()` is ~70% allowed, ~20% denied, ~10% escalated tool calls with
realistic arguments, serialized `sidecar.v1.AuthorizeRequest` messages.
`write_calls` stores them for `sidecar-loadgen --calls FILE` (bench/loadgen):
each message is a 4-byte big-endian length followed by that many bytes, in
order; the load generator sends call number i as message i modulo their count.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from sidecar.client import build_request


def call_mix(seed: int = 7, size: int = 2000) -> list[bytes]:
    """~70% allowed, ~20% denied, ~10% escalated, serialized once up front."""
    rng = random.Random(seed)
    words = "quarterly revenue report churn forecast incident latency budget roadmap hiring".split()
    calls = []
    for i in range(size):
        roll = rng.random()
        task = f"task-{rng.randrange(50)}"
        if roll < 0.35:
            request = build_request("search_docs", {"query": " ".join(rng.sample(words, 4)), "limit": 10}, task_id=task,
                                    intent="find background for the weekly report", signals={"risk_score": 0.1, "model": "bench-model"})
        elif roll < 0.70:
            request = build_request("read_file", {"path": f"/workspace/reports/{rng.choice(words)}-{i}.md", "encoding": "utf-8"},
                                    task_id=task, signals={"risk_score": 0.2})
        elif roll < 0.80:
            request = build_request("read_file", {"path": f"/etc/{rng.choice(words)}"}, task_id=task)
        elif roll < 0.90:
            request = build_request("no_such_tool", {"x": i}, task_id=task)
        else:
            body = " ".join(rng.choice(words) for _ in range(200))
            request = build_request("send_email", {"to": [f"user{i}@example.org"], "subject": "Weekly report", "body": body},
                                    task_id=task, signals={"risk_score": 0.5})
        calls.append(request.SerializeToString())
    return calls


def write_calls(path: Path, calls: list[bytes]) -> Path:
    """Write serialized requests length-prefixed (4-byte big-endian) for `sidecar-loadgen --calls`."""
    path.write_bytes(b"".join(struct.pack(">I", len(call)) + call for call in calls))
    return path
