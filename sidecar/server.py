"""Compose the sidecar from its config and serve it: gRPC listeners, health, reflection.

This is the one place that knows every stage; each stage is built from its
own config section and used only through its interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.accept import Acceptors
from sidecar.calls import CallIdRegistry
from sidecar.config import Config, ConfigError
from sidecar.evidence import Recorder
from sidecar.evidence.lock import WriterLock
from sidecar.evidence.records import dev_key_path, file_name
from sidecar.evidence.signing import dev_public_key_path
from sidecar.gate import Gate, Step, default_instance_id
from sidecar.health import SidecarHealth
from sidecar.identity import IdentityResolver
from sidecar.identity.factory import IdentityRuntime
from sidecar.identity.workload_api import WorkloadApiSource
from sidecar.metrics import Metrics
from sidecar.newpaths import NewPaths
from sidecar.overload import LoopLag
from sidecar.identity.factory import build_identity as build_identity_runtime
from sidecar.listeners import Listeners, bind_listeners
from sidecar.policy.opa.client import OpaClientOptions
from sidecar.policy.opa.service import ManagedOpaOptions, PolicyRejected, PolicyService
from sidecar.policy.shadow import Shadow
from sidecar.servicer import TOOLGATE_SERVICE, ToolGateServicer
from sidecar.steps import Admit, AskPolicy, Escalate
from sidecar.task_store import TaskStore
from sidecar.tasks import TaskRegistry
from sidecar.usage import UsageCounter
from sidecar.usage.memory import MemoryCounter
from sidecar.v1 import sidecar_pb2

if TYPE_CHECKING:
    from sidecar.escalation.service import EscalationService
    from sidecar.escalation.store import EscalationStore
    from sidecar.evidence.recorder import EvidenceRecorder, PreparedRecorder
    from sidecar.evidence.signing import SigningKey
    from sidecar.invoke.http import HttpInvoker
    from sidecar.mcp.gateway import McpGateway
    from sidecar.usage.postgres import PostgresCounter

log = logging.getLogger(__name__)

T = TypeVar("T")


def _instance_id(config: Config) -> str:
    """`sidecar.instance_id`, or this host and process when unset: what every stage records as `sidecar`."""
    return config.sidecar.instance_id or default_instance_id()


def build_policy(config: Config, *, shadow: bool = False) -> PolicyService:
    """The policy service: a managed OPA on policy.dir, or the OPA at policy.opa.url; not started yet.

    shadow=True: the shadow bundle's service instead (policy.shadow_dir, always a managed OPA,
    budget policy.shadow_timeout_ms; sidecar/policy/shadow.py).
    """
    policy, opa = config.policy, config.policy.opa
    return PolicyService(
        policy.shadow_dir if shadow else policy.dir,
        OpaClientOptions(
            timeout_ms=policy.shadow_timeout_ms if shadow else policy.timeout_ms,
            retries=opa.retries,
            retry_backoff_ms=opa.retry_backoff_ms,
            breaker_failures=opa.breaker_failures,
            breaker_cooldown_ms=opa.breaker_cooldown_ms,
            health_interval_ms=opa.health_interval_ms,
            health_timeout_ms=opa.health_timeout_ms,
            max_connections=opa.max_connections,
            max_in_flight=opa.max_in_flight,
        ),
        url="" if shadow else opa.url,
        managed=ManagedOpaOptions(
            binary=opa.binary,
            log_level=opa.log_level,
            ready_timeout_seconds=opa.ready_timeout_ms / 1000,
            restart_backoff_max_seconds=opa.restart_backoff_max_ms / 1000,
            liveness_timeout_seconds=opa.liveness_timeout_ms / 1000,
            gogc=opa.gogc,
            batch_scheduling=opa.batch_scheduling,
        ),
        reload=policy.reload,
        role="shadow policy" if shadow else "policy",
    )


def build_identity(config: Config) -> IdentityRuntime:
    """The caller resolver, and TLS credentials when the TCP listener serves mTLS.

    Unpacks as `(resolver, server_credentials)`; `.grpc_options` and `.close()`
    come with it (docs/identity.md). Never blocks: the Workload API is watched
    in the background and identity health is NOT_SERVING until an SVID is held.
    """
    return build_identity_runtime(config.identity)


def build_recorder(
    config: Config, policy: PolicyService | None, svid_source: object | None, signing_key: "SigningKey | None",
    lock: WriterLock,
) -> "PreparedRecorder":
    """The evidence log in evidence.dir, read back but not written to yet, shipping its spans over OTLP
    once started (docs/evidence.md; recorder.prepare_recorder): `start()` it once the start is committed.

    Checkpoints are signed with evidence.signing_key (`signing_key`: read_start_files read it),
    else the sidecar's SVID (when the Workload API source is running), else a generated dev key.
    `lock`: evidence.dir's writer lock, taken before any stage started (_claim). `policy`: its catalog
    names the known tools (the service need not be started yet).
    """
    from sidecar.evidence.recorder import prepare_recorder
    from sidecar.evidence.signing import svid_key_provider
    from sidecar.evidence.spans import exporter_from_env

    known_tool = None
    if policy is not None:
        catalog = policy.catalog
        known_tool = lambda tool: catalog.entry(tool) is not None  # noqa: E731
    evidence, telemetry = config.evidence, config.telemetry
    return prepare_recorder(
        evidence.dir,
        instance_id=_instance_id(config),
        signing_key=signing_key,
        key_provider=svid_key_provider(svid_source) if svid_source is not None else None,
        checkpoint_mirror=evidence.checkpoint_mirror,
        rotate_bytes=evidence.rotate_bytes,
        checkpoint_every=evidence.checkpoint_every,
        checkpoint_seconds=evidence.checkpoint_seconds,
        max_pending=evidence.max_pending,
        lock=lock,
        redact_keys=evidence.redact_keys,
        arguments=evidence.arguments,
        known_tool=known_tool,
        exporter=exporter_from_env(
            exporter=telemetry.exporter,
            protocol=telemetry.protocol,
            endpoint=telemetry.endpoint,
            timeout_seconds=telemetry.export_timeout_seconds,
            allow_plaintext=telemetry.allow_plaintext,
        ),
        service_name=telemetry.service_name,
        max_backoff_seconds=telemetry.max_backoff_seconds,
    )


def build_usage(config: Config) -> "MemoryCounter | PostgresCounter":
    """The configured usage counters (docs/configuration.md `usage`); not opened yet."""
    usage = config.usage
    memory = MemoryCounter(usage.window_seconds, usage.max_tracked)
    if usage.store == "memory":
        return memory
    from sidecar.usage.postgres import PostgresCounter

    return PostgresCounter(
        usage.dsn,
        window_seconds=usage.window_seconds,
        task_idle_seconds=usage.task_idle_seconds,
        timeout_ms=usage.timeout_ms,
        pool_size=usage.pool_size,
        fallback=memory if usage.on_store_error == "memory" else None,
    )


def build_gate(
    config: Config,
    policy: PolicyService,
    recorder: Recorder | None,
    metrics: Metrics | None = None,
    usage: UsageCounter | None = None,
    tasks: TaskRegistry | None = None,
    shadow: PolicyService | None = None,
    overload: LoopLag | None = None,
    escalations: "EscalationService | None" = None,
) -> Gate:
    """`usage` None = fresh in-memory counters (`check`: a one-off decision counts nothing shared)."""
    instance_id = _instance_id(config)
    ask = AskPolicy(
        decisions=policy,
        catalog=policy.catalog,
        usage=usage if usage is not None else MemoryCounter(config.usage.window_seconds, config.usage.max_tracked),
        instance_id=instance_id,
        shadow=Shadow(shadow, metrics) if shadow is not None else None,
    )
    steps = default_steps(
        policy=ask,
        call_ids=CallIdRegistry(config.sidecar.call_id_memory),
        max_input_bytes=config.policy.max_input_bytes,
        max_depth=config.policy.max_depth,
        overload=overload,
        tasks=tasks,
        escalations=escalations,
    )
    return Gate(
        steps=steps, policy=ask, recorder=recorder, instance_id=instance_id, escalations=escalations, metrics=metrics
    )


def default_steps(
    *,
    policy: AskPolicy,
    call_ids: CallIdRegistry,
    max_input_bytes: int,
    max_depth: int,
    overload: LoopLag | None = None,
    tasks: TaskRegistry | None = None,
    escalations: "EscalationService | None" = None,
) -> tuple[Step, ...]:
    """The steps of every call, in the order they run (sidecar/steps.py).

    After the last one the Gate records the decision, then announces or withdraws the
    escalation it raised. Without `escalations` an escalate answer carries no escalation id.
    """
    steps: tuple[Step, ...] = (
        Admit(  # may it go to policy: its own checks, caller, load, call-id replay, ended task, a retry's escalation
            max_input_bytes=max_input_bytes,
            max_depth=max_depth,
            call_ids=call_ids,
            overload=overload,
            tasks=tasks,
            escalations=escalations,
        ),
        policy,  # usage, the input document, OPA (and the shadow): the decision
    )
    if escalations is not None:
        steps += (Escalate(escalations),)  # escalate → an escalation; an approved allow uses its approval
    return steps


def build_escalation_store(config: Config) -> "EscalationStore":
    """The configured escalation store (docs/escalation.md), not opened yet. A new escalation is durable
    through its evidence record, so SQLite does not sync it: what a host crash took from the store is
    read back from the log at start (docs/escalation.md#durability; the service's evidence_reader)."""
    from sidecar.escalation.store import open_store

    return open_store(config.escalation, config.evidence.dir, sync_new_escalations=False)


def build_escalations(
    config: Config, store: "EscalationStore", recorder: "EvidenceRecorder | None", webhook_secret: bytes | None
):
    """The escalation service on `store` (opened by the caller; build_escalation_store); not started yet.

    `webhook_secret`: escalation.webhook_secret_file's secret, as read_start_files read it.
    """
    from sidecar.escalation.notify import WebhookNotifier
    from sidecar.escalation.service import EscalationService

    esc = config.escalation
    notifier = None
    if esc.webhook_url:
        notifier = WebhookNotifier(
            esc.webhook_url,
            timeout_seconds=esc.webhook_timeout_seconds,
            attempts=esc.webhook_attempts,
            backoff_seconds=esc.webhook_backoff_seconds,
            secret=webhook_secret,
            console_url=esc.console_url,
        )
    return EscalationService(
        store,
        recorder=recorder,
        evidence_reader=recorder,
        ttl_seconds=esc.ttl_seconds,
        use_window_seconds=esc.use_window_seconds,
        await_max_seconds=esc.await_max_seconds,
        poll_interval_seconds=esc.poll_interval_ms / 1000,
        sweep_interval_seconds=esc.sweep_interval_seconds,
        approvers=esc.approvers,
        console_identities=esc.console_identities,
        preview_arguments=esc.preview_arguments,
        preview_max_bytes=esc.preview_max_bytes,
        redact_keys=config.evidence.redact_keys,
        notifier=notifier,
        instance_id=_instance_id(config),
    )


def build_credential(credential, config: Config):
    """The CredentialProvider for an upstream's `credential` section, or None (docs/mcp.md#credentials)."""
    from sidecar.invoke.credentials import JwtSvidCredential, SecretFileCredential

    if credential.kind == "secret_file":
        return SecretFileCredential(credential.file, header_name=credential.header.lower(), scheme=credential.scheme)
    if credential.kind == "jwt_svid":
        return JwtSvidCredential(
            credential.audience,
            socket=config.identity.workload_api_socket,
            refresh_before_seconds=config.invoke.jwt_refresh_before_seconds,
            fetch_timeout_seconds=config.invoke.jwt_fetch_timeout_seconds,
        )
    return None


def build_http_tools(config: Config):
    """The HTTP invoker for ToolGate.Invoke over `invoke.tools` (docs/mcp.md#invoke-for-http-tools)."""
    from sidecar.invoke.http import HttpInvoker, HttpTool
    from sidecar.invoke.schemas import InputSchema

    return HttpInvoker([
        HttpTool(
            name,
            url=tool.url,
            method=tool.method.upper(),
            headers=dict(tool.headers),
            timeout_seconds=tool.timeout_seconds,
            max_response_bytes=tool.max_response_bytes,
            rollback_header=tool.rollback_header.lower(),
            credential=build_credential(tool.credential, config),
            input_schema=InputSchema(tool.input_schema) if tool.input_schema else None,
        )
        for name, tool in config.invoke.tools.items()
    ])


def build_mcp_gateway(
    config: Config,
    gate: Gate,
    identity: IdentityResolver,
    recorder: Recorder | None,
    listeners: Listeners,
    grpc_address: str = "",
    svid_source: WorkloadApiSource | None = None,
):
    """The MCP gateway in front of `mcp.upstreams` (docs/mcp.md), on the bound `listeners.mcp_tcp`
    and `listeners.mcp_unix`; not started yet.

    With `mtls` among identity.sources its TCP listener serves HTTPS with mutual TLS on the SVID
    and bundles of `svid_source` (the identity runtime's Workload API source; required then).
    """
    from sidecar.invoke.executor import Executor
    from sidecar.invoke.mcp import McpInvoker, McpUpstream
    from sidecar.mcp.gateway import McpGateway
    from sidecar.mcp.tls import SvidSslContexts

    tls = None
    if "mtls" in config.identity.sources and config.mcp.listen:
        if svid_source is None:
            raise ValueError("build_mcp_gateway: mtls needs the Workload API source (svid_source)")
        tls = SvidSslContexts(svid_source, config.identity.trust_domains)

    upstreams = [
        McpUpstream(
            name,
            url=up.url,
            command=up.command,
            env=up.env or None,
            credential=build_credential(up.credential, config),
            timeout_seconds=up.timeout_seconds,
            max_result_bytes=up.max_result_bytes,
        )
        for name, up in config.mcp.upstreams.items()
    ]
    return McpGateway(
        gate=gate,
        identity=identity,
        executor=Executor(sink=recorder, instance_id=gate.instance_id),
        invoker=McpInvoker(upstreams),
        tcp=listeners.mcp_tcp,
        unix=listeners.mcp_unix,
        max_body_bytes=4 * config.policy.max_input_bytes + 64 * 1024,
        escalation_memory=config.mcp.escalation_memory,
        grpc_address=grpc_address,
        list_ttl_ms=config.mcp.list_ttl_ms,
        escalations=gate.escalations,
        elicitation_wait_seconds=config.mcp.elicitation_wait_seconds,
        tls=tls,
    )


def build_grpc_server(config: Config, identity_runtime: IdentityRuntime) -> grpc.aio.Server:
    """The gRPC server, no port bound, no service added yet (sidecar/listeners.py binds its ports)."""
    return grpc.aio.server(
        options=[
            # Room above the policy cap, so an oversized call is denied and recorded,
            # not refused by the transport unseen (docs/api.md: RESOURCE_EXHAUSTED).
            ("grpc.max_receive_message_length", 4 * config.policy.max_input_bytes + 64 * 1024),
            *identity_runtime.grpc_options,  # room for JWT-SVIDs: an oversized one is denied and recorded
            # grpc core sets SO_REUSEPORT on Linux by default: a second server on the same port (another
            # sidecar, any process of this user) would then bind it too and take a share of the calls.
            ("grpc.so_reuseport", 0),
            *_pending_call_limits(config.listen.max_pending_calls),
        ]
    )


def _pending_call_limits(limit: int) -> list[tuple[str, int]]:
    """gRPC core's bound on calls received but not yet taken by the event loop (src/core/server/server.cc:
    past the soft limit new calls are refused at random, more often as the queue grows, past the hard
    limit always). Past saturation the loop takes calls slower than they come, and without a bound they
    queue there unseen by the gate's own bounds (max_in_flight, the loop lag): a fast refusal instead."""
    if limit == 0:
        return []
    return [("grpc.server.max_pending_requests", limit), ("grpc.server.max_pending_requests_hard_limit", 2 * limit)]


class _Serving:
    """The gRPC server and its extra accept loops as a stage: serving inside, then stopped
    with the grace period `RunningSidecar.stop` was given (0 when a start fails)."""

    def __init__(self, server: grpc.aio.Server, acceptors: Acceptors):
        self.server = server
        self.acceptors = acceptors
        self.grace = 0.0

    async def __aenter__(self) -> "_Serving":
        await self.server.start()
        await self.acceptors.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(self.grace)
        await self.acceptors.stop()


@dataclass
class RunningSidecar:
    """A started sidecar: its server, bound addresses and stages, for `serve` and tests."""

    server: grpc.aio.Server
    addresses: list[str]
    policy: PolicyService
    identity: IdentityResolver
    recorder: Recorder | None
    gate: Gate
    health: SidecarHealth
    identity_runtime: IdentityRuntime
    metrics: Metrics
    metrics_port: int | None
    escalations: "EscalationService"
    usage: UsageCounter
    task_store: TaskStore
    http_tools: "HttpInvoker"  # behind ToolGate.Invoke
    shadow: PolicyService | None  # policy.shadow_dir
    overload: LoopLag | None  # sidecar.overload_lag_ms
    mcp: "McpGateway | None"  # when mcp.listen or mcp.unix is set
    _stages: contextlib.AsyncExitStack
    _serving: _Serving

    async def stop(self, grace: float = 5.0) -> None:
        """Stop every stage, in the reverse of the order they started (the gRPC server drains for `grace` s)."""
        self._serving.grace = grace
        await self._stages.aclose()


@dataclass(frozen=True)
class StartFiles:
    """What the files the config names hold, read before any stage starts (read_start_files)."""

    webhook_secret: bytes | None  # escalation.webhook_secret_file
    signing_key: "SigningKey | None"  # evidence.signing_key


def read_start_files(config: Config) -> StartFiles:
    """Read (and check) every file the start needs, or raise ConfigError naming the key.

    A start refused for a config problem must leave nothing behind: no OPA started, no
    `startup` record or checkpoint, no generated dev key, no span export. So what can be
    found wrong without starting anything is found here, first; what another process may
    hold (a port, the evidence lock, a store) is taken next, still before anything starts (_claim).
    """
    from sidecar.escalation.notify import load_webhook_secret
    from sidecar.evidence.signing import SigningError, load_private_key

    esc, evidence = config.escalation, config.evidence
    shadow = config.policy.shadow_dir
    if shadow and not os.path.isdir(shadow):
        raise ConfigError(f"policy.shadow_dir: {shadow}: {'not a' if os.path.exists(shadow) else 'no such'} directory")
    secret = load_webhook_secret(esc.webhook_secret_file) if esc.webhook_url and esc.webhook_secret_file else None
    try:
        key = load_private_key(evidence.signing_key) if evidence.signing_key else None
    except SigningError as exc:
        raise ConfigError(f"evidence.signing_key: {exc}") from None
    return StartFiles(webhook_secret=secret, signing_key=key)


async def start_sidecar(config: Config, *, committed: asyncio.Event | None = None) -> RunningSidecar:
    """Take the listeners, the evidence lock, the log and the stores (_claim), start OPA, commit the
    start with the `startup` record (_commit), build every other stage, serve.

    Each stage is an async context manager entered on one AsyncExitStack as it starts: a start
    that fails part way leaves the stack, closing what had started; a start that succeeds hands
    the stages to RunningSidecar (pop_all), whose `stop` closes them in reverse order. A start
    refused before its commit leaves evidence.dir as it found it (_claim); `committed` is set
    when the commit begins (serve: a signal from then on stops the sidecar once it serves).
    """
    files = read_start_files(config)
    async with contextlib.AsyncExitStack() as stages:
        return await _start(config, files, stages, committed)


@dataclass(frozen=True)
class _Claimed:
    """What the start holds before it starts anything (_claim)."""

    identity_runtime: IdentityRuntime
    server: grpc.aio.Server  # its ports bound, no service added yet
    listeners: Listeners
    recorder: "PreparedRecorder"  # evidence.dir's log, read back; _commit starts it
    escalation_store: "EscalationStore"  # opened
    task_store: TaskStore  # opened
    writer_lock: WriterLock  # evidence.dir's, held until every stage that writes there is closed
    made: tuple[NewPaths, ...]  # what the start created there (and beside), removed if it is refused

    def keep(self) -> None:
        """The start is committed: what it created stays, and LOCK keeps this sidecar's pid."""
        self.writer_lock.keep()
        for paths in self.made:
            paths.keep()


async def _claim(
    config: Config, files: StartFiles, policy: PolicyService, stages: contextlib.AsyncExitStack
) -> _Claimed:
    """Take what another process can hold and check evidence.dir, so a start that cannot have them is
    refused before OPA starts: every listener (a port in use is a ConfigError naming its key;
    sidecar/listeners.py), evidence.dir's writer lock (waited for up to evidence.lock_wait_seconds; a
    SIGINT/SIGTERM cancels the wait), the evidence log read back (a damaged one refuses; nothing is
    written to it before _commit), then the stores in and beside evidence.dir. Each is put on `stages`,
    so a refusal releases what was taken before it.

    A refused start leaves evidence.dir as it found it: every file and directory it created (the
    directory itself, LOCK, the stores' files, the dev key beside it) is noted before it may be created
    and removed again unless the start is kept (_commit), and a LOCK that was there gets its content and
    times back. The lock is released last of all (its callback is pushed before every stage that writes
    in the directory), so nothing is written or removed there once another sidecar may hold it.
    """
    identity_runtime = build_identity(config)  # only watches the Workload API; the TLS listener needs it
    stages.push_async_callback(asyncio.to_thread, identity_runtime.close)
    server = build_grpc_server(config, identity_runtime)
    listeners = bind_listeners(
        server, tcp=config.listen.tcp, unix=config.listen.unix, tls=identity_runtime.server_credentials,
        metrics=config.metrics.listen, mcp_tcp=config.mcp.listen, mcp_unix=config.mcp.unix,
    )
    stages.callback(listeners.close)
    evidence_dir = Path(config.evidence.dir)
    made_dirs = NewPaths()
    made_dirs.note(evidence_dir)
    stages.callback(made_dirs.remove)  # once LOCK is put back and let go
    writer_lock = await WriterLock.acquire(evidence_dir, wait_seconds=config.evidence.lock_wait_seconds)
    stages.callback(writer_lock.release)  # after every stage below closed: the log's and the stores' last writes
    made = NewPaths()
    stages.callback(made.remove)  # under the lock, once the log and the stores are closed
    escalation_store = build_escalation_store(config)
    task_store = TaskStore(evidence_dir / "tasks.db")
    dev_key = dev_key_path(evidence_dir)
    made.note(dev_key, dev_public_key_path(dev_key), evidence_dir / file_name(1),
              *escalation_store.files, *task_store.files)

    async def read_back() -> "PreparedRecorder":
        prepared = await asyncio.to_thread(
            build_recorder, config, policy, identity_runtime.source, files.signing_key, writer_lock
        )
        stages.callback(prepared.close)  # writes nothing; once started, the recorder is its own stage
        return prepared

    recorder = await _through(read_back())
    stages.push_async_callback(escalation_store.aclose)  # closing an unopened store does nothing
    await _through(escalation_store.open())
    await _through(stages.enter_async_context(task_store))
    return _Claimed(
        identity_runtime, server, listeners, recorder, escalation_store, task_store, writer_lock,
        (made_dirs, made, listeners.made),
    )


async def _start(
    config: Config, files: StartFiles, stages: contextlib.AsyncExitStack, committed: asyncio.Event | None
) -> RunningSidecar:
    from sidecar.escalation.grpc_api import EscalationApi
    from sidecar.invoke.executor import Executor

    policy = build_policy(config)  # started after the claim; the recorder names tools from its catalog
    claimed = await _claim(config, files, policy, stages)
    identity_runtime, server, listeners, task_store = (
        claimed.identity_runtime, claimed.server, claimed.listeners, claimed.task_store
    )
    identity = identity_runtime.resolver
    await stages.enter_async_context(policy)
    shadow = None
    if config.policy.shadow_dir:
        try:  # a shadow bundle that fails check/test refuses the start, like policy.dir
            shadow = await stages.enter_async_context(build_policy(config, shadow=True))
        except PolicyRejected as exc:
            raise PolicyRejected([f"policy.shadow_dir {config.policy.shadow_dir}: {p}" for p in exc.problems]) from None
    recorder = await _commit(stages, claimed, committed)
    metrics = Metrics()
    stages.callback(metrics.close)
    usage = await stages.enter_async_context(build_usage(config))
    escalations = await stages.enter_async_context(
        build_escalations(config, claimed.escalation_store, recorder, files.webhook_secret)
    )
    tasks = await stages.enter_async_context(TaskRegistry(
        store=task_store,
        idle_seconds=config.invoke.task_idle_seconds,
        max_tracked=config.usage.max_tracked,
        sink=recorder,
        evidence_reader=recorder,  # entering restores the endings tasks.db lost (docs/mcp.md#tasks)
        instance_id=_instance_id(config),
    ))
    overload = LoopLag(max_lag_seconds=config.sidecar.overload_lag_ms / 1000) if config.sidecar.overload_lag_ms else None
    gate = build_gate(
        config, policy, recorder, metrics, usage, tasks, shadow=shadow, overload=overload, escalations=escalations
    )
    http_tools = await stages.enter_async_context(build_http_tools(config))

    escalation_api = EscalationApi(escalations, identity, dev_mode=config.identity.sources == ["dev"],
                                   own_spiffe_ids=identity_runtime.own_spiffe_ids)
    executor = Executor(sink=recorder, instance_id=gate.instance_id)
    servicer = ToolGateServicer(
        gate, identity, escalation_api, executor=executor, http_tools=http_tools, tasks=tasks
    )
    toolgate = servicer.method_handlers()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(TOOLGATE_SERVICE, toolgate), escalation_api.approvals_handler())
    )
    # The calls every tool call makes get extra accept loops (sidecar/accept.py).
    acceptors = Acceptors(
        server,
        {f"/{TOOLGATE_SERVICE}/{name}": toolgate[name] for name in ("Authorize", "Invoke")},
        loops_per_method=config.listen.accept_loops,
    )
    sources = {"policy": policy.ready, "identity": identity.health}
    if recorder is not None:
        sources["evidence"] = recorder.health
    sources["escalation"] = escalations.health
    sources["usage"] = usage.health
    sources["tasks"] = task_store.health
    if gate.shadow is not None:
        sources["shadow"] = gate.shadow.health
    health = SidecarHealth(sources, [TOOLGATE_SERVICE])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            sidecar_pb2.DESCRIPTOR.services_by_name["ToolGate"].full_name,
            sidecar_pb2.DESCRIPTOR.services_by_name["Approvals"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )

    addresses = listeners.addresses
    serving = await stages.enter_async_context(_Serving(server, acceptors))
    await health.refresh()
    health_task = asyncio.create_task(health.run(), name="health")
    stages.callback(health_task.cancel)
    metrics_port = metrics.serve(listeners.metrics) if listeners.metrics is not None else None
    mcp = None
    if listeners.mcp_tcp is not None or listeners.mcp_unix is not None:
        mcp = await stages.enter_async_context(build_mcp_gateway(
            config, gate, identity, recorder, listeners, addresses[0], svid_source=identity_runtime.source
        ))
    if overload is not None:
        await stages.enter_async_context(overload)  # last: until the sidecar serves, nothing is shed
    return RunningSidecar(
        server, addresses, policy, identity, recorder, gate, health, identity_runtime, metrics, metrics_port,
        escalations, usage, task_store, http_tools, shadow, overload, mcp, stages.pop_all(), serving,
    )


async def _commit(
    stages: contextlib.AsyncExitStack, claimed: _Claimed, committed: asyncio.Event | None
) -> "EvidenceRecorder":
    """Write the `startup` record (after cutting a torn tail the log had: log.EvidenceLog.start), the
    start's first write to the log, and keep what the start made in evidence.dir (_Claimed.keep).

    `committed` is set first: from here a signal (serve) no longer cancels the start, which runs on
    and then stops as a serving sidecar does, the log ending in a closing checkpoint. Should the
    record itself fail, the start is refused and what it created in evidence.dir is removed (a torn
    tail it had cut stays cut, its bytes kept aside).
    """
    if committed is not None:
        committed.set()

    async def start() -> "EvidenceRecorder":
        recorder = await asyncio.to_thread(claimed.recorder.start)
        return await stages.enter_async_context(recorder)

    recorder = await _through(start())
    claimed.keep()
    return recorder


async def _through(step: Awaitable[T]) -> T:
    """Await `step` to its end even when the start is cancelled meanwhile (serve: SIGINT/SIGTERM), then
    let the cancel go on. A step in a thread would otherwise run on after the stages were closed: a
    store or the log opened, a file created, once nothing is left to close or remove it. `step`
    puts what it opens on the stages itself, as soon as it has opened it."""
    running = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise


def _typed(command: Path) -> str:
    """How a person types `command` (shown in the banner): its name when its directory is on
    PATH, else its path, relative to the working directory when below it (`.venv/bin/...`)."""
    if str(command.parent) in os.environ.get("PATH", "").split(os.pathsep):
        return command.name
    relative = os.path.relpath(command)
    return str(command) if relative.startswith("..") else relative


class StartInterrupted(Exception):
    """SIGINT or SIGTERM arrived while the sidecar was starting, before its commit (_commit): the start
    was cancelled (a wait for evidence.dir's lock included), what it had started or taken was closed
    again and evidence.dir is as it was found."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} while starting: stopped; nothing was left running")


async def serve(config: Config) -> None:
    """Run until SIGINT / SIGTERM, then drain in-flight calls and close every stage.

    A signal during the start cancels it (StartInterrupted): the wait for another writer's evidence
    lock (a rolling restart) ends at once, and so does OPA's start, instead of running to its end first.
    Once the start has committed (its `startup` record: _commit) a signal is a stop: the start runs
    on, the sidecar serves and stops at once, and the log ends in a closing checkpoint (exit 0).
    """
    loop = asyncio.get_running_loop()
    committed = asyncio.Event()
    starting = asyncio.create_task(start_sidecar(config, committed=committed), name="start")
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if starting.done() or committed.is_set():
            stop.set()
        else:
            starting.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        sidecar = await starting
    except asyncio.CancelledError:
        if signals and starting.cancelled():
            raise StartInterrupted(signals[0]) from None
        raise
    # What start-up built (modules, stages, the catalog) lives as long as the process: taken out of
    # the collector's view, a full collection no longer walks it, which held the event loop, and
    # every call in flight, for up to 28 ms under load (docs/performance.md; gc.freeze docs).
    gc.collect()
    gc.freeze()
    _, ident_detail = sidecar.identity.health()
    plain_python = Path(sys.executable).with_name("python")  # the name the docs use, when the venv has it
    cli = _typed(Path(sys.executable).with_name("agent-sidecar"))
    python = _typed(plain_python if plain_python.exists() else Path(sys.executable))
    print(f"agent-sidecar {os.getpid()} serving", flush=True)
    for address in sidecar.addresses:
        print(f"  listening on  {address}", flush=True)
    opa = "managed OPA" if sidecar.policy.managed else f"OPA at {config.policy.opa.url}"
    print(f"  policy        {config.policy.dir} ({opa}, revision {sidecar.policy.revision})", flush=True)
    print(f"  identity      {ident_detail}", flush=True)
    if sidecar.recorder is not None:
        exporting = "spans shipped over OTLP" if config.telemetry.exporter == "otlp" else "span export off"
        # The anchor checkpoints are verified against, signed as build_recorder chose (docs/evidence.md#verifying).
        if config.evidence.signing_key:
            anchor = "--key <its public key>"
        elif sidecar.identity_runtime is not None and sidecar.identity_runtime.source is not None:
            anchor = "--bundle <trust bundle PEM>"
        else:
            anchor = f"--key {dev_public_key_path(dev_key_path(config.evidence.dir))}"
        print(f"  evidence      {config.evidence.dir} ({exporting}; `{cli} evidence verify {config.evidence.dir} {anchor}`)",
              flush=True)
    if sidecar.escalations is not None:
        print(
            f"  escalations   {sidecar.escalations.store.describe()} (`{cli} approvals list --address "
            f"{sidecar.addresses[0]}`)",
            flush=True,
        )
    if sidecar.usage is not None:
        print(f"  usage         {sidecar.usage.health()[1]} (input.usage counters)", flush=True)
    print(f"  tasks         {sidecar.task_store.describe()} (owners and endings, kept across restarts)", flush=True)
    if sidecar.mcp is not None:
        where = " and ".join(x for x in (sidecar.mcp.url, f"unix:{config.mcp.unix}" if config.mcp.unix else "") if x)
        print(f"  mcp gateway   {where} ({len(config.mcp.upstreams)} upstreams; docs/mcp.md)", flush=True)
    first = sidecar.addresses[0]
    print("Send a first call from another terminal:", flush=True)
    print(
        f"  {python} -c \"from sidecar.client import Client; "
        f"print(Client('{first}').authorize('search_docs', {{'query': 'sidecar'}}))\"",
        flush=True,
    )
    await stop.wait()
    print("agent-sidecar: stopping, draining in-flight calls", flush=True)
    await sidecar.stop()
