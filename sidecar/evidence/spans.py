"""Evidence records → OpenTelemetry spans, and the OTLP exporter the shipper uses.

Spans are built from the durable records, never from live calls, so a span
can be rebuilt and re-exported after any outage with identical trace and
span ids and timestamps. A decision record becomes:

    execute_tool {tool}            (tool name only when it is in the catalog;
                                    otherwise the fixed name `execute_tool`)
      └─ run_guardrail policy      (gen_ai.guardrail.* verdict attributes)

Other call records (escalation, approval, ...) become `sidecar.{kind}` spans
in the call's trace when they carry trace ids; a task_end record becomes a
`sidecar.task_end` span (a child of the EndTask caller's span, or of the call
that found the task idle) linked to the task's first call; checkpoints become
`evidence.checkpoint` spans in a trace of their own, so the collector holds
an outside copy of every signed chain head.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from sidecar.config import check_otlp_endpoint, refuse_spans_in_clear
from sidecar.evidence.otlp_tls import PinnedCaSession, RereadingExporter, tls_files
from sidecar.evidence.records import CALL_KINDS, derived_id, parse_rfc3339, reason_code

DEFAULT_SERVICE_NAME = "agent-sidecar"
SCOPE = InstrumentationScope("sidecar.evidence", "0.1.0")

# Kubernetes downward-API variables (first one set wins) → resource attributes.
K8S_ENV = {
    "k8s.pod.name": ("K8S_POD_NAME", "POD_NAME"),
    "k8s.namespace.name": ("K8S_NAMESPACE_NAME", "K8S_NAMESPACE", "POD_NAMESPACE"),
    "k8s.node.name": ("K8S_NODE_NAME", "NODE_NAME"),
    "k8s.pod.uid": ("K8S_POD_UID", "POD_UID"),
}


def service_name(configured: str = "") -> str:
    return configured or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME


class ResourceCache:
    """One Resource per sidecar instance id (records shipped after a restart keep their own instance)."""

    def __init__(self, service: str = "", environ: dict | None = None):
        self.service = service_name(service)
        env = os.environ if environ is None else environ
        self._k8s = {}
        for attribute, names in K8S_ENV.items():
            for name in names:
                if env.get(name):
                    self._k8s[attribute] = env[name]
                    break
        self._cache: dict[str, Resource] = {}

    def __call__(self, instance_id: str) -> Resource:
        resource = self._cache.get(instance_id)
        if resource is None:
            # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES; ours win on conflict.
            attributes = {"service.name": self.service, **self._k8s}
            if instance_id:
                attributes["service.instance.id"] = instance_id
            resource = Resource.create(attributes)
            self._cache[instance_id] = resource
        return resource


def _ns(rfc3339_time: str | None, fallback: int) -> int:
    if not rfc3339_time:
        return fallback
    try:
        moment = parse_rfc3339(rfc3339_time)
    except ValueError:
        return fallback
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _hex_int(value: Any, digits: int) -> int | None:
    if not isinstance(value, str) or len(value) != digits:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number or None


def _context(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _frame(record: dict, start_field: str) -> tuple[int, int, SpanContext | None, int, int] | None:
    """(trace id, span id, parent, start ns, end ns) of a record's span; None without trace and span ids.

    The span runs from `start_field` (RFC 3339) to `logged_at`, never backwards."""
    trace_id = _hex_int(record.get("trace_id"), 32)
    span_id = _hex_int(record.get("span_id"), 16)
    if trace_id is None or span_id is None:
        return None
    parent_id = _hex_int(record.get("parent_span_id"), 16)
    parent = SpanContext(trace_id, parent_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)) if parent_id else None
    end = _ns(record.get("logged_at"), 0)
    start = _ns(record.get(start_field), end)
    return trace_id, span_id, parent, start, max(end, start)


def spans_for_record(record: dict, resources: Callable[[str], Resource]) -> list[ReadableSpan]:
    kind = record.get("kind")
    if kind == "checkpoint":
        return _checkpoint_span(record, resources)
    if kind == "task_end":
        return _task_end_span(record, resources)
    if kind not in CALL_KINDS:
        return []
    frame = _frame(record, "time")
    if frame is None:
        return []
    trace_id, span_id, parent, start, end = frame
    resource = resources(_str(record.get("sidecar")))
    tool = _str(record.get("tool"))
    subject = record.get("subject") if isinstance(record.get("subject"), dict) else {}
    reasons = [r for r in record.get("reasons") or [] if isinstance(r, str)]
    codes = sorted({reason_code(r) for r in reasons})
    outcome = _str(record.get("outcome"))

    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool,
        "gen_ai.tool.call.id": _str(record.get("call_id")),
        "spiffe.id": _str(subject.get("spiffe_id")),
        "sidecar.subject.source": _str(subject.get("source")),
        "sidecar.evidence.kind": kind,
        "sidecar.evidence.seq": int(record.get("seq") or 0),
        "sidecar.evidence.hash": _str(record.get("hash")),
        "sidecar.decision.id": _str(record.get("decision_id")),
        "sidecar.decision.outcome": outcome,
        "sidecar.decision.reason_codes": codes,
        "sidecar.policy.revision": _str(record.get("policy_revision")),
        "sidecar.policy.engine": _str(record.get("engine")),
    }
    for key, attribute in (
        ("server", "sidecar.tool.server"),
        ("task_id", "sidecar.task.id"),
        ("escalation_id", "sidecar.escalation.id"),
        ("approver", "sidecar.approver"),
    ):
        if record.get(key):
            attributes[attribute] = _str(record.get(key))
    if record.get("delegation"):
        attributes["sidecar.delegation"] = [
            _str(d.get("spiffe_id")) for d in record["delegation"] if isinstance(d, dict)
        ]
    shadow = record.get("shadow")
    if isinstance(shadow, dict):  # shadow mode (sidecar/policy/shadow.py): what the candidate bundle said
        attributes["sidecar.shadow.outcome"] = _str(shadow.get("outcome"))
        attributes["sidecar.shadow.reasons"] = [r for r in shadow.get("reasons") or [] if isinstance(r, str)]
        attributes["sidecar.shadow.revision"] = _str(shadow.get("revision"))
        if shadow.get("error"):
            attributes["sidecar.shadow.error"] = _str(shadow.get("error"))
    events = [
        Event(
            "sidecar.decision.reason",
            {"sidecar.reason.code": reason_code(r), "sidecar.reason.text": r},
            timestamp=start,
        )
        for r in reasons
    ]
    status = Status(StatusCode.UNSET)
    engine_error = record.get("engine_error")
    if engine_error:
        status = Status(StatusCode.ERROR, _str(engine_error)[:256])
        attributes["error.type"] = "policy_engine_error"

    if kind == "decision":
        name = f"execute_tool {tool}" if record.get("tool_known") and tool else "execute_tool"
    else:
        name = f"sidecar.{kind}"
        del attributes["gen_ai.operation.name"]
        if record.get("state"):
            attributes["sidecar.escalation.state"] = _str(record.get("state"))
    span = ReadableSpan(
        name=name,
        context=_context(trace_id, span_id),
        parent=parent,
        resource=resource,
        attributes=attributes,
        events=events,
        links=_links(record),
        kind=SpanKind.INTERNAL,
        status=status,
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )
    if kind != "decision":
        return [span]

    engine_ms = record.get("engine_ms")
    guard_end = start + int(engine_ms * 1_000_000) if isinstance(engine_ms, (int, float)) else end
    guard_id = int(derived_id(f"{record.get('span_id')}/run_guardrail", 16), 16)
    verdict_reason = codes[0] if codes else ""
    guard_attributes = {
        "gen_ai.operation.name": "run_guardrail",
        "gen_ai.guardrail.component.name": "policy",
        "gen_ai.guardrail.verdict.type": outcome,
        "gen_ai.guardrail.action.type": {"allow": "allow", "deny": "block", "escalate": "escalate"}.get(outcome, outcome),
        "gen_ai.guardrail.target.type": "tool",
        "gen_ai.guardrail.target.subtype": "tool_call",
        "gen_ai.guardrail.target.id": _str(record.get("call_id")),
        "gen_ai.guardrail.security.policy.id": _str(record.get("policy_revision")),
        "gen_ai.guardrail.verdict.reason": verdict_reason,
        "gen_ai.guardrail.security.content.input.hash": _str(record.get("arguments_digest")),
        "sidecar.policy.engine": _str(record.get("engine")),
    }
    if engine_error:
        guard_attributes["error.type"] = "policy_engine_error"
    guard = ReadableSpan(
        name="run_guardrail policy",
        context=_context(trace_id, guard_id),
        parent=_context(trace_id, span_id),
        resource=resource,
        attributes=guard_attributes,
        kind=SpanKind.INTERNAL,
        status=status,
        start_time=start,
        end_time=max(start, min(guard_end, end)),
        instrumentation_scope=SCOPE,
    )
    return [span, guard]


def _links(record: dict) -> list[trace_api.Link]:
    links = []
    for link in record.get("links") or []:
        if not isinstance(link, dict):
            continue
        link_trace, link_span = _hex_int(link.get("trace_id"), 32), _hex_int(link.get("span_id"), 16)
        if link_trace and link_span:
            links.append(
                trace_api.Link(_context(link_trace, link_span), {"sidecar.link.type": _str(link.get("type"))})
            )
    return links


def _task_end_span(record: dict, resources: Callable[[str], Resource]) -> list[ReadableSpan]:
    """`sidecar.task_end`: when, by whom and how a task ended (sidecar/tasks.py)."""
    frame = _frame(record, "ended_at")
    if frame is None:
        return []
    trace_id, span_id, parent, start, end = frame
    subject = record.get("subject") if isinstance(record.get("subject"), dict) else {}
    reasons = [r for r in record.get("reasons") or [] if isinstance(r, str)]
    attributes: dict[str, Any] = {
        "spiffe.id": _str(subject.get("spiffe_id")),
        "sidecar.subject.source": _str(subject.get("source")),
        "sidecar.evidence.kind": "task_end",
        "sidecar.evidence.seq": int(record.get("seq") or 0),
        "sidecar.evidence.hash": _str(record.get("hash")),
        "sidecar.task.id": _str(record.get("task_id")),
        "sidecar.task.ended_by": _str(record.get("ended_by")),
        "sidecar.task.ended_at": _str(record.get("ended_at")),
    }
    if isinstance(record.get("idle_seconds"), (int, float)):
        attributes["sidecar.task.idle_seconds"] = float(record["idle_seconds"])
    if record.get("last_call_at"):
        attributes["sidecar.task.last_call_at"] = _str(record.get("last_call_at"))
    if record.get("delegation"):
        attributes["sidecar.delegation"] = [
            _str(d.get("spiffe_id")) for d in record["delegation"] if isinstance(d, dict)
        ]
    return [
        ReadableSpan(
            name="sidecar.task_end",
            context=_context(trace_id, span_id),
            parent=parent,
            resource=resources(_str(record.get("sidecar"))),
            attributes=attributes,
            events=[
                Event("sidecar.task.reason", {"sidecar.reason.code": reason_code(r), "sidecar.reason.text": r},
                      timestamp=start)
                for r in reasons
            ],
            links=_links(record),
            kind=SpanKind.INTERNAL,
            start_time=start,
            end_time=end,
            instrumentation_scope=SCOPE,
        )
    ]


def _checkpoint_span(record: dict, resources: Callable[[str], Resource]) -> list[ReadableSpan]:
    checkpoint = record.get("checkpoint") if isinstance(record.get("checkpoint"), dict) else {}
    seed = f"{checkpoint.get('log_id')}/{record.get('seq')}"
    trace_id = int(derived_id(seed + "/trace", 32), 16)
    span_id = int(derived_id(seed + "/span", 16), 16)
    at = _ns(record.get("logged_at"), 0)
    signature = record.get("signature") if isinstance(record.get("signature"), dict) else {}
    signer = record.get("signer") if isinstance(record.get("signer"), dict) else {}
    return [
        ReadableSpan(
            name="evidence.checkpoint",
            context=_context(trace_id, span_id),
            resource=resources(_str(record.get("sidecar"))),
            attributes={
                "sidecar.evidence.kind": "checkpoint",
                "sidecar.evidence.log_id": _str(checkpoint.get("log_id")),
                "sidecar.evidence.seq": int(record.get("seq") or 0),
                "sidecar.evidence.hash": _str(record.get("hash")),
                "sidecar.evidence.checkpoint.seq": int(checkpoint.get("seq") or 0),
                "sidecar.evidence.checkpoint.head_hash": _str(checkpoint.get("head_hash")),
                "sidecar.evidence.checkpoint.signature": _str(signature.get("value")),
                "sidecar.evidence.checkpoint.key_id": _str(signer.get("key_id")),
                "sidecar.evidence.checkpoint.key_source": _str(signer.get("source")),
            },
            kind=SpanKind.INTERNAL,
            start_time=at,
            end_time=at,
            instrumentation_scope=SCOPE,
        )
    ]


def exporter_from_env(
    *,
    exporter: str = "otlp",
    protocol: str = "",
    endpoint: str = "",
    timeout_seconds: float = 10.0,
    allow_plaintext: bool = False,
    environ: dict | None = None,
) -> SpanExporter | None:
    """The span exporter the standard OTEL_* variables ask for; None when export is off.

    Explicit arguments (from config) win over the environment. OTEL_SDK_DISABLED=true
    or OTEL_TRACES_EXPORTER=none turn export off. Spans never go in clear to a collector off
    loopback unless `allow_plaintext` (telemetry.allow_plaintext): ConfigError naming where the
    endpoint came from (`_check_in_clear`). With a CA file in OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE
    (and a client certificate and key for mutual TLS), the exporter is a `RereadingExporter`: the files are
    read again whenever they change (an SVID spiffe-helper rewrites), and an unreadable one fails the export.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    choice = (env.get("OTEL_TRACES_EXPORTER") or exporter or "otlp").split(",")[0].strip().lower()
    if exporter == "none":
        choice = "none"
    if choice == "none":
        return None
    if choice == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if choice != "otlp":
        raise ValueError(f"unsupported traces exporter {choice!r} (otlp, console or none)")
    proto = (
        protocol
        or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip().lower()
    key, url = _resolved_endpoint(endpoint, env)
    if url:
        check_otlp_endpoint(url, key)
        if not allow_plaintext:
            _check_in_clear(proto, key, url, env)
    kwargs: dict[str, Any] = {"timeout": timeout_seconds}
    files = tls_files(env)
    if proto == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if endpoint:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["insecure"] = True
        if files is None or kwargs.get("insecure"):
            return OTLPSpanExporter(**kwargs)
        return RereadingExporter(files, lambda ca, chain, key: OTLPSpanExporter(
            credentials=grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain),
            **kwargs))
    if proto in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if endpoint:
            kwargs["endpoint"] = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        if files is None:
            return HttpExporter(**kwargs)
        # The HTTP exporter takes file names, read by its HTTP client when it connects: rebuilt on a
        # change all the same, so that an unreadable file fails the export here as it does for gRPC.
        return RereadingExporter(files, lambda ca, chain, key: HttpExporter(
            certificate_file=files.ca, client_certificate_file=files.client_certificate or None,
            client_key_file=files.client_key or None, session=PinnedCaSession(), **kwargs))
    raise ValueError(f"unsupported OTLP protocol {proto!r} (grpc or http/protobuf)")


def _resolved_endpoint(endpoint: str, env) -> tuple[str, str]:
    """(where it came from, the endpoint) as the OTLP exporters resolve it: telemetry.endpoint, else
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT; ("", "") for the exporter's
    default (loopback). config.py checks telemetry.endpoint at load; the variables are only known here."""
    if endpoint:
        return "telemetry.endpoint", endpoint
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if env.get(name):
            return name, env[name]
    return "", ""


def _check_in_clear(proto: str, key: str, url: str, env) -> None:
    """The endpoint `url` (from `key`) put through the rule every sending setting follows. gRPC also goes
    in clear to an endpoint without a scheme when OTEL_EXPORTER_OTLP_[TRACES_]INSECURE is true."""
    if proto == "grpc" and "://" not in url:
        insecure = next((name for name in ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
                         if env.get(name) is not None), None)
        if insecure is None or env[insecure].strip().lower() != "true":
            return  # TLS: the gRPC exporter's default for an endpoint without a scheme
        key, url = f"{key} (with {insecure}=true)", f"http://{url}"
    refuse_spans_in_clear(url, key)
