"""docs/evidence.md's tables name every field a real sidecar writes in a decision record."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sidecar.client import AsyncClient
from tests.conftest import REPO


def documented_fields() -> set[str]:
    """The names in the first cell of every table row of docs/evidence.md (`a`, `b`, `c`)."""
    text = (REPO / "docs" / "evidence.md").read_text()
    return {name for cell in re.findall(r"^\| ([^|]+) \|", text, re.MULTILINE) for name in re.findall(r"`(\w+)`", cell)}


async def test_every_field_of_a_decision_record_is_documented(running_sidecar, sidecar_config):
    config = sidecar_config(**{"policy.timeout_ms": 5000, "evidence.checkpoint_every": 1})
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as agent:
        await agent.authorize("read_file", {"path": "/workspace/a.txt"}, task_id="t-1", intent="read",
                              signals={"risk_score": 0.1})  # allow, arguments in clear
        await agent.authorize("read_file", {"path": "/etc/shadow"})  # deny
        await agent.authorize("send_email", {"to": ["a@example.com"], "subject": "s", "body": "b"})  # escalate
        await agent.authorize("nope", {"\x00": 1})  # refused before policy
    records = [json.loads(line) for path in sorted(Path(config.evidence.dir).glob("evidence-*.jsonl"))
               for line in path.read_text().splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert len(decisions) == 4 and any("arguments" in r for r in decisions) and any("input" in r for r in decisions)
    written = set().union(*decisions)
    assert written - documented_fields() == set()
