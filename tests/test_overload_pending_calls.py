"""listen.max_pending_calls: past saturation, calls gRPC holds before the event loop takes them are
bounded, so a flood is refused at once instead of queueing unseen by the gate (docs/performance.md,
"Past saturation"). The real sidecar is stopped (SIGSTOP) while a flood of calls is sent, so that on
SIGCONT they all reach gRPC's queue together, as when the event loop has fallen behind."""

from __future__ import annotations

import asyncio
import collections
import signal
import textwrap
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from sidecar.client import build_request
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.infra.sidecar import SidecarProcess

FLOOD = 120


class CountingRelay:
    """A unix socket in front of the sidecar's that passes every byte on at once, both ways, and counts
    the requests it has passed whole toward the sidecar: HTTP/2 frames that end a client's stream
    (RFC 9113 section 4.1: a DATA or HEADERS frame with END_STREAM). A stopped sidecar reads nothing, so
    once a request is counted and nothing is left in the relay's buffer, it waits in the sidecar's socket:
    the flood is sent before the sidecar runs again, however slowly a loaded machine runs the client."""

    PREFACE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # what a client sends before its first frame
    DATA, HEADERS, END_STREAM = 0x0, 0x1, 0x1

    def __init__(self, target: Path, path: Path):
        self.target, self.path = target, path
        self.ended = 0
        self._to_sidecar: list[asyncio.StreamWriter] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "CountingRelay":
        self._server = await asyncio.start_unix_server(self._relay, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:  # each pipe then reads the end of its stream and stops
            writer.close()
        await asyncio.gather(*self._tasks)

    async def until_in_socket(self, requests: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ended < requests or any(w.transport.get_write_buffer_size() for w in self._to_sidecar):
            assert time.monotonic() < deadline, f"{self.ended} of {requests} requests sent after {timeout:g} s"
            await asyncio.sleep(0.01)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._tasks.append(asyncio.current_task())
        sidecar_reader, sidecar_writer = await asyncio.open_unix_connection(self.target)
        self._to_sidecar.append(sidecar_writer)
        self._writers += [client_writer, sidecar_writer]
        self._tasks.append(asyncio.create_task(self._pipe(sidecar_reader, client_writer)))
        unread, skip, ends_stream = b"", self.PREFACE, False
        async for data in self._chunks(client_reader):
            sidecar_writer.write(data)
            unread += data
            while True:  # frames: 3 bytes of payload length, type, flags, stream id, payload
                dropped = min(skip, len(unread))
                unread, skip = unread[dropped:], skip - dropped
                if skip:
                    break
                self.ended += ends_stream  # counted once its frame has passed whole
                ends_stream = False
                if len(unread) < 9:
                    break
                kind, flags, skip = unread[3], unread[4], int.from_bytes(unread[:3], "big")
                ends_stream = kind in (self.DATA, self.HEADERS) and bool(flags & self.END_STREAM)
                unread = unread[9:]
        sidecar_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for data in self._chunks(reader):
            writer.write(data)
        writer.close()

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """What arrives, until the stream ends or either side drops it."""
        try:
            while data := await reader.read(65536):
                yield data
        except ConnectionError:
            return


def stopped_sidecar_flooded(tmp_path: Path, listen: str) -> collections.Counter:
    """Start the sidecar with `listen` settings, stop it, send FLOOD calls, resume it: outcomes by name
    (OUTCOME_ALLOW; any other with its first reason) or gRPC status code.

    gRPC's bound is the only one in play: the whole flood may wait for OPA at once (over
    policy.opa.max_in_flight's 64, calls taken faster than a loaded OPA answers are denied
    `overloaded`), and a call taken last may wait for all the others within its policy budget."""
    policy = write_policy(tmp_path / "rego", SIMPLE_POLICY)
    socket_path = tmp_path / "s" / "sidecar.sock"
    config = tmp_path / "sidecar.yaml"
    config.write_text(textwrap.dedent(f"""
        listen: {{tcp: "", unix: "{socket_path}", {listen}}}
        policy: {{dir: "{policy}", reload: false, timeout_ms: 30000, opa: {{max_in_flight: {FLOOD}}}}}
        sidecar: {{instance_id: pending-test, overload_lag_ms: 0}}
        evidence: {{dir: "{tmp_path / 'ev'}"}}
        telemetry: {{exporter: none}}
        identity: {{sources: [dev]}}
        """))
    sidecar = SidecarProcess(config, tmp_path / "sidecar.log")
    sidecar.start()
    sidecar.wait_serving()

    async def flood() -> collections.Counter:
        async with CountingRelay(socket_path, tmp_path / "relay.sock") as relay, \
                grpc.aio.insecure_channel(f"unix:{relay.path}") as channel:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            await stub.Authorize(build_request("echo", {}), timeout=30)  # connected and warm
            sidecar.send_signal(signal.SIGSTOP)
            try:
                calls = [asyncio.ensure_future(stub.Authorize(build_request("echo", {"n": i}), timeout=60))
                         for i in range(FLOOD)]
                await relay.until_in_socket(1 + FLOOD, timeout=60)  # the warm call's and the flood's
            finally:
                sidecar.send_signal(signal.SIGCONT)
            seen: collections.Counter = collections.Counter()
            for call in calls:
                try:
                    answer = await call
                    outcome = sidecar_pb2.Outcome.Name(answer.outcome)
                    allowed = answer.outcome == sidecar_pb2.OUTCOME_ALLOW
                    seen[outcome if allowed else f"{outcome}: {answer.reasons[0]}"] += 1  # a failure says why
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
