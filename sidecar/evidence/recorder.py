"""The Recorder the gate uses: evidence log + span shipper behind one object.

    recorder = open_recorder(directory, instance_id=..., exporter=exporter_from_env(...), known_tool=...)
    prepared = prepare_recorder(directory, lock=held_lock, ...)   # the sidecar: read back, nothing written
    recorder = prepared.start()                   # once its start is committed (or prepared.close())
    receipt = await recorder.record(event)        # durable (fsync'd) when it returns
    receipt = await recorder.append("approval", {...})   # other kinds (escalation stage)
    ok, detail = recorder.health()
    await recorder.aclose()                       # final checkpoint, stop shipper (or `async with`)
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from opentelemetry.sdk.trace.export import SpanExporter

from sidecar import package_version
from sidecar.evidence import DecisionEvent, EvidenceError, Receipt
from sidecar.evidence.lock import WriterLock, opening
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.readback import records_since
from sidecar.evidence.records import ARGUMENT_MODES, decision_fields, dev_key_path
from sidecar.evidence.redaction import Redactor, obligation_keys
from sidecar.evidence.shipper import Shipper
from sidecar.evidence.signing import KeyProvider, SigningError, SigningKey, dev_signing_key
from sidecar.evidence.spans import ResourceCache

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

    async def record(self, event: DecisionEvent, *, followed_by: Sequence[tuple[str, dict]] = ()) -> Receipt:
        """Append the decision record; return its Receipt once it is durable, or raise EvidenceError.

        `followed_by` (kind, fields) records (the escalation the decision raised) are written in
        one unit with it: right after it, in the same sync, or not at all (log.EvidenceLog.append)."""
        try:
            fields = self.fields_for(event)
        except Exception as exc:  # a record we cannot build is a record we do not have
            raise EvidenceError(f"could not build the evidence record: {exc}") from None
        try:
            async with asyncio.timeout(self.record_timeout):
                return await self.log.append(
                    "decision", fields, secret_keys=tuple(obligation_keys(event.obligations)), followed_by=followed_by
                )
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

    def records_since(self, since: float, match: Callable[[bytes], bool]) -> list[dict]:
        """The log's records logged at or after `since` whose line satisfies `match`, newest first
        (readback.records_since); raises OSError."""
        return records_since(self.log.directory, since, match)

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

    async def __aenter__(self) -> "EvidenceRecorder":
        return self  # open_recorder has opened it

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the log (final checkpoint), then give the shipper up to 2 s to ship it and stop it."""
        await self.log.aclose()
        if self.shipper is not None:
            await asyncio.to_thread(self._stop_shipping)

    def _stop_shipping(self) -> None:
        self.shipper.force_flush(timeout_millis=2000)  # the closing checkpoint, while the collector answers
        self.shipper.shutdown()


def open_recorder(directory: str | Path, *, lock: WriterLock | None = None, **options: Any) -> EvidenceRecorder:
    """`prepare_recorder`, then `start`, in one step (tools and tests). `lock`: the directory's writer
    lock, already held and the caller's to release; None = taken now (refused when another writer holds
    it) and released when the log closes."""
    with opening(directory, lock) as (held, owned):
        return prepare_recorder(directory, lock=held, owns_lock=owned, **options).start()


def prepare_recorder(
    directory: str | Path,
    *,
    lock: WriterLock,
    owns_lock: bool = False,
    instance_id: str,
    signing_key: SigningKey | None = None,
    key_provider: KeyProvider | None = None,
    checkpoint_mirror: str = "",
    rotate_bytes: int = 64 * 1024 * 1024,
    checkpoint_every: int = 1000,
    checkpoint_seconds: float = 60.0,
    max_pending: int = 10_000,
    redact_keys: Sequence[str] = (),
    arguments: str = "policy",
    known_tool: Callable[[str], bool] | None = None,
    exporter: SpanExporter | None = None,
    service_name: str = "",
    max_backoff_seconds: float = 30.0,
) -> "PreparedRecorder":
    """Read the evidence log in `directory` back and choose the checkpoint key, writing nothing in
    `directory`: `start()` on the result writes the startup record and, with an `exporter`, starts
    shipping spans. So a start refused in between (server.py: its policy) leaves the log as it was.

    Every argument is a plain value; the defaults are config.py's `evidence`/`telemetry`
    defaults (docs/configuration.md; tests/test_evidence_log.py checks they agree), and
    the composition root (server.build_recorder) passes the configured ones.

    - `directory`: the log's directory. `instance_id`: the sidecar
      instance written into every record (`sidecar`) and span (`service.instance.id`).
    - `lock`: the directory's writer lock, held by the caller (lock.WriterLock.acquire, where the
      wait for another writer is), who releases it once the recorder is closed; `owns_lock`: the
      log releases it instead, when it closes (open_recorder's own).
    - Checkpoint signing: `signing_key` (evidence.signing_key, read by server.read_start_files) when set, else
      `key_provider` (the SVID: signing.svid_key_provider), else a dev key generated here as
      `<directory>-dev-key.pem`, beside (never in) the directory.
    - `checkpoint_mirror`: path of the checkpoint copy; "" = `<directory>-checkpoints.jsonl`.
    - `rotate_bytes` (bytes), `checkpoint_every` (records; 0 = never by count),
      `checkpoint_seconds` (seconds; 0 = never by time), `max_pending` (records waiting
      for the disk before new ones are refused): see log.EvidenceLog.
    - `redact_keys`: extra secret keys for the one redaction rule set (redaction.py).
    - `arguments`: "digest", "policy" or "clear" (records.ARGUMENT_MODES).
    - `known_tool(name)`: whether a tool is in the catalog (span names use only those).
    - `exporter`: where spans go (spans.exporter_from_env builds it from config and the
      OTEL_* environment); None = no span export. The recorder owns it: it is shut down
      by `aclose()` (or the prepared recorder's `close()`), and at once when opening fails.
      `service_name` ("" = OTEL_SERVICE_NAME, else agent-sidecar) and `max_backoff_seconds`
      (the longest wait between export retries, seconds) apply to the shipper.

    Raises EvidenceError when the signing key cannot be read or made, or the log cannot be
    read back (log.EvidenceLog.recover); ValueError for an `arguments` mode not in ARGUMENT_MODES.
    """
    try:
        if arguments not in ARGUMENT_MODES:
            raise ValueError(f"arguments mode must be one of {', '.join(ARGUMENT_MODES)}")
        directory = Path(directory)
        if signing_key is not None or key_provider is None:
            # an explicitly configured key wins; with neither, a generated dev key
            try:
                key = signing_key if signing_key is not None else dev_signing_key(dev_key_path(directory))
            except (SigningError, OSError) as exc:
                raise EvidenceError(f"evidence.signing_key: {exc}") from None
            provider: KeyProvider = lambda: key  # noqa: E731
            key_source = key.source
        else:
            provider = key_provider
            key_source = "svid"
        evidence_log = EvidenceLog.recover(
            directory,
            instance_id=instance_id,
            rotate_bytes=rotate_bytes,
            checkpoint_every=checkpoint_every,
            checkpoint_seconds=checkpoint_seconds,
            key_provider=provider,
            mirror_path=checkpoint_mirror or None,
            max_pending=max_pending,
            lock=lock,
            owns_lock=owns_lock,
            redactor=Redactor(redact_keys),
            startup_info={
                "version": package_version(),
                "settings": {
                    "rotate_bytes": rotate_bytes,
                    "checkpoint_every": checkpoint_every,
                    "checkpoint_seconds": checkpoint_seconds,
                    "arguments": arguments,
                    "signing_key": key_source,
                },
            },
        )
    except BaseException:
        if exporter is not None:
            exporter.shutdown()
        raise
    return PreparedRecorder(
        evidence_log, exporter, service_name=service_name, max_backoff_seconds=max_backoff_seconds,
        arguments=arguments, known_tool=known_tool,
    )


class PreparedRecorder:
    """A recorder whose log was read back but not written to (prepare_recorder): `start()` once the
    start is committed, or `close()` (which writes nothing) when it is refused first."""

    def __init__(
        self, evidence_log: EvidenceLog, exporter: SpanExporter | None, *, service_name: str,
        max_backoff_seconds: float, arguments: str, known_tool: Callable[[str], bool] | None,
    ):
        self._log: EvidenceLog | None = evidence_log
        self._exporter = exporter
        self._service_name = service_name
        self._max_backoff_seconds = max_backoff_seconds
        self._arguments = arguments
        self._known_tool = known_tool

    def start(self) -> EvidenceRecorder:
        """Write the startup record (cutting a torn tail first: log.EvidenceLog.start) and start the
        shipper: the recorder, which owns the log and the exporter from here. Raises EvidenceError."""
        evidence_log, exporter, self._log, self._exporter = self._log, self._exporter, None, None
        if evidence_log is None:
            raise EvidenceError("the prepared recorder was closed or started already")
        try:
            evidence_log.start()
        except BaseException:
            if exporter is not None:
                exporter.shutdown()
            raise
        shipper = None
        try:
            if exporter is not None:
                shipper = Shipper(
                    evidence_log.directory,
                    exporter,
                    durable=lambda: evidence_log.position,
                    resources=ResourceCache(self._service_name),
                    backoff_max=self._max_backoff_seconds,
                )
                evidence_log.add_listener(shipper.wake)
                shipper.start()
        except BaseException:
            evidence_log.close()
            if exporter is not None:
                exporter.shutdown()
            raise
        return EvidenceRecorder(evidence_log, shipper, arguments_mode=self._arguments, known_tool=self._known_tool)

    def close(self) -> None:
        """Unless started: close the unstarted log (nothing is written) and shut the exporter down. Idempotent."""
        evidence_log, exporter, self._log, self._exporter = self._log, self._exporter, None, None
        if evidence_log is not None:
            evidence_log.close(checkpoint=False)
        if exporter is not None:
            exporter.shutdown()
