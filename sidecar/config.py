"""Sidecar configuration: YAML in, typed dataclasses out.

Every key is documented in docs/configuration.md. An unknown key or a value
of the wrong type is a ConfigError naming the key (`policy.timeout_ms: ...`),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class ListenConfig:
    # host:port for plaintext (or mTLS, see identity) gRPC; "" to disable.
    tcp: str = "127.0.0.1:50051"
    # Path of a unix socket for agents in the same pod; "" to disable.
    unix: str = ""
    # Extra accept loops for Authorize and Invoke each (sidecar/accept.py); 0 = grpcio's one loop.
    accept_loops: int = 4
    # Calls gRPC may hold before the event loop takes them; past it new ones are refused at once
    # (random early detection up to twice this, then all); 0 = gRPC's own 1000 / 3000. docs/performance.md#past-saturation
    max_pending_calls: int = 128


@dataclass
class OpaConfig:
    # docs/configuration.md. The whole call, retries included, stays inside policy.timeout_ms.
    # "" (default): the sidecar runs and supervises its own OPA on a private unix socket
    # (managed). An http(s) URL: decide through the OPA REST API there (the OPA container
    # beside the sidecar in Kubernetes), which loads its own bundle.
    url: str = ""
    # Decide over plain http:// to an OPA that is not on loopback: only where the network encrypts
    # the hop itself (a service mesh's mutual TLS). Off, such a url is refused at load.
    allow_plaintext: bool = False
    # The OPA binary for the managed OPA and `policy test`: a path, or a name looked up on PATH.
    binary: str = "opa"
    # The managed OPA's own log level (debug, info, error); its lines go to the sidecar's log.
    log_level: str = "error"
    # Longest wait for a managed OPA to answer /health?bundles=true after it starts.
    ready_timeout_ms: int = 15000
    # Longest pause before a managed OPA that died is started again (back-off doubles up to it).
    restart_backoff_max_ms: int = 5000
    # A managed OPA whose GET /health has not answered 200 this long is hung: it is
    # SIGKILLed and restarted. 0 disables it. Not used with an external OPA (url).
    liveness_timeout_ms: int = 5000
    # The managed OPA's GOGC (Go's garbage-collection target, percent of live heap);
    # 0 leaves Go's default (100). Not used with an external OPA (url).
    gogc: int = 400
    # Run the managed OPA under Linux's SCHED_BATCH policy (sched(7)), so that waking it for a
    # decision never preempts the sidecar's own threads; false: the default policy (SCHED_OTHER).
    # Not used with an external OPA (url).
    batch_scheduling: bool = True
    # Extra attempts after a connection error or a 5xx, inside the budget.
    retries: int = 2
    # Pause before the first retry (doubled for each further one).
    retry_backoff_ms: int = 5
    # Consecutive failed decisions that open the circuit breaker: calls then
    # fail fast (deny naming OPA) until a probe succeeds.
    breaker_failures: int = 5
    # How long the breaker stays open before one probe call is let through.
    breaker_cooldown_ms: int = 2000
    # How often OPA's /health?bundles is polled for the sidecar's health.
    health_interval_ms: int = 1000
    health_timeout_ms: int = 500
    # Pooled keep-alive connections to OPA.
    max_connections: int = 32
    # Decisions waiting for OPA at once; a call over it is denied at once (overloaded).
    max_in_flight: int = 64


@dataclass
class PolicyConfig:
    # OPA bundle directory (rego/): policies, tests, data and the tool catalog.
    dir: str = "rego"
    # Whole-decision budget; past it the call is denied.
    timeout_ms: int = 100
    max_input_bytes: int = 1024 * 1024
    max_depth: int = 64
    # Watch `dir`; a changed policy that passes `opa check --strict` and `opa test` is swapped in.
    reload: bool = True
    # OPA: managed by the sidecar (default) or external (opa.url).
    opa: OpaConfig = field(default_factory=OpaConfig)
    # Shadow mode: a candidate bundle directory decided by its own managed OPA beside the real
    # policy, recorded (`shadow` in each decision record) and never enforced. "" = off.
    shadow_dir: str = ""
    # The shadow's own budget; a call waits at most this long for it after the real decision.
    shadow_timeout_ms: int = 50


@dataclass
class IdentityConfig:
    # Where the caller's identity comes from: any of workload_api, mtls,
    # jwt_svid; or dev alone. Order is precedence. The default is the pod's
    # X.509-SVID from the SPIRE Workload API; dev mode exists only when a
    # config says `sources: [dev]` (examples/dev.yaml).
    sources: list[str] = field(default_factory=lambda: ["workload_api"])
    # The SPIFFE ID every caller gets in dev mode (marked source: dev).
    dev_spiffe_id: str = "spiffe://dev.local/agent"
    # SPIFFE Workload API socket, unix:///abs/path; "" = $SPIFFE_ENDPOINT_SOCKET.
    workload_api_socket: str = ""
    # How long a Workload API stream may take to answer before it is reopened.
    workload_api_timeout_ms: int = 10_000
    # Longest pause between attempts to reach the Workload API (exponential backoff).
    workload_api_max_backoff_ms: int = 10_000
    # Trust domains whose callers are accepted (mtls, jwt_svid, delegation);
    # empty = only the sidecar's own trust domain.
    trust_domains: list[str] = field(default_factory=list)
    # The one audience a caller's JWT-SVID must carry; required with jwt_svid.
    jwt_audience: str = ""
    # Base of the audiences delegation links carry (docs/identity.md); never equal to
    # jwt_audience; "" = chains refused (required with jwt_svid unless max_delegation_links is 0).
    delegation_audience: str = ""
    # The most upstream agents a call's x-spiffe-delegation may name; 0 refuses chains.
    max_delegation_links: int = 8


@dataclass
class UsageConfig:
    # Where input.usage is counted: "memory" (this sidecar only, reset on restart)
    # or "postgres" (shared by every sidecar on the database, kept across restarts).
    store: str = "memory"
    # Sliding window behind input.usage.calls_in_window; the same on every
    # sidecar sharing a postgres store.
    window_seconds: int = 60
    # memory: how many (subject, tool) pairs and tasks are tracked before the
    # least recently used are forgotten.
    max_tracked: int = 100_000
    # postgres: libpq connection string or URL; "" = the PG* environment
    # variables. Keep passwords in PGPASSFILE / PGPASSWORD, not here.
    dsn: str = ""
    # Reach a PostgreSQL off the pod without sslmode verify-ca/verify-full: only where the network
    # encrypts the hop itself (a service mesh's mutual TLS). Off, such a dsn is refused at load.
    dsn_allow_plaintext: bool = False
    # postgres: connections per sidecar.
    pool_size: int = 4
    # postgres: budget of one count (waiting for a connection included).
    timeout_ms: int = 250
    # postgres: a task with no call for this long is forgotten (its count restarts).
    task_idle_seconds: float = 86_400.0
    # postgres: when the database cannot count a call, "deny" it (reason
    # usage_unavailable) or count it in this sidecar's "memory" meanwhile.
    on_store_error: str = "deny"


@dataclass
class MetricsConfig:
    # host:port serving Prometheus /metrics; "" disables it.
    listen: str = ""


@dataclass
class SidecarConfig:
    # Instance id in input.request.sidecar and evidence; "" = hostname + pid.
    instance_id: str = ""
    # How many recent call_ids are remembered to refuse reuse with other arguments.
    call_id_memory: int = 100_000
    # Past this event-loop lag a call is denied at once (overloaded) instead of
    # queueing (sidecar/overload.py); 0 turns shedding off.
    overload_lag_ms: int = 500


@dataclass
class EvidenceConfig:
    # Directory of the hash-chained evidence log (docs/evidence.md).
    dir: str = "var/evidence"
    # Start a new file when the current one passes this size; the chain continues.
    rotate_bytes: int = 64 * 1024 * 1024
    # A signed checkpoint every this many records...
    checkpoint_every: int = 1000
    # ...or this many seconds (whichever comes first), and at a clean shutdown.
    checkpoint_seconds: float = 60.0
    # PEM private key (Ed25519, EC or RSA) signing checkpoints, never inside `dir`; "" = the
    # SVID key when identity provides one, else a development key generated as `<dir>-dev-key.pem`.
    signing_key: str = ""
    # Extra copy of every checkpoint, never inside `dir` (put it on another volume);
    # "" = `<dir>-checkpoints.jsonl` beside the directory.
    checkpoint_mirror: str = ""
    # Arguments in records: "digest" (sha256 only), "policy" (in clear only when the
    # decision's obligations say record_arguments: true) or "clear". Secret-looking
    # keys are always redacted.
    arguments: str = "policy"
    # More secret keys (case and separators ignored, substrings) for the one redaction rule set
    # (sidecar/evidence/redaction.py) applied to every record; the built-in keys always apply.
    redact_keys: list[str] = field(default_factory=list)
    # Records allowed to wait for the disk before new ones are refused (and denied).
    max_pending: int = 10_000
    # How long a starting sidecar waits for another writer (a replaced pod still draining on the
    # same volume) to release the directory's lock; 0 = refuse at once.
    lock_wait_seconds: float = 0.0


@dataclass
class TelemetryConfig:
    # Span export of evidence records: "otlp" or "none". OTEL_TRACES_EXPORTER and
    # OTEL_SDK_DISABLED override; the other OTEL_EXPORTER_OTLP_* variables apply.
    exporter: str = "otlp"
    # "grpc" or "http/protobuf"; "" = OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else grpc.
    protocol: str = ""
    # Collector endpoint; "" = OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else the exporter default.
    endpoint: str = ""
    # Export spans over plain http:// (or gRPC with OTEL_EXPORTER_OTLP_[TRACES_]INSECURE=true) to a
    # collector that is not on loopback: only where the network encrypts the hop itself (a service
    # mesh's mutual TLS). Off, such an endpoint is refused at start (docs/evidence.md).
    allow_plaintext: bool = False
    # service.name of the spans; "" = OTEL_SERVICE_NAME, else agent-sidecar.
    service_name: str = ""
    # One export attempt's budget; failed exports are retried with backoff forever.
    export_timeout_seconds: float = 10.0
    max_backoff_seconds: float = 30.0


@dataclass
class EscalationConfig:
    # docs/escalation.md. Where escalations live: "sqlite" (one sidecar) or
    # "postgres" (shared by many sidecars).
    store: str = "sqlite"
    # SQLite file (WAL mode), used when store is sqlite; "" = escalations.db in evidence.dir.
    path: str = ""
    # libpq connection string or URL, used when store is postgres; "" = the PG*
    # environment variables. Keep passwords in PGPASSFILE / PGPASSWORD, not here.
    dsn: str = ""
    # Reach a PostgreSQL off the pod without sslmode verify-ca/verify-full: only where the network
    # encrypts the hop itself (a service mesh's mutual TLS). Off, such a dsn is refused at load.
    dsn_allow_plaintext: bool = False
    # PostgreSQL connections per sidecar.
    pool_size: int = 4
    # Budget of one store operation (connect, lock wait, statement).
    store_timeout_ms: int = 5000
    # A pending escalation nobody decided expires after this long.
    ttl_seconds: float = 900.0
    # An approval must be used (the call repeated) within this long of the decision.
    use_window_seconds: float = 300.0
    # The longest one AwaitDecision call waits, whatever the caller asks.
    await_max_seconds: float = 60.0
    # How often waiters and watchers re-read the store for changes made by other sidecars.
    poll_interval_ms: int = 1000
    # How often overdue escalations and unused approvals are expired (and recorded).
    sweep_interval_seconds: float = 5.0
    # Who may approve, deny and read escalations: people (email:alice@example.org,
    # * matches any characters: email:*@example.org) relayed by a console, or
    # workloads named by their exact SPIFFE ID. Required outside dev mode; in dev
    # mode empty = any caller. Never the call's own subject or its delegation chain.
    approvers: list[str] = field(default_factory=list)
    # The exact SPIFFE IDs of consoles allowed to name the person approving in a
    # request's approver field.
    console_identities: list[str] = field(default_factory=list)
    # Keep a redacted, shortened copy of the arguments for approvers to read.
    preview_arguments: bool = True
    preview_max_bytes: int = 4096
    # POST a JSON notice of each new escalation here ("" = no webhook).
    webhook_url: str = ""
    # Send notices (argument previews, approver-facing text) over plain http:// to a host that is not
    # loopback: only where the network encrypts the hop itself (a service mesh's mutual TLS). Off, such
    # a webhook_url is refused at load.
    webhook_allow_plaintext: bool = False
    # File holding a secret: each notice is signed the Standard Webhooks way (webhook-id,
    # webhook-timestamp, webhook-signature: v1,HMAC). Required with webhook_url outside dev mode.
    webhook_secret_file: str = ""
    webhook_timeout_seconds: float = 5.0
    # Attempts per notice (connection errors, timeouts, 429 and 5xx are retried).
    webhook_attempts: int = 5
    # First pause between attempts; each next one doubles, up to 30 s.
    webhook_backoff_seconds: float = 0.5
    # Base URL of the approvers' console, for links in webhook notices.
    console_url: str = ""


@dataclass
class ConsoleConfig:
    # `agent-sidecar console`: the approvers' web page (docs/escalation.md).
    # host:port the page is served on; put the auth proxy in front of it.
    listen: str = "127.0.0.1:8080"
    # The sidecar whose Approvals API the console uses (host:port or unix:/path);
    # "" = this config's listen.unix, else listen.tcp.
    sidecar: str = ""
    # Reach a console.sidecar that is not on loopback over plaintext gRPC (the console speaks no TLS):
    # only where the network encrypts the hop itself (a service mesh's mutual TLS). Off, such a
    # console.sidecar is refused; put a TLS relay on loopback in front of it (deploy/k8s/console).
    sidecar_allow_plaintext: bool = False
    # A file with a JWT-SVID the console presents to the sidecar (refreshed by
    # e.g. spiffe-helper); required outside dev mode; "" = none (dev mode only).
    token_file: str = ""
    # Request header the auth proxy sets to the signed-in person (e.g.
    # X-Auth-Request-Email); required outside dev mode; "" = everyone is console.dev_approver.
    trusted_header: str = ""
    # Prefix turning the header's value into a person's identity (email:alice@example.org);
    # never spiffe: (a header never names a workload).
    approver_prefix: str = "email:"
    # Dev mode only (identity.sources: [dev]): without trusted_header everyone is this approver.
    dev_approver: str = ""
    # Jaeger UI base URL: trace ids link to {jaeger_url}/trace/{trace_id}; "" = no links.
    jaeger_url: str = ""
    # File with the secret that signs CSRF tokens; "" = a random secret per start.
    csrf_secret_file: str = ""
    # How many decided escalations the history page shows.
    history_limit: int = 100


@dataclass
class CredentialConfig:
    # docs/mcp.md#credentials. What the sidecar attaches to calls to this
    # upstream: "" (nothing), "jwt_svid" or "secret_file". Never logged.
    kind: str = ""
    # jwt_svid: the audience of the JWT-SVID fetched from the Workload API.
    audience: str = ""
    # secret_file: the file holding the secret (a mounted Kubernetes Secret).
    file: str = ""
    # The request header carrying it, and the scheme before the value ("" = none).
    header: str = "authorization"
    scheme: str = "Bearer"


@dataclass
class McpUpstreamConfig:
    # Exactly one of url (Streamable HTTP) and command (stdio: argv).
    url: str = ""
    command: list[str] = field(default_factory=list)
    # Environment of a stdio upstream ({} = the SDK's minimal default environment).
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 30.0
    # Largest tool result (canonical JSON) passed back to the agent.
    max_result_bytes: int = 1024 * 1024
    credential: CredentialConfig = field(default_factory=CredentialConfig)
    # Call it over plain http:// to a host that is not loopback: only where the network encrypts the
    # hop itself (a service mesh's mutual TLS). Off, such a url is refused at load (docs/mcp.md).
    allow_plaintext: bool = False


@dataclass
class McpConfig:
    # docs/mcp.md. host:port of the MCP gateway (Streamable HTTP at /mcp); "" = no TCP listener.
    # HTTPS with mutual TLS when mtls is among identity.sources, else plain HTTP.
    listen: str = ""
    # Path of a unix socket also serving the gateway, for agents in the same pod; "" = none.
    unix: str = ""
    # Upstream MCP servers by name ([a-z0-9-]); their tools are offered as <name>__<tool>.
    upstreams: dict[str, McpUpstreamConfig] = field(default_factory=dict)
    # Escalated calls remembered so that the same call, repeated, carries its approval.
    escalation_memory: int = 10_000
    # How long a client may reuse its tools/list answer (a private cache hint); 0 = ask every time.
    list_ttl_ms: int = 5000
    # An escalated tools/call asks a client with the elicitation capability whether to wait for the
    # approver, then waits up to this long for the decision in the same call; 0 = never ask.
    elicitation_wait_seconds: float = 60.0


@dataclass
class HttpToolConfig:
    # One HTTP tool served by ToolGate.Invoke (docs/mcp.md#invoke-for-http-tools).
    method: str = "POST"
    # URL template: {name} is replaced by the URL-quoted argument `name` (then not sent in the body).
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 10.0
    max_response_bytes: int = 1024 * 1024
    # Response header holding the rollback token, recorded in the invocation record.
    rollback_header: str = "x-rollback-token"
    credential: CredentialConfig = field(default_factory=CredentialConfig)
    # Call it over plain http:// to a host that is not loopback: only where the network encrypts the
    # hop itself (a service mesh's mutual TLS). Off, such a url is refused at load (docs/mcp.md).
    allow_plaintext: bool = False
    # The tool's JSON Schema for its arguments ({} = none): calls are judged by it before policy, without
    # coercion, its defaults filled in (sidecar/invoke/schemas.py, docs/mcp.md#invoke-for-http-tools).
    input_schema: dict = field(default_factory=dict)


@dataclass
class InvokeConfig:
    # HTTP tools by tool name, called by ToolGate.Invoke after an allow.
    tools: dict[str, HttpToolConfig] = field(default_factory=dict)
    # A cached JWT-SVID is replaced this long before it expires (at most 40 % of the time it
    # had left when fetched: docs/mcp.md#credentials).
    jwt_refresh_before_seconds: float = 30.0
    # Seconds the Workload API has to answer one JWT-SVID fetch (a finite number > 0); past it the
    # call is not made (credential_unavailable naming this key: docs/mcp.md#credentials).
    jwt_fetch_timeout_seconds: float = 5.0
    # A task with no call for this long is ended (its later calls denied); 0 = no idle timeout.
    task_idle_seconds: float = 0.0


@dataclass
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
    invoke: InvokeConfig = field(default_factory=InvokeConfig)

    @property
    def dev_mode(self) -> bool:
        """identity.sources is [dev]: the laptop/demo setup, where conveniences may default open."""
        return self.identity.sources == ["dev"]

    def validate(self, *, runs_sidecar: bool = True) -> None:
        """Cross-field checks that a single field's type cannot express.

        Outside dev mode nothing security-relevant may default to open: the
        checks that say "required outside dev mode" are listed in
        docs/configuration.md ("Outside dev mode").

        Every setting is checked on its own first, then what a sidecar serving
        callers needs (`_validate_serving`). `runs_sidecar=False` leaves that
        last part out, for a command that serves nothing (`load_config`).
        """
        for key in ("timeout_ms", "max_input_bytes", "max_depth", "shadow_timeout_ms"):
            if getattr(self.policy, key) <= 0:
                raise ConfigError(f"policy.{key}: must be positive")
        _validate_opa(self.policy.opa)
        _validate_usage(self.usage)
        if not 0 <= self.listen.accept_loops <= 64:
            raise ConfigError("listen.accept_loops: must be 0 to 64 (0 leaves grpcio's one accept loop per method)")
        if not 0 <= self.listen.max_pending_calls <= 100_000:
            raise ConfigError("listen.max_pending_calls: must be 0 to 100000 (0 leaves gRPC's own limits)")
        if self.sidecar.overload_lag_ms < 0:
            raise ConfigError("sidecar.overload_lag_ms: must not be negative (0 turns load shedding off)")
        if not self.listen.tcp and not self.listen.unix:
            raise ConfigError("listen: at least one of listen.tcp and listen.unix is needed")
        for key, address in (("listen.tcp", self.listen.tcp), ("metrics.listen", self.metrics.listen)):
            if address:
                _host_port(address, key)
        for key, path in (("listen.unix", self.listen.unix), ("mcp.unix", self.mcp.unix)):
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                raise ConfigError(f"{key}: {path} is {len(os.fsencode(path))} bytes; a unix socket's path holds at "
                                  f"most {UNIX_PATH_MAX} (Linux's sun_path): choose a shorter one")
        sources = self.identity.sources
        known = ("workload_api", "mtls", "jwt_svid", "dev")
        for source in sources:
            if source not in known:
                raise ConfigError(f"identity.sources: unknown source {source!r} (known: {', '.join(known)})")
        if not sources:
            raise ConfigError("identity.sources: at least one source is needed")
        if "dev" in sources and len(sources) > 1:
            raise ConfigError("identity.sources: 'dev' cannot be combined with a real identity source")
        _validate_evidence_sections(self)
        from sidecar.identity.spiffe_id import SpiffeIdError, validate_spiffe_id

        try:
            validate_spiffe_id(self.identity.dev_spiffe_id)
        except SpiffeIdError as exc:
            raise ConfigError(f"identity.dev_spiffe_id: {exc}") from None
        self._validate_identity_sources()
        _validate_escalation(self.escalation)
        _validate_console(self.console)
        _validate_mcp(self.mcp, self.identity.sources)
        _validate_invoke(self.invoke)
        if runs_sidecar:
            self._validate_serving()

    def _validate_serving(self) -> None:
        """What serving callers needs beyond well-formed settings: a listener for each identity source, and
        outside dev mode the escalation settings whose defaults would be open (docs/configuration.md)."""
        sources = self.identity.sources
        if "mtls" in sources and not (self.listen.tcp or self.mcp.listen):
            raise ConfigError("identity.sources: mtls serves on listen.tcp, which is empty (and so is mcp.listen)")
        if "workload_api" in sources and not self.listen.unix:
            raise ConfigError(
                "identity.sources: workload_api identifies callers on listen.unix, which is empty (the agent "
                "in the pod reaches the sidecar on that unix socket; set listen.unix, e.g. "
                "/run/agent-sidecar/sidecar.sock)"
            )
        if not self.dev_mode:
            _require_closed_escalation(self.escalation)
        else:
            for key, listen in (("listen.tcp", self.listen.tcp), ("mcp.listen", self.mcp.listen)):
                if listen and not _loopback(listen):
                    raise ConfigError(_dev_off_loopback(key, listen))

    def validate_console(self) -> None:
        """What `agent-sidecar console` needs on top of `validate` (raises ConfigError naming the key).

        Outside dev mode the console must know who is signed in (the auth
        proxy's header) and prove its own identity to the sidecar (its
        JWT-SVID); the dev approver is refused.
        """
        console = self.console
        target = console.sidecar
        if target:
            check_grpc_target(target, "console.sidecar")
        if target and not grpc_target_in_pod(target) and not console.sidecar_allow_plaintext:
            raise ConfigError(
                f"console.sidecar: the console's JWT-SVID, the approver it names and every approval would go in "
                f"clear over plaintext gRPC to {target!r} (the console speaks no TLS: anyone on the path could "
                "read and replay the token, or change a denial into an approval): reach the sidecar on loopback "
                "through a TLS relay (ghostunnel, deploy/k8s/console) or its unix socket, or set "
                "console.sidecar_allow_plaintext: true where the network encrypts the hop itself (a service mesh's mTLS)"
            )
        if self.dev_mode:
            if not _loopback(console.listen):
                raise ConfigError(_dev_off_loopback("console.listen", console.listen))
            return
        if console.dev_approver:
            raise ConfigError(
                "console.dev_approver: only in dev mode (identity.sources: [dev]); outside it the person "
                "approving comes from console.trusted_header"
            )
        if not console.trusted_header:
            raise ConfigError(
                "console.trusted_header: required outside dev mode: the header the auth proxy in front of the "
                "console sets to the signed-in person (e.g. X-Auth-Request-Email)"
            )
        if not console.token_file:
            raise ConfigError(
                "console.token_file: required outside dev mode: the console's own JWT-SVID, whose SPIFFE ID the "
                "sidecar lists in escalation.console_identities (without it the console would be whoever its "
                "transport says, e.g. the agent's pod identity on the unix socket)"
            )

    def _validate_identity_sources(self) -> None:
        from sidecar.identity.spiffe_id import SpiffeIdError, validate_trust_domain

        ident = self.identity
        repeated = sorted({s for s in ident.sources if ident.sources.count(s) > 1})
        if repeated:
            raise ConfigError(f"identity.sources: {', '.join(repeated)} listed more than once")
        for i, td in enumerate(ident.trust_domains):
            try:
                validate_trust_domain(td)
            except SpiffeIdError as exc:
                raise ConfigError(f"identity.trust_domains[{i}]: {exc}") from None
        for key in ("workload_api_timeout_ms", "workload_api_max_backoff_ms"):
            if getattr(ident, key) <= 0:
                raise ConfigError(f"identity.{key}: must be positive")
        if ident.max_delegation_links < 0:
            raise ConfigError("identity.max_delegation_links: must be 0 or more")
        socket = ident.workload_api_socket
        if socket and not (socket.startswith("unix://") and socket[len("unix://"):].startswith("/")):
            raise ConfigError(f"identity.workload_api_socket: {socket!r} must look like unix:///absolute/path")
        for key in ("jwt_audience", "delegation_audience"):
            value = getattr(ident, key)
            if value != value.strip() or len(value) > 512:
                raise ConfigError(f"identity.{key}: must be at most 512 characters without surrounding spaces")
        if "jwt_svid" in ident.sources and not ident.jwt_audience:
            raise ConfigError(
                "identity.jwt_audience: required when jwt_svid is among identity.sources "
                "(the audience agents mint their JWT-SVIDs for)"
            )
        self._validate_delegation_audience()
        self._validate_token_transport()

    def _validate_delegation_audience(self) -> None:
        from sidecar.identity.delegation import AUDIENCE_FORBIDDEN

        ident = self.identity
        base = ident.delegation_audience
        if base and any(c in AUDIENCE_FORBIDDEN or c.isspace() for c in base):
            raise ConfigError(
                f"identity.delegation_audience: {base!r} must not hold spaces, '?', '&', '=' or '#' "
                "(each link's audience is built from it, docs/identity.md)"
            )
        if base and base == ident.jwt_audience:
            raise ConfigError(
                "identity.delegation_audience and identity.jwt_audience: must differ, or a delegation link "
                "would be accepted as a caller's own token"
            )
        if base and ident.jwt_audience.startswith(base + "?"):
            raise ConfigError(
                "identity.jwt_audience: must not start with identity.delegation_audience followed by '?' "
                "(that is the shape of a delegation link's audience)"
            )
        if "jwt_svid" in ident.sources and not base and ident.max_delegation_links > 0:
            raise ConfigError(
                "identity.delegation_audience: required with jwt_svid (it no longer falls back to "
                "identity.jwt_audience, so a delegation link cannot pass as a caller's token): set it to a "
                "value other than identity.jwt_audience, or set identity.max_delegation_links: 0 to refuse chains"
            )

    def _validate_token_transport(self) -> None:
        """Bearer tokens never cross a network in clear (JWT-SVID spec section 6.3)."""
        if self.dev_mode or "jwt_svid" not in self.identity.sources or "mtls" in self.identity.sources:
            return
        if self.listen.tcp and not _loopback(self.listen.tcp):
            raise ConfigError(
                f"listen.tcp: {self.listen.tcp} is plaintext (mtls is not among identity.sources), so JWT-SVIDs "
                "sent to it could be read and replayed; add mtls to identity.sources, or listen on loopback "
                "or the unix socket only"
            )


def _validate_usage(usage: UsageConfig) -> None:
    if usage.store not in ("memory", "postgres"):
        raise ConfigError(f"usage.store: must be memory or postgres, not {usage.store!r}")
    if usage.on_store_error not in ("deny", "memory"):
        raise ConfigError(f"usage.on_store_error: must be deny or memory, not {usage.on_store_error!r}")
    for key in ("window_seconds", "max_tracked", "pool_size", "timeout_ms"):
        if getattr(usage, key) <= 0:
            raise ConfigError(f"usage.{key}: must be positive")
    if not usage.task_idle_seconds > 0:
        raise ConfigError("usage.task_idle_seconds: must be positive")
    if usage.store == "postgres":
        _validate_dsn(usage.dsn, "usage.dsn", usage.dsn_allow_plaintext,
                      "every call's usage counters (callers, tools, tasks)",
                      "anyone on the path could read them, or change the counts rate limits decide on")


def _validate_evidence_sections(config: "Config") -> None:
    evidence, telemetry = config.evidence, config.telemetry
    if not evidence.dir:
        raise ConfigError("evidence.dir: must name a directory (every decision is recorded)")
    for key in ("rotate_bytes", "max_pending"):
        if getattr(evidence, key) <= 0:
            raise ConfigError(f"evidence.{key}: must be positive")
    if evidence.lock_wait_seconds < 0:
        raise ConfigError("evidence.lock_wait_seconds: must not be negative (0 refuses a locked directory at once)")
    if evidence.rotate_bytes < 4096:
        raise ConfigError("evidence.rotate_bytes: must be at least 4096")
    if evidence.checkpoint_every < 0 or evidence.checkpoint_seconds < 0:
        raise ConfigError("evidence.checkpoint_every/checkpoint_seconds: must not be negative (0 turns one off)")
    if evidence.checkpoint_every == 0 and evidence.checkpoint_seconds == 0:
        raise ConfigError("evidence: checkpoint_every and checkpoint_seconds cannot both be 0")
    if evidence.arguments not in ("digest", "policy", "clear"):
        raise ConfigError(f"evidence.arguments: must be digest, policy or clear, not {evidence.arguments!r}")
    log_dir = os.path.abspath(evidence.dir)
    for key in ("signing_key", "checkpoint_mirror"):
        path = getattr(evidence, key)
        if path and os.path.commonpath([log_dir, os.path.abspath(path)]) == log_dir:
            raise ConfigError(
                f"evidence.{key}: {path} is inside evidence.dir; whoever can rewrite the log would hold it "
                "too, so keep it elsewhere (another volume)"
            )
    if telemetry.exporter not in ("otlp", "none"):
        raise ConfigError(f"telemetry.exporter: must be otlp or none, not {telemetry.exporter!r}")
    if telemetry.protocol not in ("", "grpc", "http/protobuf"):
        raise ConfigError(f"telemetry.protocol: must be grpc or http/protobuf, not {telemetry.protocol!r}")
    if telemetry.export_timeout_seconds <= 0 or telemetry.max_backoff_seconds <= 0:
        raise ConfigError("telemetry.export_timeout_seconds/max_backoff_seconds: must be positive")
    if telemetry.endpoint:
        check_otlp_endpoint(telemetry.endpoint, "telemetry.endpoint")
    if telemetry.endpoint and not telemetry.allow_plaintext:
        refuse_spans_in_clear(telemetry.endpoint, "telemetry.endpoint")


def _http_url(value: str, key: str) -> None:
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        url.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid URL ({type(exc).__name__}): {url_for_messages(value)}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{key}: must be an http:// or https:// URL with a host, not {url_for_messages(value)}")


def url_for_messages(value: str) -> str:
    """`value` as an error or a log line may show it: scheme and host only. The rest of a URL can be its
    secret (a Slack or Teams incoming-webhook URL is a bearer credential in its path; a tool URL may
    carry ?api_key=; user:password@), so it is shown as "/…", never written out."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        host = url.hostname or ""
    except ValueError:
        url, host = None, ""
    try:
        port = f":{url.port}" if url is not None and url.port is not None else ""
    except ValueError:
        port = ":?"  # not a port number
    if url is not None and url.scheme and url.netloc:
        rest = "/…" if (url.path not in ("", "/") or url.query or url.fragment) else ""
        secret = "…@" if "@" in url.netloc else ""
        return repr(f"{url.scheme}://{secret}{host}{port}{rest}")
    head = value.split("/", 1)[0].split("?", 1)[0]
    if "@" in head:
        head = "…@" + head.rpartition("@")[2]
    return repr(head + ("/…" if len(head) < len(value) else ""))


def _dev_off_loopback(key: str, listen: str) -> str:
    return (
        f"{key}: {listen} is not a loopback address, and in dev mode (identity.sources: [dev]) every caller is "
        "the dev identity and any caller may approve, naming any approver: anyone who reaches the port would "
        "run tools as the agent and approve them. Listen on 127.0.0.1 or ::1 (or the unix socket), or use a "
        "real identity source"
    )


def _refuse_in_clear(url: str, key: str, what: str, harm: str, allowed_by: str) -> None:
    """ConfigError naming `key` when `url` is plain http:// to a host that is not loopback (`host_in_clear`),
    so `what` would cross the network in clear; `allowed_by` is the setting that says the network encrypts
    the hop itself. The one rule for every setting that sends data out."""
    host = host_in_clear(url)
    if host is not None:
        raise ConfigError(
            f"{key}: {what} would go in clear over http:// to {host} ({harm}): use https://, or set "
            f"{allowed_by}: true where the network encrypts the hop itself (a service mesh's mTLS)"
        )


def host_in_clear(url: str) -> str | None:
    """The host `url` reaches in clear off the pod: plain http:// to a host that is not loopback (127.0.0.0/8,
    ::1, localhost: the same pod); None otherwise. The host is urllib's, which aiohttp (yarl) and httpx read
    alike: the scheme in any case, the host after any userinfo (`http://127.0.0.1@evil.example`),
    `127.0.0.1.evil.example` a name."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "http" and not _loopback(f"{parts.hostname or ''}:0"):
        return parts.hostname or ""
    return None


def check_otlp_endpoint(value: str, key: str) -> None:
    """ConfigError naming `key` unless `value` is an http(s)://host[:port][/path] URL, or host:port for
    gRPC, with a port from 0 to 65535 (one past it would be dialled modulo 65536). `key` is
    telemetry.endpoint, or the OTEL_* variable the endpoint came from (sidecar/evidence/spans.py)."""
    if "://" in value:
        _http_url(value, key)
    elif not _is_host_port(value):
        raise ConfigError(f"{key}: must be an http:// or https:// URL, or host:port for gRPC (a port "
                          f"from 0 to 65535), not {url_for_messages(value)}")


def refuse_spans_in_clear(url: str, key: str) -> None:
    """`_refuse_in_clear` for the OTLP span export: `key` is telemetry.endpoint, or the OTEL_* variable the
    endpoint came from (checked where the exporter is built, sidecar/evidence/spans.py)."""
    _refuse_in_clear(url, key, "the evidence spans (who called which tool, outcomes, reasons, approvers) and "
                    "the exporter's headers (OTEL_EXPORTER_OTLP_HEADERS, often a collector's API key)",
                    "anyone on the path could read them, and drop or change the collector's copy of the evidence",
                    "telemetry.allow_plaintext")


def _validate_dsn(dsn: str, key: str, allow_plaintext: bool, what: str, harm: str) -> None:
    """ConfigError naming `key`, never quoting the string (it may hold a password), when libpq cannot read
    `dsn`; or when, with the PG* variables libpq adds to it (read as libpq reads them), it reaches a
    PostgreSQL off the pod (neither a unix socket nor loopback) without sslmode verify-ca or verify-full and
    `allow_plaintext` is off: under prefer or require whoever on the path answers first is the database.
    The rule of `_refuse_in_clear` for a connection string. A service (service=, PGSERVICE) may name any
    host from its file, so it needs a verifying sslmode too."""
    import itertools

    from sidecar.pgconninfo import effective_conninfo

    try:
        effective = effective_conninfo(dsn)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if allow_plaintext:
        return
    sslmode = effective.get("sslmode", "prefer")
    if sslmode in ("verify-ca", "verify-full"):
        return
    hosts = effective.get("host", "").split(",")
    addresses = effective.get("hostaddr", "").split(",")
    off_pod = [
        address or host for host, address in itertools.zip_longest(hosts, addresses, fillvalue="")
        if not (_loopback(f"{address}:0") if address else not host or host.startswith(("/", "@")) or _loopback(f"{host}:0"))
    ]
    if effective.get("service") and not off_pod:
        off_pod = [f"the hosts of service {effective['service']!r}"]
    if off_pod:
        raise ConfigError(
            f"{key}{'' if dsn else ' (the PG* variables)'}: {what} would go to PostgreSQL at {', '.join(off_pod)} "
            f"with sslmode={sslmode} ({harm}): use sslmode=verify-full (in {key} or PGSSLMODE, with the server's "
            f"CA in sslrootcert), or set {key}_allow_plaintext: true where the network encrypts the hop itself "
            "(a service mesh's mTLS)"
        )


def grpc_target_in_pod(target: str) -> bool:
    """A gRPC target a plaintext channel may carry a bearer token to: a unix socket (unix:path, unix:///path),
    or host:port on loopback. Any other form (dns:///, ipv4:, a name) is off the pod, never guessed."""
    return target.startswith("unix:") or _loopback(target)


def refuse_token_in_clear(target: str, option: str, *, http: bool = False) -> None:
    """ConfigError when a command-line client (approvals, rollback) would send a bearer token (`option`,
    --token-file) in clear off the pod: to a gRPC `target` that is not in the pod (grpc_target_in_pod), or,
    with `http`, to a plain http:// URL off loopback (host_in_clear). Those clients speak no TLS, so a token
    sent there could be read and replayed by anyone on the path. The unix socket, or a TLS relay on loopback."""
    if (host_in_clear(target) is None) if http else grpc_target_in_pod(target):
        return
    over = "http://" if http else "plaintext gRPC"
    raise ConfigError(
        f"{option}: the JWT-SVID would go in clear over {over} to {target!r} (this client speaks no TLS: anyone on "
        "the path could read and replay it): reach the sidecar on its unix socket, or on loopback through a TLS "
        "relay (ghostunnel, deploy/k8s/console)"
    )


# The longest path a unix socket binds to: sockaddr_un's sun_path is 108 bytes with the final NUL (unix(7)).
UNIX_PATH_MAX = 107


def check_grpc_target(target: str, key: str) -> None:
    """A gRPC target a client dials: a name-resolver scheme (unix:, dns:, ipv4:, ...) as gRPC reads it, or
    host:port with a port 0-65535, refused otherwise (ConfigError naming `key`): gRPC dials 127.0.0.1:99999
    as port 34463, another server, perhaps one the client's token then goes to."""
    import re

    if not re.match(r"(unix|unix-abstract|dns|ipv4|ipv6|vsock):", target) and not _is_host_port(target):
        raise ConfigError(f"{key}: must be host:port (a port from 0 to 65535; [v6]:port for IPv6) or unix:/path, "
                          f"not {target!r}")


def _host_port(address: str, key: str) -> None:
    """A TCP listener's address is host:port, refused at load otherwise: gRPC would serve listen.tcp
    127.0.0.1:99999 on port 34463 (the port modulo 65536), and a listener the sidecar binds itself would
    fail with a traceback."""
    if not _is_host_port(address):
        raise ConfigError(f"{key}: must be host:port (a port from 0 to 65535; [v6]:port for IPv6), not {address!r}")


def _is_host_port(address: str) -> bool:
    """host:port or [v6]:port, the port 0 to 65535."""
    host, colon, port = address.rpartition(":")
    return bool(colon and host and port.isdigit() and int(port) <= 65535 and host.startswith("[") == host.endswith("]"))


def _loopback(host_port: str) -> bool:
    import ipaddress

    host = host_port.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _identity_pattern(value: str, key: str) -> None:
    scheme, colon, rest = value.partition(":")
    if not colon or not scheme or not rest or "*" in scheme or any(c.isspace() for c in value) or not value.isprintable():
        raise ConfigError(
            f"{key}: {value!r} must be a SPIFFE ID or scheme:value identity (* matches any characters, "
            "e.g. spiffe://example.org/humans/* or email:*@example.org)"
        )
    if scheme == "spiffe":
        if "*" in value:
            raise ConfigError(
                f"{key}: {value!r}: a workload (spiffe://) is named by its exact SPIFFE ID, never a pattern "
                "(approval is a human act; each workload allowed to approve is listed on purpose)"
            )
        from sidecar.identity.spiffe_id import SpiffeIdError, validate_spiffe_id

        try:
            validate_spiffe_id(value)
        except SpiffeIdError as exc:
            raise ConfigError(f"{key}: {exc}") from None


# Longest escalation.ttl_seconds / use_window_seconds: a time that far ahead is still a date.
MAX_ESCALATION_SECONDS = 10 * 365 * 86_400


def _validate_escalation(esc: "EscalationConfig") -> None:
    if esc.store not in ("sqlite", "postgres"):
        raise ConfigError(f"escalation.store: must be sqlite or postgres, not {esc.store!r}")
    if esc.store == "postgres":
        _validate_dsn(esc.dsn, "escalation.dsn", esc.dsn_allow_plaintext,
                      "escalations (argument previews, approvers, decisions)",
                      "anyone on the path could read them, or turn a pending escalation into an approved one")
    for key in ("ttl_seconds", "use_window_seconds", "await_max_seconds", "sweep_interval_seconds",
                "webhook_timeout_seconds", "webhook_backoff_seconds"):
        if not getattr(esc, key) > 0:
            raise ConfigError(f"escalation.{key}: must be positive")
    for key in ("ttl_seconds", "use_window_seconds"):
        if getattr(esc, key) > MAX_ESCALATION_SECONDS:
            # they become RFC 3339 times (expires_at, use_by): past year 9999 none can be written,
            # and every escalated call would fail instead of being answered
            raise ConfigError(f"escalation.{key}: must be at most {MAX_ESCALATION_SECONDS} (10 years)")
    for key in ("pool_size", "store_timeout_ms", "poll_interval_ms", "webhook_attempts"):
        if getattr(esc, key) <= 0:
            raise ConfigError(f"escalation.{key}: must be positive")
    if esc.preview_max_bytes < 0:
        raise ConfigError("escalation.preview_max_bytes: must not be negative")
    if esc.webhook_url:
        _http_url(esc.webhook_url, "escalation.webhook_url")
        if not esc.webhook_allow_plaintext:
            _refuse_in_clear(esc.webhook_url, "escalation.webhook_url", "notices",
                             "anyone on the path could read the arguments' preview and what approvers are told",
                             "escalation.webhook_allow_plaintext")
    if esc.console_url:
        _http_url(esc.console_url, "escalation.console_url")
    for i, pattern in enumerate(esc.approvers):
        _identity_pattern(pattern, f"escalation.approvers[{i}]")
    for i, pattern in enumerate(esc.console_identities):
        _identity_pattern(pattern, f"escalation.console_identities[{i}]")
        if not pattern.startswith("spiffe://"):
            raise ConfigError(f"escalation.console_identities[{i}]: {pattern!r} must be a console's SPIFFE ID")


def _require_closed_escalation(esc: "EscalationConfig") -> None:
    """Outside dev mode, escalation settings that would default open must be set (docs/configuration.md)."""
    if not esc.approvers:
        raise ConfigError(
            "escalation.approvers: required outside dev mode (identity.sources is not [dev]): name who may "
            "approve, e.g. [email:*@example.org] for people signed in at the console (listed in "
            "escalation.console_identities) or the exact SPIFFE ID of a workload allowed to approve; "
            "with it empty any verified caller, another AI agent included, could approve"
        )
    if esc.webhook_url and not esc.webhook_secret_file:
        raise ConfigError(
            "escalation.webhook_secret_file: required with escalation.webhook_url outside dev mode, so the "
            "receiver can tell the sidecar's notices (and their console links) from forged ones"
        )


def _validate_console(console: "ConsoleConfig") -> None:
    import re

    _host_port(console.listen, "console.listen")
    if console.trusted_header and not re.fullmatch(r"[A-Za-z0-9-]{1,128}", console.trusted_header):
        raise ConfigError(f"console.trusted_header: {console.trusted_header!r} is not an HTTP header name")
    if console.jaeger_url:
        _http_url(console.jaeger_url, "console.jaeger_url")
    if not re.fullmatch(r"[a-z][a-z0-9+-]*:([A-Za-z0-9._~/-]*)", console.approver_prefix):
        raise ConfigError(
            f"console.approver_prefix: {console.approver_prefix!r} must start an identity, like 'email:' or 'user:'"
        )
    if console.approver_prefix.startswith("spiffe:"):
        raise ConfigError(
            "console.approver_prefix: must not be spiffe: (the header names a person; workloads are never relayed)"
        )
    if console.dev_approver:
        _identity_pattern(console.dev_approver, "console.dev_approver")
        if "*" in console.dev_approver:
            raise ConfigError("console.dev_approver: must be one identity, not a pattern")
    if console.history_limit <= 0:
        raise ConfigError("console.history_limit: must be positive")


def _validate_credential(credential: CredentialConfig, key: str) -> None:
    import re

    if credential.kind not in ("", "jwt_svid", "secret_file"):
        raise ConfigError(f"{key}.kind: must be jwt_svid or secret_file (or empty), not {credential.kind!r}")
    if credential.kind == "jwt_svid" and not credential.audience:
        raise ConfigError(f"{key}.audience: required with kind jwt_svid")
    if credential.kind == "secret_file" and not credential.file:
        raise ConfigError(f"{key}.file: required with kind secret_file")
    if not re.fullmatch(r"[A-Za-z0-9-]{1,128}", credential.header):
        raise ConfigError(f"{key}.header: {credential.header!r} is not an HTTP header name")
    if credential.scheme and not re.fullmatch(r"[A-Za-z0-9._~+/-]{1,64}", credential.scheme):
        raise ConfigError(f"{key}.scheme: {credential.scheme!r} is not an authorization scheme")


def _refuse_tool_in_clear(url: str, key: str, credential: CredentialConfig, allow_plaintext: bool) -> None:
    """A tool's calls never cross a network in clear: policy decided on the arguments, and the tool must
    receive exactly those, as the agent must receive the tool's own answer. Over plain http:// off loopback
    anyone on the path could change either (or read and replay the credential) after the decision, so
    `url` is refused unless `allow_plaintext` says the network encrypts the hop. One opt-in per upstream
    or tool covers all three."""
    if allow_plaintext:
        return
    what = "its calls' arguments and answers" + (f", and the {credential.kind} credential," if credential.kind else "")
    harm = ("anyone on the path could read them, change the arguments after policy decided on them or the answer "
            "the agent gets" + (", and replay the credential" if credential.kind else ""))
    _refuse_in_clear(url, f"{key}.url", what, harm, f"{key}.allow_plaintext")


def _validate_mcp(mcp: McpConfig, identity_sources: list[str]) -> None:
    from sidecar.mcp.names import UPSTREAM_NAME

    if mcp.listen:
        _host_port(mcp.listen, "mcp.listen")
        if "jwt_svid" in identity_sources and "mtls" not in identity_sources and not _loopback(mcp.listen):
            raise ConfigError(
                f"mcp.listen: {mcp.listen} is plain HTTP (mtls is not among identity.sources), so JWT-SVIDs sent "
                "to it could be read and replayed; add mtls to identity.sources (the gateway then serves HTTPS "
                "with mutual TLS), or listen on loopback (the agent in the same pod reaches it there)"
            )
    if mcp.escalation_memory <= 0:
        raise ConfigError("mcp.escalation_memory: must be positive")
    if mcp.list_ttl_ms < 0:
        raise ConfigError("mcp.list_ttl_ms: must not be negative")
    if not math.isfinite(mcp.elicitation_wait_seconds) or mcp.elicitation_wait_seconds < 0:
        raise ConfigError("mcp.elicitation_wait_seconds: must be a finite number >= 0")
    for name, upstream in mcp.upstreams.items():
        key = f"mcp.upstreams.{name}"
        if not UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(f"{key}: upstream names are 1-32 of a-z 0-9 - (no underscore: tools are exposed as <name>__<tool>)")
        if bool(upstream.url) == bool(upstream.command):
            raise ConfigError(f"{key}: give exactly one of url (Streamable HTTP) and command (stdio)")
        if upstream.url:
            _http_url(upstream.url, f"{key}.url")
            _refuse_tool_in_clear(upstream.url, key, upstream.credential, upstream.allow_plaintext)
        elif upstream.allow_plaintext:
            raise ConfigError(f"{key}.allow_plaintext: only for a Streamable HTTP upstream (url); stdio sends nothing on a network")
        if upstream.timeout_seconds <= 0 or upstream.max_result_bytes <= 0:
            raise ConfigError(f"{key}.timeout_seconds/max_result_bytes: must be positive")
        if upstream.command and upstream.credential.kind:
            raise ConfigError(f"{key}.credential: credentials are attached to Streamable HTTP upstreams only (url)")
        _validate_credential(upstream.credential, f"{key}.credential")


def _validate_invoke(invoke: InvokeConfig) -> None:
    from urllib.parse import urlsplit

    if invoke.jwt_refresh_before_seconds < 0:
        raise ConfigError("invoke.jwt_refresh_before_seconds: must not be negative")
    if not math.isfinite(invoke.jwt_fetch_timeout_seconds) or invoke.jwt_fetch_timeout_seconds <= 0:
        raise ConfigError(
            f"invoke.jwt_fetch_timeout_seconds: must be a finite number of seconds > 0, "
            f"not {invoke.jwt_fetch_timeout_seconds:g}"
        )
    if invoke.task_idle_seconds < 0:
        raise ConfigError("invoke.task_idle_seconds: must not be negative (0 turns the idle timeout off)")
    for name, tool in invoke.tools.items():
        key = f"invoke.tools.{name}"
        if tool.method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ConfigError(f"{key}.method: must be GET, POST, PUT, PATCH or DELETE, not {tool.method!r}")
        try:
            written = urlsplit(tool.url)
        except ValueError:
            written = None  # _http_url names the problem
        if written is not None and ("{" in written.scheme or "{" in written.netloc):
            raise ConfigError(
                f"{key}.url: a placeholder in the scheme, host or port of {url_for_messages(tool.url)} would let the "
                "call's arguments choose where the call goes (its credential with it), and which host the rules "
                "here were checked for; placeholders fill the path and the query only"
            )
        url = tool.url.replace("{", "").replace("}", "")  # the template's URL with its placeholders' names
        _http_url(url, f"{key}.url")
        _refuse_tool_in_clear(url, key, tool.credential, tool.allow_plaintext)
        if tool.timeout_seconds <= 0 or tool.max_response_bytes <= 0:
            raise ConfigError(f"{key}.timeout_seconds/max_response_bytes: must be positive")
        _validate_credential(tool.credential, f"{key}.credential")
        if tool.input_schema:
            from sidecar.invoke.schemas import schema_problem

            problem = schema_problem(tool.input_schema)
            if problem is not None:
                raise ConfigError(f"{key}.input_schema: {problem}")


def _validate_opa(opa: OpaConfig) -> None:
    from urllib.parse import urlsplit

    if opa.log_level not in ("debug", "info", "error"):
        raise ConfigError(f"policy.opa.log_level: must be debug, info or error, not {opa.log_level!r}")
    if not opa.binary:
        raise ConfigError("policy.opa.binary: must name the OPA binary (a path, or a name on PATH)")
    for key in ("ready_timeout_ms", "restart_backoff_max_ms", "max_in_flight"):
        if getattr(opa, key) <= 0:
            raise ConfigError(f"policy.opa.{key}: must be positive")
    if opa.gogc < 0:
        raise ConfigError("policy.opa.gogc: must not be negative (0 leaves Go's default, 100)")
    if opa.liveness_timeout_ms < 0:
        raise ConfigError("policy.opa.liveness_timeout_ms: must not be negative (0 disables it)")
    if not opa.url:
        return
    if opa.url.startswith("unix:"):
        # OPA's --addr=unix:///path: reachable only by containers that mount the socket's volume
        if not opa.url.startswith("unix:///") or "?" in opa.url or "#" in opa.url:
            raise ConfigError(
                f"policy.opa.url: a unix socket is unix:// and an absolute path (unix:///run/opa/opa.sock), not {opa.url!r}"
            )
    else:
        try:
            url = urlsplit(opa.url)
            url.port  # raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(f"policy.opa.url: not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"policy.opa.url: must be an http:// or https:// URL with a host, or unix:///path, not {opa.url!r}"
            )
        if url.query or url.fragment or url.path not in ("", "/"):
            raise ConfigError(f"policy.opa.url: must be OPA's base URL (no path or query), not {opa.url!r}")
        if not opa.allow_plaintext:
            _refuse_in_clear(opa.url, "policy.opa.url", "every call's input (its arguments in full) and OPA's answer",
                             "anyone on the path could read the input, and change a deny into an allow",
                             "policy.opa.allow_plaintext")
    if opa.retries < 0 or opa.retry_backoff_ms < 0:
        raise ConfigError("policy.opa.retries/retry_backoff_ms: must not be negative")
    for key in ("breaker_failures", "breaker_cooldown_ms", "health_interval_ms", "health_timeout_ms", "max_connections"):
        if getattr(opa, key) <= 0:
            raise ConfigError(f"policy.opa.{key}: must be positive")


# How to try a command locally: dev mode exists only where a config asks for it (identity.sources: [dev]).
TRY_LOCALLY = "--config examples/dev.yaml (dev identity: every caller is spiffe://dev.local/agent, marked source: dev)"


def outside_dev_mode(error: ConfigError, command: str, config_file: str | None, config: Config) -> ConfigError:
    """`error` as `agent-sidecar <command>` reports it: outside dev mode, with a line saying which
    config and identity applied and how to try the command locally; in dev mode, unchanged."""
    if config.dev_mode:
        return error
    applied = "no --config was given, so the defaults apply" if config_file is None else f"{config_file} applies"
    return ConfigError(
        f"{error}\n  ({applied}: identity.sources is [{', '.join(config.identity.sources)}], not dev mode, so what "
        f"a sidecar needs outside dev mode must be set (docs/configuration.md#outside-dev-mode). "
        f"To try it locally: agent-sidecar {command} {TRY_LOCALLY})"
    )


def load_sidecar_config(command: str, path: str | None, overrides: dict[str, Any]) -> Config:
    """`load_config` of a sidecar's config (serve; check and console given a file), every check made.

    A refusal of what only a serving sidecar needs (a listener, the settings required outside dev mode)
    says which identity applied and how to try the command locally (`outside_dev_mode`); a bad
    setting's own message is enough.
    """
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        try:
            config = load_config(path, overrides, runs_sidecar=False)
        except ConfigError:
            raise exc from None
        raise outside_dev_mode(exc, command, path, config) from None


def load_command_config(command: str, path: str | None, overrides: dict[str, Any]) -> Config:
    """The config of a command that serves no agent but may be given a sidecar's file (check, console).

    With no file only each setting is checked (`runs_sidecar=False`): nothing a serving sidecar needs
    applies. A file is a sidecar's config, refused where `serve` would refuse it (`load_sidecar_config`).
    """
    if path is None:
        return load_config(None, overrides, runs_sidecar=False)
    return load_sidecar_config(command, path, overrides)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, *, runs_sidecar: bool = True
) -> Config:
    """Load YAML from `path` (defaults when None), apply dotted-key overrides, validate.

    The defaults are not dev mode (identity.sources: [workload_api]), so they
    alone cannot serve: `serve` with no file is refused (listen.unix,
    escalation.approvers). `runs_sidecar=False` is for a command that serves
    nothing and verifies no caller: every setting is still checked, but not
    what only a serving sidecar needs (Config._validate_serving). `policy
    test|replay` and `rollback` always pass it; `check` and `console` only
    when given no file (a file is a sidecar's config: they refuse what `serve`
    would).
    """
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        raw[section][key] = value
    config = _build(Config, raw, "")
    config.validate(runs_sidecar=runs_sidecar)
    return config


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, not {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, not {_kind(value)}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, not {_kind(value)}")
        args = typing.get_args(hint)
        if not args:
            return dict(value)
        out = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key}: keys must be strings, not {_kind(name)}")
            out[name] = _coerce(args[1], item, f"{key}.{name}")
        return out
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, not {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, not {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, not {_kind(value)}")
        if not math.isfinite(value):
            # YAML's .nan and .inf: NaN passes every `<= 0` / `< 0` check below and then means
            # "never" to one comparison and "at once" to another (a timeout, a checkpoint timer)
            raise ConfigError(f"{key}: must be a finite number, not {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, not {_kind(value)}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}"
    )
