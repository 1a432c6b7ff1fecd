"""`ToolGate.Invoke` over a fresh gRPC channel, and the evidence records a test reads back."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from google.protobuf.struct_pb2 import Struct

from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc


async def invoke(address: str, tool: str, arguments: dict) -> sidecar_pb2.InvokeResponse:
    args = Struct()
    args.update(arguments)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        return await stub.Invoke(sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool=tool, arguments=args)))


def records(directory: str | Path) -> list[dict]:
    """Every record of the evidence log in `directory`, in chain order."""
    out = []
    for path in sorted(Path(directory).glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out
