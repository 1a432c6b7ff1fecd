"""listen.max_pending_calls: past saturation, calls gRPC holds before the event loop takes them are
bounded, so a flood is refused at once instead of queueing unseen by the gate (docs/performance.md,
"Past saturation"). The real sidecar is stopped (SIGSTOP) while a flood of calls is sent, so that on
SIGCONT they all reach gRPC's queue together, as when the event loop has fallen behind."""

from __future__ import annotations

import asyncio
import collections
import signal
import textwrap
from pathlib import Path

import grpc
import pytest

from sidecar.client import build_request
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.infra.sidecar import SidecarProcess

FLOOD = 120


def stopped_sidecar_flooded(tmp_path: Path, listen: str) -> collections.Counter:
    """Start the sidecar with `listen` settings, stop it, send FLOOD calls, resume it: outcomes by name
    (allow, deny, ...) or gRPC status code."""
    policy = write_policy(tmp_path / "rego", SIMPLE_POLICY)
    socket_path = tmp_path / "s" / "sidecar.sock"
    config = tmp_path / "sidecar.yaml"
    config.write_text(textwrap.dedent(f"""
        listen: {{tcp: "", unix: "{socket_path}", {listen}}}
        policy: {{dir: "{policy}", reload: false, timeout_ms: 5000}}
        sidecar: {{instance_id: pending-test, overload_lag_ms: 0}}
        evidence: {{dir: "{tmp_path / 'ev'}"}}
        telemetry: {{exporter: none}}
        identity: {{sources: [dev]}}
        """))
    sidecar = SidecarProcess(config, tmp_path / "sidecar.log")
    sidecar.start()
    sidecar.wait_serving()

    async def flood() -> collections.Counter:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            await stub.Authorize(build_request("echo", {}), timeout=30)  # connected and warm
            sidecar.send_signal(signal.SIGSTOP)
            try:
                calls = [asyncio.ensure_future(stub.Authorize(build_request("echo", {"n": i}), timeout=60))
                         for i in range(FLOOD)]
                await asyncio.sleep(1.0)  # every call's frames are in the socket before the sidecar runs again
            finally:
                sidecar.send_signal(signal.SIGCONT)
            seen: collections.Counter = collections.Counter()
            for call in calls:
                try:
                    answer = await call
                    seen[sidecar_pb2.Outcome.Name(answer.outcome)] += 1
                except grpc.aio.AioRpcError as error:
                    seen[error.code().name] += 1
            return seen

    try:
        return asyncio.run(flood())
    finally:
        sidecar.stop()


@pytest.mark.parametrize("accept_loops", [0, 4])
def test_a_flood_past_the_bound_is_refused_at_once_and_the_rest_decided(tmp_path, accept_loops):
    seen = stopped_sidecar_flooded(tmp_path, f"accept_loops: {accept_loops}, max_pending_calls: 4")
    assert sum(seen.values()) == FLOOD and set(seen) <= {"OUTCOME_ALLOW", "CANCELLED", "RESOURCE_EXHAUSTED"}, seen
    # gRPC refuses at random past the bound and always past twice it, while the event loop takes
    # calls as the flood is read: most of it is refused, the calls taken are decided.
    assert seen["OUTCOME_ALLOW"] >= 1 and seen["CANCELLED"] + seen["RESOURCE_EXHAUSTED"] >= FLOOD // 2, seen


def test_without_a_bound_of_its_own_grpcs_holds_the_whole_flood(tmp_path):
    seen = stopped_sidecar_flooded(tmp_path, "max_pending_calls: 0")
    assert seen == {"OUTCOME_ALLOW": FLOOD}, seen


@pytest.mark.parametrize("limit", [-1, 100_001])
def test_max_pending_calls_out_of_range_is_a_config_error(limit):
    from sidecar.config import Config, ConfigError

    config = Config()
    config.listen.max_pending_calls = limit
    with pytest.raises(ConfigError, match="listen.max_pending_calls"):
        config.validate()
