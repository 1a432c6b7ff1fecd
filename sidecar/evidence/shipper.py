"""Lossless span export: ship spans from the durable log, remember only what was acknowledged.

The shipper is a thread that reads records the writer has made durable,
turns them into spans (sidecar.evidence.spans) and hands them to a
SpanExporter directly (no BatchSpanProcessor: that drops spans). Only when
the collector acknowledges a batch does it move its checkpoint
(`ship-state.json`: file, offset, seq; written atomically). An export that
fails is retried with exponential backoff, forever. Decisions never wait for
it: it only reads files.

After a crash or restart it starts again from the saved checkpoint, so a
batch that was exported but not yet noted is exported a second time, with
identical ids: duplicates are possible, losses are not.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.evidence.log import Position, fsync_dir, list_log_files
from sidecar.evidence.records import SHIP_STATE_NAME, file_name
from sidecar.evidence.spans import ResourceCache, spans_for_record

log = logging.getLogger(__name__)
# The shipper reports an outage once, and its end; the SDK's OTLP exporters
# would log every retry of every attempt for as long as the collector is away.
_SDK_EXPORTER_LOGGER = "opentelemetry.exporter.otlp"
# How long `shutdown` waits for the thread to leave an export in progress.
_JOIN_SECONDS = 3.0


class Shipper:
    def __init__(
        self,
        directory: str | Path,
        exporter: SpanExporter,
        *,
        durable: Callable[[], Position],
        resources: ResourceCache | None = None,
        batch_size: int = 256,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        poll_seconds: float = 1.0,
    ):
        self.directory = Path(directory)
        self.exporter = exporter
        logging.getLogger(_SDK_EXPORTER_LOGGER).setLevel(logging.CRITICAL)
        self._durable = durable
        self._resources = resources or ResourceCache()
        self.batch_size = batch_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.poll_seconds = poll_seconds
        self.state_path = self.directory / SHIP_STATE_NAME
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.file_index, self.offset, self.seq = self._load_state()
        self.exported_spans = 0
        self.failures = 0
        self.last_error = ""

    def _load_state(self) -> tuple[int, int, int]:
        try:
            state = json.loads(self.state_path.read_text())
            index, offset, seq = int(state["file_index"]), int(state["offset"]), int(state["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            files = list_log_files(self.directory)
            return (files[0][0] if files else 1), 0, 0
        path = self.directory / file_name(index)
        if not path.exists() or path.stat().st_size < offset:
            log.warning("evidence shipper: saved position %s:%d is gone; shipping from the start", path.name, offset)
            files = list_log_files(self.directory)
            return (files[0][0] if files else 1), 0, 0
        return index, offset, seq

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        data = json.dumps(
            {"file_index": self.file_index, "file": file_name(self.file_index), "offset": self.offset, "seq": self.seq}
        ).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        fsync_dir(self.directory)

    # -- control -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="evidence-shipper", daemon=True)
        self._thread.start()

    def wake(self, _position: Position | None = None) -> None:
        self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait up to `timeout_millis` for the durable records to be acknowledged; True when none is left.

        OTel's SpanProcessor verb. Waits only while the collector is known to be answering (a span
        went out, no error since): an outage must not hold a shutdown for the whole timeout.
        """
        deadline = time.monotonic() + timeout_millis / 1000
        while (
            self._thread is not None
            and self._thread.is_alive()
            and self.exported_spans > 0
            and not self.last_error
            and self.lag() > 0
            and time.monotonic() < deadline
        ):
            self._wake.set()
            time.sleep(0.01)
        return self.lag() == 0

    def shutdown(self) -> None:
        """Stop shipping; what is not acknowledged yet is shipped by the next start (from ship-state.json).

        OTel's SpanProcessor verb: it does not drain, call `force_flush` first for that.
        """
        self._stop.set()
        self._wake.set()
        try:
            self.exporter.shutdown()  # interrupts the exporter's own retry sleeps
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)

    def lag(self) -> int:
        """Records durable in the log but not yet acknowledged by the collector."""
        return max(0, self._durable().seq - self.seq)

    def status(self) -> dict:
        return {
            "shipped_seq": self.seq,
            "lag": self.lag(),
            "exported_spans": self.exported_spans,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    # -- the loop -------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.backoff_initial
        while not self._stop.is_set():
            try:
                progressed = self.ship_once()
            except Exception as exc:  # never die: log and retry
                log.exception("evidence shipper: unexpected error")
                self.last_error = str(exc)
                progressed = None
            if progressed is None:  # failure
                self.failures += 1
                delay = backoff * (0.5 + random.random() / 2)
                backoff = min(self.backoff_max, backoff * 2)
                self._stop.wait(delay)
                continue
            backoff = self.backoff_initial
            if not progressed:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def ship_once(self) -> bool | None:
        """Export the next batch. True: shipped some; False: nothing to ship; None: export failed."""
        durable = self._durable()
        records, end_index, end_offset = self._read_batch(durable)
        if not records:
            if (end_index, end_offset) != (self.file_index, self.offset):
                self.file_index, self.offset = end_index, end_offset
                self._save_state()
            return False
        spans = []
        for record in records:
            spans.extend(spans_for_record(record, self._resources))
        if spans:
            result = self.exporter.export(spans)
            if result is not SpanExportResult.SUCCESS:
                if not self.last_error:
                    log.warning("evidence shipper: export failed; retrying with backoff (spans stay in the log)")
                self.last_error = "export failed"
                return None
        if self.last_error:
            log.info("evidence shipper: export works again")
        self.last_error = ""
        self.exported_spans += len(spans)
        self.file_index, self.offset = end_index, end_offset
        self.seq = max(self.seq, max(int(r.get("seq") or 0) for r in records))
        self._save_state()
        return True

    def _read_batch(self, durable: Position) -> tuple[list[dict], int, int]:
        index, offset = self.file_index, self.offset
        records: list[dict] = []
        while len(records) < self.batch_size:
            if index > durable.file_index:
                break
            limit = durable.offset if index == durable.file_index else None
            path = self.directory / file_name(index)
            if limit is not None and offset >= limit:
                break
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    while len(records) < self.batch_size:
                        if limit is not None and f.tell() >= limit:
                            break
                        line = f.readline()
                        if not line.endswith(b"\n"):
                            break
                        offset += len(line)
                        try:
                            records.append(json.loads(line))
                        except ValueError:
                            log.error("evidence shipper: unreadable line in %s at %d skipped", path.name, offset)
                    at_end = limit is None and not f.readline()
            except FileNotFoundError:
                at_end = True
            if limit is None and at_end and len(records) < self.batch_size:
                index, offset = index + 1, 0
                continue
            break
        return records, index, offset
