"""Prometheus metrics from a real sidecar: counts per outcome and per-stage timing."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import AsyncClient


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_outcomes_and_time_stages(running_sidecar, sidecar_config):
    sidecar = await running_sidecar(sidecar_config(**{"metrics.listen": "127.0.0.1:0"}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        await client.authorize("read_file", {"path": "/workspace/a"})
        await client.authorize("read_file", {"path": "/workspace/b"})
        await client.authorize("no_such_tool", {})
    samples = await asyncio.to_thread(scrape, sidecar.metrics_port)
    assert samples[("sidecar_decisions_total", (("engine", "opa"), ("outcome", "allow")))] == 2
    assert samples[("sidecar_decisions_total", (("engine", "opa"), ("outcome", "deny")))] == 1
    assert samples[("sidecar_stage_seconds_count", (("stage", "engine"),))] == 3
    assert samples[("sidecar_stage_seconds_count", (("stage", "total"),))] == 3
    assert 0 < samples[("sidecar_stage_seconds_sum", (("stage", "total"),))] < 3
