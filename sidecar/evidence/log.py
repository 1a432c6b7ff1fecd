"""The durable, hash-chained, append-only evidence log.

Files `evidence-000001.jsonl`, `evidence-000002.jsonl`, ... in one directory
hold one chain: `seq` and `prev_hash` continue across files, and a file is
closed for a new one when it passes `rotate_bytes`.

Durability and group commit: callers hand records to one writer thread and
wait on a future. The writer takes everything that is waiting, gives it
seq/prev_hash/hash, writes it with one write() and makes it durable with one
fdatasync(), and only then completes the futures. Records that arrive while
a sync is in progress wait for the next one and share it, so one sync
serves many callers under load; the asyncio futures of one event loop are
completed by one callback per batch (one wake-up of the loop, not one per
record).

A write or sync that fails (disk full, I/O error) fails every future in the
batch with EvidenceError, marks the log degraded, and rolls the file back to
the last synced offset before anything else is written; the next batch
tries again.

Restart: the head (seq, hash) is read back from the end of the last file. A
last line without its newline is the torn write of a batch that was never
acknowledged (its sync never returned); it is cut off, kept aside as
`torn-<file>-<offset>.bin`, and described in the startup record. A damaged
*complete* last line is not guessed at: opening fails and `evidence verify`
says what is wrong. Reading back (`recover`) writes nothing; the cut and the
startup record come with `start`, so a sidecar whose start is refused after
reading the log back (its policy, say) leaves the log as it found it.

Checkpoints: every `checkpoint_every` records or `checkpoint_seconds`
seconds (and at a clean close), a signed `checkpoint` record over
`{log_id, seq, head_hash, time}` is added to the chain and mirrored to
`<dir>-checkpoints.jsonl` beside the directory, never in it (or
`evidence.checkpoint_mirror`, on another volume), so cutting records off the
end of the log is detectable up to the last checkpoint.

Redaction: every record is redacted by the one rule set (redaction.py) in
`submit`, before it is queued; a value with no canonical form is replaced by
a placeholder (records.recordable) rather than sealed.

Units: `append` takes one record and, in `followed_by`, the records that
must stand or fall with it (a decision and the escalation it
raised). A unit is written whole, its records consecutive in the chain and
durable in the same sync, or not at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from sidecar.canonical import NotCanonicalizable, parse_json, sha256_digest
from sidecar.evidence import EvidenceError, Receipt
from sidecar.evidence.records import (
    FILE_PATTERN,
    GENESIS,
    KINDS,
    default_mirror_path,
    file_name,
    record_hash,
    recordable,
    rfc3339,
    seal,
)
from sidecar.evidence.lock import WriterLock, opening
from sidecar.evidence.redaction import Redactor
from sidecar.evidence.signing import KeyProvider, SigningError, SigningKey, sign_payload

log = logging.getLogger(__name__)

TAIL_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Position:
    """How far the log is durable: file index, byte offset in it, and seq of the last record."""

    file_index: int
    offset: int
    seq: int


Waiter = "concurrent.futures.Future[Receipt] | asyncio.Future[Receipt]"


@dataclass
class _Pending:
    """One unit: its (kind, fields) records, redacted, and the waiter for the first one's Receipt."""

    records: list[tuple[str, dict]]
    future: Waiter


def _sealed(kind: str, fields: dict, seq: int, prev_hash: str, now: str) -> tuple[bytes, str]:
    """The sealed line of one record at `seq` after `prev_hash`, and its hash.

    A value with no canonical JSON form is never written: a placeholder says what it was
    (records.recordable). Raises NotCanonicalizable when even that has none."""
    record = dict(fields)
    record.update(kind=kind, seq=seq, prev_hash=prev_hash, logged_at=now)
    try:
        line = seal(record)
    except NotCanonicalizable:
        record = recordable(dict(fields))
        record.update(kind=kind, seq=seq, prev_hash=prev_hash, logged_at=now)
        line = seal(record)
    return line, record["hash"]


def _complete(future: Waiter, outcome: Receipt | BaseException) -> None:
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
        pass  # its caller gave up waiting (cancelled, a time budget): the record still stands


def _complete_all(outcomes: list[tuple[Waiter, Receipt | BaseException]]) -> None:
    for future, outcome in outcomes:
        _complete(future, outcome)


def _settle(outcomes: list[tuple[Waiter, Receipt | BaseException]]) -> None:
    """Complete waiters from the writer thread: thread futures at once, each event loop's in one callback."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Waiter, Receipt | BaseException]]] = {}
    for future, outcome in outcomes:
        if isinstance(future, asyncio.Future):
            by_loop.setdefault(future.get_loop(), []).append((future, outcome))
        else:
            _complete(future, outcome)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_complete_all, items)
        except RuntimeError:  # that loop is closed: nobody is left waiting
            pass


def list_log_files(directory: str | Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    found = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = FILE_PATTERN.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _last_line(path: Path, size: int) -> tuple[bytes | None, int]:
    """(last complete line without newline or None, offset just after it)."""
    with open(path, "rb") as f:
        end = size
        # offset after the last newline
        pos = end
        tail = b""
        newline_at = -1
        while pos > 0:
            start = max(0, pos - TAIL_CHUNK)
            f.seek(start)
            chunk = f.read(pos - start)
            tail = chunk + tail
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                newline_at = start + idx
                break
            pos = start
        if newline_at < 0:
            return None, 0
        good_end = newline_at + 1
        # find the newline before it
        pos = newline_at
        line = b""
        while pos > 0:
            start = max(0, pos - TAIL_CHUNK)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                line = chunk[idx + 1 :] + line
                break
            line = chunk + line
            pos = start
        return line, good_end


class LogFileIO(Protocol):
    """The two system calls the writer makes on the current log file (`EvidenceLog(file_io=...)`).

    A public injection point for disk faults the kernel cannot be made to produce on
    demand, such as a data sync that fails with EIO or hangs; the default is `os.write`
    and `fdatasync` (`fsync` where that is missing). A full disk is produced for real,
    on a small tmpfs (tests/infra/volume.py).
    """

    def write(self, fd: int, data: memoryview) -> int:
        """Write some of `data` at the end of `fd`; the number of bytes written (may be short). Raises OSError."""
        ...

    def datasync(self, fd: int) -> None:
        """Return once what was written to `fd` is durable. Raises OSError."""
        ...


class EvidenceLog:
    """Append-only chained log with group commit. Thread-safe; use from any thread or event loop."""

    def __init__(
        self,
        directory: str | Path,
        *,
        instance_id: str,
        rotate_bytes: int = 64 * 1024 * 1024,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        key_provider: KeyProvider | None = None,
        mirror_path: str | Path | None = None,
        max_pending: int = 10_000,
        startup_info: dict | None = None,
        redactor: Redactor | None = None,
        file_io: LogFileIO | None = None,
    ):
        self.directory = Path(directory)
        self.instance_id = instance_id
        self.rotate_bytes = rotate_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self._key_provider = key_provider
        self.mirror_path = Path(mirror_path) if mirror_path else default_mirror_path(self.directory)
        self._redactor = redactor or Redactor()
        self._max_pending = max_pending
        self._startup_info = dict(startup_info or {})

        self._cond = threading.Condition()
        self._pending: deque[_Pending] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[Position], None]] = []

        # chain state, touched only by the writer thread once started
        self.log_id = ""
        self._seq = 0
        self._head = GENESIS
        self._file_index = 1
        self._offset = 0
        self._fd: int | None = None
        self._since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()
        self._recovered: dict | None = None
        self._warnings: list[str] = []

        self._error: str | None = None  # last write failure, cleared by a good commit
        self._position = Position(1, 0, 0)
        self.syncs = 0  # number of data syncs (for tests and metrics)
        self.records_written = 0
        self._closed = False
        self._torn: tuple[Path, int, int] | None = None  # (file, end of its last complete line, size): `start` cuts
        self._own_lock: WriterLock | None = None  # released by `close` (recover's owns_lock)

        # the os calls the writer makes on the log file (LogFileIO)
        self._write = file_io.write if file_io is not None else os.write
        self._datasync = file_io.datasync if file_io is not None else _sync

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, directory: str | Path, *, lock: WriterLock | None = None, **kwargs: Any) -> "EvidenceLog":
        """`recover`, then `start`: read the chain back and write the startup record, in one step.

        `lock`: the directory's writer lock, already held, which stays the caller's to release;
        None = take it now (refused when another writer holds it), owned by the log: released
        when the log closes, or at once when opening fails (LOCK then as it was found).
        """
        with opening(directory, lock) as (held, owned):
            self = cls.recover(directory, lock=held, owns_lock=owned, **kwargs)
            self.start()
        return self

    @classmethod
    def recover(cls, directory: str | Path, *, lock: WriterLock, owns_lock: bool = False, **kwargs: Any) -> "EvidenceLog":
        """Read the chain head back from the directory, writing nothing: `start` writes.

        So whatever makes a log unusable (a damaged last record, a file that is not one, a torn
        line that is not at the end, a newest file that cannot be written) refuses the start
        (EvidenceError) before the sidecar starts anything else. A torn last line is found here
        and cut by `start`. `lock`: the directory's writer lock, held by the caller, who releases
        it after `close` (the sidecar: nothing may be written there once another one holds it);
        `owns_lock`: `close` releases it (`open`). An unstarted log's `close()` writes nothing.
        """
        if not lock.held:
            raise ValueError("EvidenceLog.recover: the directory's writer lock must be held")
        self = cls(directory, **kwargs)
        self._own_lock = lock if owns_lock else None
        try:
            self._recover()
        except OSError as exc:
            self.close(checkpoint=False)
            raise EvidenceError(f"cannot open evidence log in {self.directory}: {exc.strerror or exc}") from None
        except BaseException:
            self.close(checkpoint=False)
            raise
        return self

    def start(self) -> None:
        """Cut the torn tail `recover` found (kept aside), start the writer and write the startup record.

        The first write of this log: a start refused before it leaves the directory's log as it was.
        """
        try:
            if self._torn is not None:
                self._cut_torn_tail(*self._torn)
            if self._fd is None:
                self._open_file(create=True)
        except OSError as exc:
            self.close(checkpoint=False)
            raise EvidenceError(f"cannot open evidence log in {self.directory}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._run, name="evidence-writer", daemon=True)
        self._thread.start()
        startup = {
            "log_id": self.log_id,
            "time": rfc3339(),
            "sidecar": self.instance_id,
            "pid": os.getpid(),
            "recovered": self._recovered,
            "warnings": self._warnings,
            **self._startup_info,
        }
        try:
            self.append_sync("startup", startup, timeout=30)
        except BaseException:
            self.close(checkpoint=False)
            raise

    def _recover(self) -> None:
        files = list_log_files(self.directory)
        if not files:
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise OSError(errno.EACCES, "the directory is not writable")
            self.log_id = str(uuid.uuid4())
            self._file_index = 1
            self._offset = 0
            self._position = Position(1, 0, 0)
            return
        for _, path in files:
            if not path.is_file():
                raise EvidenceError(f"{path}: not a regular file")
        # log_id from the first record of the first file
        _, first_path = files[0]
        with open(first_path, "rb") as f:
            first_line = f.readline(1 << 20)
        try:
            first = parse_json(first_line)
            self.log_id = first["log_id"]
        except (ValueError, KeyError, TypeError):
            if first_line.endswith(b"\n") or len(files) > 1:
                raise EvidenceError(
                    f"{first_path}: the first record is not a startup record with a log_id; "
                    "run `agent-sidecar evidence verify` on this directory"
                ) from None
            self.log_id = ""  # only a torn first line in the only file: handled below

        # head: last complete line, looking back through files (the newest may be empty)
        head_found = False
        for index, path in reversed(files):
            size = path.stat().st_size
            line, good_end = _last_line(path, size)
            if good_end < size and index == files[-1][0]:
                if not os.access(self.directory, os.W_OK | os.X_OK):
                    raise OSError(errno.EACCES, f"{path.name} ends in a torn line to cut, and the directory is not writable")
                self._torn = (path, good_end, size)  # cut by `start`
            elif good_end < size:
                raise EvidenceError(
                    f"{path}: ends in an unterminated line but is not the newest file; "
                    "run `agent-sidecar evidence verify` on this directory"
                )
            if line is None:
                if index != files[-1][0]:
                    raise EvidenceError(f"{path}: holds no complete record; run `agent-sidecar evidence verify`")
                continue
            try:
                record = parse_json(line)
                seq = record["seq"]
                claimed = record["hash"]
                ok = isinstance(seq, int) and claimed == record_hash(record)
            except (ValueError, KeyError, TypeError, NotCanonicalizable):
                ok = False
            if not ok:
                raise EvidenceError(
                    f"{path}: the last record is damaged (not a sealed evidence record); the sidecar will not "
                    "continue a chain it cannot read. Run `agent-sidecar evidence verify` on this directory"
                )
            self._seq, self._head = seq, claimed
            head_found = True
            break
        if not self.log_id:
            if head_found:
                raise EvidenceError(f"{first_path}: the log has no startup record with a log_id")
            self.log_id = str(uuid.uuid4())
        self._file_index = files[-1][0]
        self._open_file(create=False)  # so a newest file that cannot be written refuses the start here
        self._offset = self._torn[1] if self._torn is not None else os.fstat(self._fd).st_size
        self._position = Position(self._file_index, self._offset, self._seq)
        self._check_mirror()

    def _cut_torn_tail(self, path: Path, good_end: int, size: int) -> None:
        with open(path, "rb") as f:
            f.seek(good_end)
            torn = f.read()
        aside = self.directory / f"torn-{path.stem}-{good_end}.bin"
        aside.write_bytes(torn)
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.directory)
        self._recovered = {
            "file": path.name,
            "offset": good_end,
            "bytes": size - good_end,
            "sha256": sha256_digest(torn),
            "kept_as": aside.name,
            "why": "unterminated last line: a write whose sync never completed, so no caller was answered",
        }
        log.warning(
            "evidence: cut %d bytes of an unterminated last line off %s (kept as %s)",
            size - good_end,
            path.name,
            aside.name,
        )

    def _check_mirror(self) -> None:
        try:
            line, _ = _last_line(self.mirror_path, self.mirror_path.stat().st_size)
        except OSError:
            return
        if line is None:
            return
        try:
            mirrored = parse_json(line)
            seq = mirrored["seq"]
        except (ValueError, KeyError, TypeError):
            self._warnings.append(f"checkpoint mirror {self.mirror_path.name}: last line does not parse")
            return
        if isinstance(seq, int) and seq > self._seq:
            message = (
                f"checkpoint mirror has a checkpoint at seq {seq} but the log ends at seq {self._seq}: "
                "records were removed from the end of the log"
            )
            self._warnings.append(message)
            log.error("evidence: %s", message)

    def _open_file(self, *, create: bool) -> None:
        path = self.directory / file_name(self._file_index)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o640)
        if create:
            fsync_dir(self.directory)

    # -- appending ---------------------------------------------------------

    def submit(self, kind: str, fields: dict, *, secret_keys: tuple[str, ...] = ()) -> concurrent.futures.Future:
        """Queue a record from any thread; the future gives its Receipt once it is durable, or raises EvidenceError.

        Every field is redacted first (redaction.py; `secret_keys` adds keys for this record only,
        e.g. a decision's `redact_arguments` obligation), so no secret reaches the disk or a span.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue([(kind, fields)], secret_keys, future)
        return future

    async def append(
        self,
        kind: str,
        fields: dict,
        *,
        secret_keys: tuple[str, ...] = (),
        followed_by: Sequence[tuple[str, dict]] = (),
    ) -> Receipt:
        """`submit`, awaited on the running event loop; `followed_by` (kind, fields) records are written
        right after this one, in the same sync, or refused with it: one unit (a decision and the
        escalation it raised), redacted with the same `secret_keys`."""
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._queue([(kind, fields), *followed_by], secret_keys, future)
        return await future

    def _queue(self, unit: list[tuple[str, dict]], secret_keys: tuple[str, ...], future: Waiter) -> None:
        for kind, fields in unit:
            if kind not in KINDS or kind in ("checkpoint",):
                future.set_exception(EvidenceError(f"unknown or reserved record kind {kind!r}"))
                return
            clash = [k for k in fields if k in ("kind", "seq", "prev_hash", "logged_at", "hash")]
            if clash:
                future.set_exception(EvidenceError(f"record fields may not set {', '.join(clash)}"))
                return
        redactor = self._redactor.with_keys(secret_keys)
        try:
            unit = [(kind, redactor.record(fields)) for kind, fields in unit]
        except Exception as exc:  # a record we cannot redact is a record we do not write
            log.exception("evidence: redaction failed")
            future.set_exception(EvidenceError(f"the record could not be redacted: {exc}"))
            return
        with self._cond:
            if self._stopping or self._closed:
                future.set_exception(EvidenceError("the evidence log is closed"))
                return
            if self._thread is not None and not self._thread.is_alive():
                future.set_exception(EvidenceError("the evidence writer has stopped"))
                return
            if len(self._pending) >= self._max_pending:
                future.set_exception(
                    EvidenceError(f"{len(self._pending)} records are waiting for the disk; the evidence log is overloaded")
                )
                return
            self._pending.append(_Pending(unit, future))
            self._cond.notify()

    def append_sync(self, kind: str, fields: dict, timeout: float | None = None) -> Receipt:
        try:
            return self.submit(kind, fields).result(timeout)
        except concurrent.futures.TimeoutError:
            raise EvidenceError(f"the record was not durable within {timeout} s") from None

    def add_listener(self, callback: Callable[[Position], None]) -> None:
        """Called (on the writer thread) with the new durable position after each commit."""
        self._listeners.append(callback)

    @property
    def position(self) -> Position:
        """The durable end of the log: every record whose append has returned is at or before it."""
        return self._position

    def health(self) -> tuple[bool, str]:
        if self._closed:
            return False, "evidence log closed"
        if self._error:
            return False, f"evidence log cannot write: {self._error}"
        return True, f"evidence log writable ({self.directory / file_name(self._position.file_index)})"

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping and not self._checkpoint_due_by_time():
                    self._cond.wait(timeout=self._wait_timeout())
                batch = list(self._pending)
                self._pending.clear()
                stopping = self._stopping
            if batch or self._checkpoint_due_by_time():
                self._safe_commit(batch)
            if stopping:
                with self._cond:
                    rest = list(self._pending)
                    self._pending.clear()
                if rest:
                    self._safe_commit(rest)
                return

    def _safe_commit(self, batch: list[_Pending]) -> None:
        """_commit, but a bug inside it fails the batch instead of killing the writer (and hanging callers)."""
        try:
            self._commit(batch)
        except Exception as exc:
            log.exception("evidence: internal error in the writer")
            self._fail(batch, OSError(errno.EIO, f"internal error in the evidence writer: {exc}"))

    def _wait_timeout(self) -> float | None:
        if self._since_checkpoint == 0 or self.checkpoint_seconds <= 0:
            return None
        return max(0.01, self.checkpoint_seconds - (time.monotonic() - self._last_checkpoint_time))

    def _checkpoint_due_by_time(self) -> bool:
        return (
            self._since_checkpoint > 0
            and self.checkpoint_seconds > 0
            and time.monotonic() - self._last_checkpoint_time >= self.checkpoint_seconds
        )

    def _commit(self, batch: list[_Pending], *, force_checkpoint: bool = False) -> None:
        if self._fd is None:
            try:
                self._repair()
            except OSError as exc:
                self._fail(batch, exc)
                return
        seq, head = self._seq, self._head
        now = rfc3339()
        buf = bytearray()
        receipts: list[Receipt] = []
        refused: list[tuple[Waiter, Receipt | BaseException]] = []
        written = 0
        for item in batch:
            lines: list[bytes] = []
            unit_head = head
            try:
                for kind, fields in item.records:
                    line, unit_head = _sealed(kind, fields, seq + len(lines) + 1, unit_head, now)
                    lines.append(line)
                    if len(lines) == 1:
                        receipt = Receipt(seq + 1, unit_head)
            except NotCanonicalizable as exc:  # the whole unit is refused: its records stand or fall together
                refused.append((item.future, EvidenceError(f"record has no canonical form: {exc}")))
                receipts.append(None)  # type: ignore[arg-type]
                continue
            seq, head = seq + len(lines), unit_head
            written += len(lines)
            buf += b"".join(lines)
            receipts.append(receipt)
        checkpoint_line = b""
        since = self._since_checkpoint + written
        if since > 0 and (
            force_checkpoint
            or (self.checkpoint_every > 0 and since >= self.checkpoint_every)
            or self._checkpoint_due_by_time()
        ):
            checkpoint_line = self._checkpoint_line(seq, head, now)
            if checkpoint_line:
                buf += checkpoint_line
                seq += 1
                head = json.loads(checkpoint_line)["hash"]
        if not buf:
            _settle(refused)
            return
        try:
            view = memoryview(bytes(buf))
            while view:
                n = self._write(self._fd, view)
                view = view[n:]
            self._datasync(self._fd)
        except OSError as exc:
            _settle(refused)
            self._fail([i for i, r in zip(batch, receipts) if r is not None], exc)
            return
        self.syncs += 1
        self.records_written += written + (1 if checkpoint_line else 0)
        self._seq, self._head = seq, head
        self._offset += len(buf)
        self._error = None
        if checkpoint_line:
            self._since_checkpoint = 0
            self._last_checkpoint_time = time.monotonic()
            self._mirror(checkpoint_line)
        else:
            self._since_checkpoint = since
        # The position first: a caller whose record is durable finds `position` past it once told.
        self._position = Position(self._file_index, self._offset, self._seq)
        _settle(refused + [(item.future, receipt) for item, receipt in zip(batch, receipts) if receipt is not None])
        if self._offset >= self.rotate_bytes:
            self._rotate()
            self._position = Position(self._file_index, self._offset, self._seq)
        for listener in list(self._listeners):
            try:
                listener(self._position)
            except Exception:  # a listener must never break the writer
                log.exception("evidence: position listener failed")

    def _checkpoint_line(self, seq: int, head: str, now: str) -> bytes:
        signing_key: SigningKey | None = None
        try:
            signing_key = self._key_provider() if self._key_provider else None
        except Exception as exc:
            log.error("evidence: no checkpoint key available (%s); checkpoint postponed", exc)
        if signing_key is None:
            if self._key_provider is not None:
                log.warning("evidence: the checkpoint key is not available yet; checkpoint postponed")
            return b""
        payload = {"log_id": self.log_id, "seq": seq, "head_hash": head, "time": now}
        try:
            signature, signer = sign_payload(signing_key, payload)
        except (SigningError, ValueError, TypeError) as exc:
            log.error("evidence: signing the checkpoint failed (%s); checkpoint postponed", exc)
            return b""
        record = {
            "checkpoint": payload,
            "signature": signature,
            "signer": signer,
            "sidecar": self.instance_id,
            "kind": "checkpoint",
            "seq": seq + 1,
            "prev_hash": head,
            "logged_at": now,
        }
        return seal(record)

    def _mirror(self, line: bytes) -> None:
        try:
            fd = os.open(self.mirror_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("evidence: could not mirror the checkpoint to %s: %s", self.mirror_path, exc)

    def _rotate(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None
        self._file_index += 1
        self._offset = 0
        try:
            self._open_file(create=True)
        except OSError as exc:
            self._fd = None
            self._error = f"cannot start {file_name(self._file_index)}: {exc.strerror or exc}"
            log.error("evidence: %s", self._error)

    def _repair(self) -> None:
        """Reopen the current file and cut it back to the last synced offset."""
        path = self.directory / file_name(self._file_index)
        self._open_file(create=not path.exists())
        size = os.fstat(self._fd).st_size
        if size > self._offset:
            os.ftruncate(self._fd, self._offset)
            os.fsync(self._fd)
            log.warning("evidence: cut %d unsynced bytes off %s after a write failure", size - self._offset, path.name)
        elif size < self._offset:
            raise OSError(errno.EIO, f"{path.name} is shorter than what was synced ({size} < {self._offset})")

    def _fail(self, batch: list[_Pending], exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason = "no space left on the evidence volume"
        self._error = reason
        log.error("evidence: write failed, %d record(s) refused: %s", len(batch), reason)
        _settle([(item.future, EvidenceError(reason)) for item in batch])
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        try:
            self._repair()  # roll back now, so the torn bytes never precede a good record
        except OSError as repair_exc:
            self._fd = None
            log.error("evidence: cannot roll the log back yet (%s); will retry on the next record", repair_exc)

    # -- closing -----------------------------------------------------------

    def close(self, *, checkpoint: bool = True, timeout: float = 10.0) -> None:
        """Write a final checkpoint (when records follow the last one), stop the writer, close the file.

        Sync, for callers without an event loop (`open` failing, open_recorder in its thread, tools
        and tests that write a log directly); `aclose` is the same from a loop.
        """
        if self._closed:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if checkpoint and self._since_checkpoint > 0 and (self._thread is None or not self._thread.is_alive()):
            self._commit([], force_checkpoint=True)
        self._closed = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._own_lock is not None:
            self._own_lock.release()

    async def aclose(self) -> None:
        """`close()` with its defaults, in a thread: joining the writer and the final fsync block."""
        await asyncio.to_thread(self.close)
