"""The floor: a bare grpc.aio server answering ToolGate.Authorize with a constant ALLOW.

No identity, policy or evidence: the same messages over the same transport,
so sidecar latency / floor latency is what the pipeline adds.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from sidecar.v1 import sidecar_pb2

ANSWER = sidecar_pb2.AuthorizeResponse(outcome=sidecar_pb2.OUTCOME_ALLOW, reasons=["floor: constant"], decision_id="floor")


async def authorize(request: sidecar_pb2.AuthorizeRequest, context) -> sidecar_pb2.AuthorizeResponse:
    return ANSWER


async def main(address: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "sidecar.v1.ToolGate",
                {
                    "Authorize": grpc.unary_unary_rpc_method_handler(
                        authorize,
                        request_deserializer=sidecar_pb2.AuthorizeRequest.FromString,
                        response_serializer=sidecar_pb2.AuthorizeResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    server.add_insecure_port(address)
    await server.start()
    print("floor serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
