"""`agent-sidecar rollback DECISION_ID`: undo a call the sidecar made, with the token it recorded.

    undo = plan_rollback(evidence_dir, policy_dir, decision_id)   # raises RollbackError
    undo.tool, undo.server, undo.arguments                          # the undo call to make

The invocation record of DECISION_ID gives the tool, its server and the
rollback token; the tool's catalog entry names the undo tool:

    tools:
      send_email:
        undo: {tool: recall_email, token_argument: message_token}

The undo call is then made through the running sidecar like any other call
(so it is decided by policy and recorded): through the MCP gateway as
`<server>__<undo tool>` when the original went through an MCP upstream, else
through `ToolGate.Invoke`. Its intent says which decision it undoes, and it
runs in the original call's task.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.evidence.show import iter_lines


class RollbackError(Exception):
    """The decision cannot be rolled back; the message says why."""


class SidecarUnreachable(Exception):
    """The undo call never got an answer from the sidecar at `address` (not running, wrong address)."""

    def __init__(self, address: str, cause: BaseException):
        super().__init__(f"cannot reach the sidecar at {address}: {type(cause).__name__}: {cause}")


def _transport_failure(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first of `kinds` in `exc` or, when the MCP client's task group wrapped it, among its leaves."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _transport_failure(inner, kinds)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class UndoCall:
    decision_id: str
    tool: str
    server: str
    arguments: dict[str, Any]
    task_id: str
    intent: str


def plan_rollback(evidence_dir: str | Path, policy_dir: str | Path, decision_id: str) -> UndoCall:
    from sidecar.policy.catalog import Catalog, CatalogError

    decision = invocation = None
    for _, record in iter_lines(Path(evidence_dir)):
        if record.get("decision_id") != decision_id:
            continue
        if record.get("kind") == "decision":
            decision = record
        elif record.get("kind") == "invocation":
            invocation = record
    if invocation is None:
        raise RollbackError(f"no invocation of decision {decision_id} in {evidence_dir}: the sidecar made no such call")
    token = invocation.get("rollback_token")
    if not token:
        raise RollbackError(f"the call of decision {decision_id} ({invocation.get('tool')}) returned no rollback token")
    try:
        entry = Catalog.read(policy_dir).entry(str(invocation.get("tool")))
    except CatalogError as exc:
        raise RollbackError(f"the policy bundle {policy_dir} cannot be read: {exc}") from None
    undo = (entry or {}).get("undo")
    if not isinstance(undo, dict) or not isinstance(undo.get("tool"), str) or not isinstance(
        undo.get("token_argument"), str
    ):
        raise RollbackError(
            f"the catalog entry of {invocation.get('tool')!r} names no undo tool "
            "(undo: {tool: <name>, token_argument: <argument>})"
        )
    return UndoCall(
        decision_id=decision_id,
        tool=undo["tool"],
        server=str(invocation.get("server") or ""),
        arguments={undo["token_argument"]: token},
        task_id=str((decision or {}).get("task_id") or ""),
        intent=f"rollback of decision {decision_id}",
    )


async def undo_through_gateway(url: str, undo: UndoCall, token: str = "") -> dict[str, Any]:
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    from sidecar.mcp.names import exposed_name

    headers = {"authorization": f"Bearer {token}"} if token else {}
    meta = {"sidecar/intent": undo.intent, "sidecar/task_id": undo.task_id}
    # a transport of our own: no HTTP(S)_PROXY / ALL_PROXY, which would take an http:// gateway on loopback,
    # the token with it, off the machine in clear (as for the sidecar's own upstream calls, invoke/mcp.py)
    http = httpx2.AsyncClient(headers=headers, transport=httpx2.AsyncHTTPTransport())
    try:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            result = await client.call_tool(exposed_name(undo.server, undo.tool), undo.arguments, meta=meta)
    except Exception as exc:
        cause = _transport_failure(exc, (httpx2.HTTPError, OSError))
        if cause is None:
            raise
        raise SidecarUnreachable(url, cause) from None
    meta_out = result.meta or {}
    return {
        "outcome": meta_out.get("sidecar/outcome", ""),
        "decision_id": meta_out.get("sidecar/decision_id", ""),
        "is_error": result.is_error,
        "text": " ".join(getattr(block, "text", "") for block in result.content),
    }


async def undo_through_invoke(address: str, undo: UndoCall, token: str = "") -> dict[str, Any]:
    import grpc
    from google.protobuf.struct_pb2 import Struct

    from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

    arguments = Struct()
    arguments.update(undo.arguments)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            response = await sidecar_pb2_grpc.ToolGateStub(channel).Invoke(
                sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(
                    tool=undo.tool, arguments=arguments, task_id=undo.task_id, intent=undo.intent,
                )),
                metadata=metadata,
                timeout=60,
            )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise SidecarUnreachable(address, RuntimeError(exc.details() or exc.code().name)) from None
        raise RollbackError(f"the sidecar at {address} refused the undo call: {exc.code().name}: {exc.details()}") from None
    return {
        "outcome": sidecar_pb2.Outcome.Name(response.decision.outcome).removeprefix("OUTCOME_").lower(),
        "decision_id": response.decision.decision_id,
        "reasons": list(response.decision.reasons),
        "status": response.status,
        "error": response.error,
    }


def cmd_rollback(args: argparse.Namespace) -> int:
    from sidecar.argtypes import EVIDENCE_DIR, existing_directory
    from sidecar.config import ConfigError, check_grpc_target, load_config, refuse_token_in_clear

    # A client of the running sidecar (its evidence.dir, policy.dir, mcp, listen): it serves nothing itself.
    config = load_config(args.config, runs_sidecar=False)
    if args.address:
        check_grpc_target(args.address, "--address")
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else ""
    except OSError as exc:
        raise ConfigError(f"--token-file: {exc}") from None
    existing_directory(config.evidence.dir, EVIDENCE_DIR, "evidence.dir")
    try:
        undo = plan_rollback(config.evidence.dir, config.policy.dir, args.decision_id)
        if undo.server and undo.server in config.mcp.upstreams:
            url = args.mcp_url or f"http://{config.mcp.listen}/mcp"
            if token:
                refuse_token_in_clear(url, "--token-file", http=True)
            answer = asyncio.run(undo_through_gateway(url, undo, token))
        else:
            address = args.address or config.listen.tcp or f"unix:{config.listen.unix}"
            if token:
                refuse_token_in_clear(address, "--token-file")
            answer = asyncio.run(undo_through_invoke(address, undo, token))
    except RollbackError as exc:
        print(f"agent-sidecar rollback: {exc}", file=sys.stderr)
        return 1
    except SidecarUnreachable as exc:
        print(f"agent-sidecar rollback: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"undo_tool": undo.tool, "server": undo.server, **answer}, indent=2))
    done = answer.get("outcome") == "allow" and not answer.get("is_error") and not answer.get("error")
    return 0 if done else 1


def add_commands(commands: Any) -> None:
    rollback = commands.add_parser(
        "rollback",
        help="undo a call the sidecar made, with its recorded rollback token (decided by policy, recorded)",
        description="Find the invocation of DECISION_ID in evidence.dir, look up the undo tool in the tool's "
        "catalog entry (undo: {tool, token_argument}) and make the undo call through the running sidecar. "
        "Prints the undo call's decision as JSON; exit 0 when it was allowed and succeeded, 1 when it was not "
        "(or the call cannot be undone: the message says why), 2 bad usage or the sidecar could not be reached.",
    )
    rollback.add_argument("decision_id", metavar="DECISION_ID")
    rollback.add_argument("--config", metavar="FILE", help="the sidecar's YAML config (evidence.dir, policy.dir, mcp, listen)")
    rollback.add_argument("--mcp-url", metavar="URL", help="the MCP gateway, overriding http://<mcp.listen>/mcp")
    rollback.add_argument("--address", metavar="ADDR", help="the sidecar's gRPC address for Invoke, overriding listen.*")
    rollback.add_argument("--token-file", metavar="FILE", help="a JWT-SVID to present (authorization: Bearer)")
    rollback.set_defaults(run=cmd_rollback)
