"""The benchmark's load generator (bench/loadgen, Go), run for real against a small grpc.aio server.

The server answers by tool name (allow, a plain deny, fail-closed denies, an
escalation, a gRPC error), so the loader's JSON can be checked call by call:
what it counts, what it calls fail-closed, that it sends the call file's bytes
as they are, in open and closed loop, over a unix socket and over mTLS.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest

from sidecar.client import build_request
from sidecar.v1 import sidecar_pb2
from tests.doubles.pki import TestCa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from calls import call_mix, write_calls  # noqa: E402

# tool -> (outcome, reasons); "broken" answers a gRPC error instead.
ANSWERS = {
    "allowed": (sidecar_pb2.OUTCOME_ALLOW, ["ok: listed"]),
    "shed": (sidecar_pb2.OUTCOME_DENY, ["overloaded: 64 calls in flight", "policy_timeout: only the first reason counts"]),
    "slow_policy": (sidecar_pb2.OUTCOME_DENY, ["policy_timeout: no decision in 100 ms"]),
    "forbidden": (sidecar_pb2.OUTCOME_DENY, ["path_not_allowed: /etc/passwd", "overloaded: not the first reason"]),
    "risky": (sidecar_pb2.OUTCOME_ESCALATE, ["needs_approval: send_email"]),
    "broken": None,
}
FIELDS = {"mode", "target_rate", "concurrency", "calls", "errors", "error_codes", "seconds", "throughput", "cpu_seconds",
          "latency_ms", "latency_ms_by_outcome", "outcomes", "fail_closed"}
ESCALATE_DELAY_MS = 20  # the server holds escalations this long, so their own percentiles stand apart


@pytest.fixture(scope="session")
def loadgen() -> Path:
    """sidecar-loadgen, built by tools/build.sh (`make test` builds it first; a no-op once built)."""
    done = subprocess.run([str(REPO / "tools" / "build.sh"), "loadgen"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return REPO / ".tools" / "bin" / "sidecar-loadgen"


@pytest.fixture
def calls_file(tmp_path: Path) -> tuple[Path, list[bytes]]:
    calls = [build_request(tool, {"n": i}, task_id="t").SerializeToString() for i, tool in enumerate(ANSWERS)]
    return write_calls(tmp_path / "calls.bin", calls), calls


class Server:
    """ToolGate.Authorize answered by tool name; keeps every request body and the callers' SPIFFE IDs."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.peers: set[str] = set()
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("sidecar.v1.ToolGate", {
            "Authorize": grpc.unary_unary_rpc_method_handler(
                self.authorize, request_deserializer=lambda body: body,
                response_serializer=sidecar_pb2.AuthorizeResponse.SerializeToString),
        }),))

    async def authorize(self, body: bytes, context: grpc.aio.ServicerContext) -> sidecar_pb2.AuthorizeResponse:
        self.bodies.append(body)
        self.peers.update(i.decode() for i in context.auth_context().get("peer_spiffe_id", ()))
        answer = ANSWERS[sidecar_pb2.AuthorizeRequest.FromString(body).tool]
        if answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broken on purpose")
        outcome, reasons = answer
        if outcome == sidecar_pb2.OUTCOME_ESCALATE:
            await asyncio.sleep(ESCALATE_DELAY_MS / 1000)
        return sidecar_pb2.AuthorizeResponse(outcome=outcome, reasons=reasons, decision_id="d")


async def run_loader(loadgen: Path, target: str, calls: Path, *args: str) -> dict:
    process = await asyncio.create_subprocess_exec(
        str(loadgen), target, *args, "--seconds", "1", "--calls", str(calls),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    assert lines[0] == "warmed" and len(lines) == 2, lines
    result = json.loads(lines[1])
    assert set(result) == FIELDS
    return result


def check_counts(result: dict) -> None:
    """Calls go round-robin over the six tools, so each answer kind is a sixth of them (give or take one)."""
    outcomes, fail_closed, share = result["outcomes"], result["fail_closed"], (result["calls"] + result["errors"]) / 6
    assert result["calls"] > 0 and result["calls"] == sum(outcomes.values())
    assert set(outcomes) == {"allow", "deny", "escalate"} and set(fail_closed) == {"overloaded", "policy_timeout"}
    for count in (outcomes["allow"], outcomes["escalate"], fail_closed["overloaded"], fail_closed["policy_timeout"],
                  result["errors"]):
        assert abs(count - share) <= 1, result
    assert abs(outcomes["deny"] - 3 * share) <= 3, result
    assert result["error_codes"] == {"Unavailable": result["errors"]}  # the "broken" tool's, by grpc-go's code name
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"] < 10_000
    by_outcome = result["latency_ms_by_outcome"]
    assert set(by_outcome) == set(outcomes)
    for each in by_outcome.values():
        assert 0 < each["p50"] <= each["p90"] <= each["p99"] <= each["max"] <= latency["max"]
    # every escalation was held, so its own median is at least that long (the mix's, five sixths fast, is not)
    assert by_outcome["escalate"]["p50"] >= ESCALATE_DELAY_MS
    assert result["cpu_seconds"] > 0 and result["seconds"] > 0.9  # open loop: the last call starts at (n-1)/rate
    assert result["throughput"] == pytest.approx(result["calls"] / result["seconds"])


async def test_open_and_closed_loop_over_a_unix_socket(loadgen: Path, calls_file, tmp_path: Path) -> None:
    path, calls = calls_file
    server = Server()
    server.server.add_insecure_port(f"unix:{tmp_path / 'gate.sock'}")
    await server.server.start()
    try:
        opened = await run_loader(loadgen, f"unix:{tmp_path / 'gate.sock'}", path, "open", "--rate", "300")
        assert (opened["mode"], opened["target_rate"], opened["concurrency"]) == ("open", 300, None)
        # Open loop: exactly rate x seconds calls, answered or failed, whatever the latency.
        assert opened["calls"] + opened["errors"] == 300
        check_counts(opened)

        closed = await run_loader(loadgen, f"unix:{tmp_path / 'gate.sock'}", path, "closed", "--concurrency", "8",
                                  "--channels", "2")
        assert (closed["mode"], closed["target_rate"], closed["concurrency"]) == ("closed", None, 8)
        check_counts(closed)
    finally:
        await server.server.stop(None)
    # The bytes on the wire are the call file's, as they are, and every one of them was sent.
    assert set(server.bodies) == set(calls)
    assert Counter(server.bodies)[calls[0]] >= 50 // 6


async def test_mtls_with_the_client_svid_files(loadgen: Path, calls_file, tmp_path: Path) -> None:
    """--tls-dir: the client presents svid.pem/key.pem, trusts bundle.pem, and expects the name sidecar.local."""
    path, _ = calls_file
    ca = TestCa("example.org")
    server_svid = ca.issue("/ns/agents/sa/sidecar", dns_names=("sidecar.local",))
    client_svid = ca.issue("/ns/agents/sa/ops-agent")
    tls_dir = tmp_path / "agent-tls"
    tls_dir.mkdir()
    (tls_dir / "svid.pem").write_bytes(client_svid.chain_pem())
    (tls_dir / "key.pem").write_bytes(client_svid.key_pem())
    (tls_dir / "bundle.pem").write_bytes(ca.bundle_pem())
    server = Server()
    credentials = grpc.ssl_server_credentials([(server_svid.key_pem(), server_svid.chain_pem())],
                                              root_certificates=ca.bundle_pem(), require_client_auth=True)
    port = server.server.add_secure_port("127.0.0.1:0", credentials)
    await server.server.start()
    try:
        result = await run_loader(loadgen, f"127.0.0.1:{port}", path, "closed", "--concurrency", "4",
                                  "--tls-dir", str(tls_dir))
    finally:
        await server.server.stop(None)
    check_counts(result)
    assert server.peers == {"spiffe://example.org/ns/agents/sa/ops-agent"}


def test_the_call_mix_round_trips_through_the_call_file(tmp_path: Path) -> None:
    """bench/calls.py's format: 4-byte big-endian length, then the message; the mix is the documented one."""
    mix = call_mix()
    data = write_calls(tmp_path / "calls.bin", mix).read_bytes()
    read, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        read.append(data[offset + 4:offset + 4 + size])
        offset += 4 + size
    assert read == mix
    tools = Counter(sidecar_pb2.AuthorizeRequest.FromString(call).tool for call in mix)
    assert set(tools) == {"search_docs", "read_file", "no_such_tool", "send_email"}
    assert 0.05 < tools["send_email"] / len(mix) < 0.15
