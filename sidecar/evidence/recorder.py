"""The Recorder the gate uses: evidence log + span shipper behind one object.

    recorder = open_recorder(config.evidence, config.telemetry, instance_id=..., known_tool=...)
    receipt = await recorder.record(event)        # durable (fsync'd) when it returns
    receipt = await recorder.append("approval", {...})   # other kinds (escalation stage)
    ok, detail = recorder.health()
    await recorder.close()                        # final checkpoint, stop shipper
"""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from sidecar.config import EvidenceConfig, TelemetryConfig
from sidecar.evidence import DecisionEvent, EvidenceError, Receipt
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.records import ARGUMENT_MODES, decision_fields, dev_key_path
from sidecar.evidence.redaction import Redactor, obligation_keys
from sidecar.evidence.shipper import Shipper
from sidecar.evidence.signing import KeyProvider, SigningError, dev_signing_key, load_private_key
from sidecar.evidence.spans import ResourceCache, exporter_from_env

log = logging.getLogger(__name__)


class EvidenceRecorder:
    def __init__(
        self,
        evidence_log: EvidenceLog,
        shipper: Shipper | None,
        *,
        arguments_mode: str = "policy",
        known_tool: Callable[[str], bool] | None = None,
        record_timeout: float = 10.0,
    ):
        if arguments_mode not in ARGUMENT_MODES:
            raise ValueError(f"arguments mode must be one of {', '.join(ARGUMENT_MODES)}")
        self.log = evidence_log
        self.shipper = shipper
        self.arguments_mode = arguments_mode
        self._known_tool = known_tool
        # How long a decision waits for its record before it is denied instead.
        self.record_timeout = record_timeout

    def _tool_known(self, tool: str) -> bool:
        if self._known_tool is None:
            return False
        try:
            return bool(self._known_tool(tool))
        except Exception:
            return False

    def fields_for(self, event: DecisionEvent) -> dict:
        return decision_fields(
            event,
            arguments_mode=self.arguments_mode,
            tool_known=self._tool_known(event.tool),
        )

    async def record(self, event: DecisionEvent) -> Receipt:
        """Append the decision record; return once it is durable, or raise EvidenceError."""
        try:
            fields = self.fields_for(event)
        except Exception as exc:  # a record we cannot build is a record we do not have
            raise EvidenceError(f"could not build the evidence record: {exc}") from None
        try:
            async with asyncio.timeout(self.record_timeout):
                return await self.log.append("decision", fields, secret_keys=tuple(obligation_keys(event.obligations)))
        except TimeoutError:
            # The record may still land later: the log then holds a decision the agent
            # was told was denied. Over-recording is the safe side; never the reverse.
            raise EvidenceError(
                f"the disk did not confirm the record within {self.record_timeout:g} s"
            ) from None

    async def append(self, kind: str, fields: dict) -> Receipt:
        """Append a record of another kind (escalation, approval, human_denial, expiry, invocation, task_end).

        Records that describe a call should carry `time`, `tool`, `call_id`,
        `decision_id`, `subject`, `outcome`, `reasons`, `trace_id`, `span_id`
        (a fresh span in the call's trace) and `sidecar`, so they show as spans.
        """
        return await self.log.append(kind, fields)

    def health(self) -> tuple[bool, str]:
        ok, detail = self.log.health()
        if self.shipper is not None and ok:
            status = self.shipper.status()
            if status["last_error"]:
                detail += f"; span export failing ({status['last_error']}), retrying: spans wait in the log"
        return ok, detail

    def status(self) -> dict[str, Any]:
        position = self.log.position
        out: dict[str, Any] = {
            "seq": position.seq,
            "file": position.file_index,
            "syncs": self.log.syncs,
            "records": self.log.records_written,
        }
        if self.shipper is not None:
            out["export"] = self.shipper.status()
        return out

    def close_sync(self) -> None:
        self.log.close_sync()
        if self.shipper is not None:
            self.shipper.wake()
            self.shipper.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)


def _version() -> str:
    try:
        return metadata.version("agent-sidecar")
    except metadata.PackageNotFoundError:
        return "unknown"


def open_recorder(
    evidence: EvidenceConfig,
    telemetry: TelemetryConfig | None = None,
    *,
    instance_id: str,
    key_provider: KeyProvider | None = None,
    known_tool: Callable[[str], bool] | None = None,
    exporter: Any = None,
) -> EvidenceRecorder:
    """Open the evidence log in `evidence.dir` and start shipping its spans.

    `evidence` and `telemetry` are config's sections (telemetry None: its defaults, with
    the OTEL_* environment). Checkpoints are signed with `evidence.signing_key`
    when set, else by `key_provider` (the SVID: see signing.svid_key_provider),
    else by a dev key generated next to (never in) the evidence directory. `known_tool(name)` says whether a tool is in the catalog
    (span names use only those). `exporter` overrides the OTLP exporter (tests).
    Raises EvidenceError when the log cannot be opened.
    """
    directory = Path(evidence.dir)
    telemetry = telemetry if telemetry is not None else TelemetryConfig()
    signing_path = evidence.signing_key
    if signing_path or key_provider is None:
        # an explicitly configured key wins; with neither, a generated dev key
        try:
            if signing_path:
                key = load_private_key(signing_path)
            else:
                key = dev_signing_key(dev_key_path(directory))
        except (SigningError, OSError) as exc:
            raise EvidenceError(f"evidence.signing_key: {exc}") from None
        provider: KeyProvider = lambda: key  # noqa: E731
        key_source = key.source
    else:
        provider = key_provider
        key_source = "svid"
    evidence_log = EvidenceLog.open(
        directory,
        instance_id=instance_id,
        rotate_bytes=evidence.rotate_bytes,
        checkpoint_every=evidence.checkpoint_every,
        checkpoint_seconds=evidence.checkpoint_seconds,
        key_provider=provider,
        mirror_path=evidence.checkpoint_mirror or None,
        max_pending=evidence.max_pending,
        lock_wait_seconds=evidence.lock_wait_seconds,
        redactor=Redactor(evidence.redact_keys),
        startup_info={
            "version": _version(),
            "settings": {
                "rotate_bytes": evidence.rotate_bytes,
                "checkpoint_every": evidence.checkpoint_every,
                "checkpoint_seconds": evidence.checkpoint_seconds,
                "arguments": evidence.arguments,
                "signing_key": key_source,
            },
        },
    )
    shipper = None
    try:
        if exporter is None:
            exporter = exporter_from_env(
                exporter=telemetry.exporter,
                protocol=telemetry.protocol,
                endpoint=telemetry.endpoint,
                timeout_seconds=telemetry.export_timeout_seconds,
            )
        if exporter is not None:
            shipper = Shipper(
                directory,
                exporter,
                durable=lambda: evidence_log.position,
                resources=ResourceCache(telemetry.service_name),
                backoff_max=telemetry.max_backoff_seconds,
            )
            evidence_log.add_listener(shipper.wake)
            shipper.start()
    except Exception:
        evidence_log.close_sync()
        raise
    return EvidenceRecorder(
        evidence_log,
        shipper,
        arguments_mode=evidence.arguments,
        known_tool=known_tool,
    )
