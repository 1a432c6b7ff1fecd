"""`agent-sidecar evidence verify DIR`: prove the log is whole and unaltered, or say where it is not.

What the verdict rests on is the operator's trust anchors, never what the log carries:

- with anchors (`--key` public keys or certificates, and/or a `--bundle` of CA
  certificates, optionally `--signer` SPIFFE IDs), every checkpoint must be
  signed by a trusted signer (one the anchors name), and every record must be covered by such a
  checkpoint (the record's seq at most the checkpoint's). The verdict is
  INTACT only then; records after the last signed checkpoint are NOT YET
  COVERED (whoever can write the log could have written them), never intact.
  The report names who signed: key id, and the SPIFFE ID when a certificate
  the operator trusts says it.
- without anchors, the checks below run against the keys the log itself
  carries, and the verdict says so: CONSISTENT, internal consistency only.
  Anyone who can rewrite the log can rewrite it consistently.

Checks, in order of the log:
- files evidence-NNNNNN.jsonl are numbered without gaps;
- every line is a complete, canonical JSON record whose `hash` is the sha256
  of the record without `hash` (read with sidecar.canonical, the writer's own form);
- `seq` counts 1, 2, 3, ... and each `prev_hash` is the previous record's hash
  (seq 1: GENESIS), across files;
- every checkpoint covers exactly the record before it, names this log's
  log_id and carries a valid signature;
- with `--log-id`, this log's log_id (its first startup record's, which every
  later startup and checkpoint must repeat) is the one the auditor expects: a
  log replaced whole by another one, signed with the same key, verifies
  otherwise, since checkpoints sign only `{log_id, seq, head_hash, time}`;
and then, against copies kept outside the chain:
- every checkpoint in the mirror (default `<DIR>-checkpoints.jsonl`) is in the log, unchanged;
- the span shipper never acknowledged a seq the log no longer has.

Truncation after the last checkpoint that reached the mirror (or the
collector) is the one change this cannot see.
"""

from __future__ import annotations

import base64
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.canonical import NotCanonicalizable, canonical_json, parse_json
from sidecar.evidence.log import list_log_files
from sidecar.evidence.records import (
    GENESIS,
    KINDS,
    SHIP_STATE_NAME,
    default_mirror_path,
    parse_rfc3339,
    record_hash,
)
from sidecar.evidence.signing import (
    NamedKey,
    chain_trusted,
    key_id,
    public_der,
    spiffe_id_of,
    spiffe_id_matches,
    verify_signature,
)

INTACT = "intact"
NOT_YET_COVERED = "not_yet_covered"
CONSISTENT = "consistent"
BROKEN = "broken"


@dataclass
class Problem:
    seq: int | None
    where: str  # file:line
    message: str


@dataclass
class Signer:
    """Who signed checkpoints, as the operator's anchors establish it."""

    key_id: str
    spiffe_id: str = ""  # from a --key certificate or an SVID chaining to --bundle; "" when unknown
    source: str = ""  # what the log says (svid | file | dev): a claim, not proof
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


@dataclass
class VerifyReport:
    directory: str
    files: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str = ""
    log_id: str = ""
    expected_log_id: str = ""  # --log-id: the log the auditor expects ("" = any)
    kinds: Counter = field(default_factory=Counter)
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    anchored: bool = False  # the operator named trust anchors
    anchors: str = ""
    covered_seq: int = 0  # every record up to this seq is covered by a checkpoint a trusted signer signed
    signers: dict[str, Signer] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated_problems: int = 0
    startup_sidecar: Any = None  # `sidecar` of the latest startup record: every checkpoint after it names it

    @property
    def ok(self) -> bool:
        """Nothing broken: the log is internally consistent (and, with anchors, signed as named)."""
        return not self.problems and self.records > 0

    @property
    def verdict(self) -> str:
        """intact (anchored, all covered) | not_yet_covered | consistent (no anchors) | broken."""
        if not self.ok:
            return BROKEN
        if not self.anchored:
            return CONSISTENT
        return INTACT if self.uncovered == 0 else NOT_YET_COVERED

    @property
    def uncovered(self) -> int:
        """Records after the last checkpoint a trusted signer signed."""
        if self.last_seq is None:
            return 0
        return self.last_seq - self.covered_seq

    @property
    def first_broken(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def _decode_public(b64: str) -> Any:
    return serialization.load_der_public_key(base64.b64decode(b64))


@dataclass
class _Anchors:
    keys: dict[str, NamedKey]
    bundle: list[x509.Certificate]
    signer_ids: tuple[str, ...]

    @property
    def given(self) -> bool:
        return bool(self.keys or self.bundle)


def verify_dir(
    directory: str | Path,
    *,
    public_keys: list[Any] | None = None,
    bundle: list[x509.Certificate] | None = None,
    signer_ids: list[str] | tuple[str, ...] = (),
    mirror: str | Path | None = None,
    log_id: str = "",
    max_problems: int = 50,
) -> VerifyReport:
    """Check the log in `directory` (see the module docstring); never raises on a bad log.

    public_keys: the operator's signer keys (NamedKey, or bare public keys);
    bundle: CA certificates an SVID signer must chain to; signer_ids: SPIFFE IDs
    (`*` matches any run of characters) such an SVID must have, () = any;
    mirror: the checkpoint mirror, default `<directory>-checkpoints.jsonl`;
    log_id: the log_id the log must have ("" = whichever its first startup record names).
    """
    directory = Path(directory)
    report = VerifyReport(str(directory), expected_log_id=log_id)
    named = [k if isinstance(k, NamedKey) else NamedKey(k) for k in public_keys or []]
    anchors = _Anchors({key_id(k.key): k for k in named}, list(bundle or []), tuple(signer_ids))
    report.anchored = anchors.given
    parts = []
    if anchors.keys:
        parts.append(f"--key ({len(anchors.keys)} key{'s' if len(anchors.keys) > 1 else ''})")
    if anchors.bundle:
        who = ", ".join(anchors.signer_ids) if anchors.signer_ids else "any SVID it issued"
        parts.append(f"--bundle ({len(anchors.bundle)} CA certificate{'s' if len(anchors.bundle) > 1 else ''}; signers: {who})")
        if not anchors.signer_ids:
            report.warnings.append(
                "--bundle without --signer accepts a checkpoint signed by any SVID of that trust domain "
                "(another workload's included): name the sidecar's SPIFFE ID with --signer"
            )
    report.anchors = " and ".join(parts) or "none (keys carried in the log itself: internal consistency only)"

    def problem(seq: int | None, where: str, message: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(seq, where, message))
        else:
            report.truncated_problems += 1

    if not directory.is_dir():
        problem(None, str(directory), "not a directory")
        return report
    files = list_log_files(directory)
    report.files = len(files)
    if not files:
        # A log whose files were removed is BROKEN; a reader who named the wrong directory (var/ for
        # var/evidence) is also told where a log is, not left with a verdict about nothing.
        problem(None, str(directory), f"no evidence files (evidence-NNNNNN.jsonl) here{where_logs_are(directory)}")
        return report
    expected_index = files[0][0]
    if expected_index != 1:
        problem(1, files[0][1].name, f"the log starts at file {files[0][1].name}: earlier files are missing")
    checkpoint_hashes: dict[int, str] = {}
    expected_seq, expected_prev = 1, GENESIS
    for index, path in files:
        if index != expected_index:
            problem(expected_seq, path.name, f"files {expected_index}..{index - 1} are missing before {path.name}")
        expected_index = index + 1
        data, unreadable = _read_regular(path)
        if unreadable:
            problem(expected_seq, path.name, f"{path.name} {unreadable}; record {expected_seq} or later is in it")
            continue
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        if tail:
            where = f"{path.name}:{len(lines) + 1}"
            if index == files[-1][0]:
                report.warnings.append(
                    f"{where}: unterminated last line ({len(tail)} bytes): a write cut short by a crash, "
                    "never acknowledged; the sidecar removes it when it next starts"
                )
            else:
                problem(expected_seq, where, "unterminated line in the middle of the log")
        for number, line in enumerate(lines, start=1):
            where = f"{path.name}:{number}"
            try:
                record = parse_json(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                problem(expected_seq, where, f"line is not a JSON record ({exc}); record {expected_seq} or later is damaged")
                continue
            seq = record.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                problem(expected_seq, where, "record has no integer seq")
                continue
            report.records += 1
            if report.first_seq is None:
                report.first_seq = seq
            kind = record.get("kind")
            # counted under its JSON spelling when it is no string ([] or {} cannot be a Counter key)
            report.kinds[kind if isinstance(kind, str) else canonical_json_or_repr(kind)] += 1
            try:
                canonical = canonical_json(record) == line
                computed = record_hash(record)
            except NotCanonicalizable:
                canonical, computed = False, ""
            claimed = record.get("hash")
            if computed != claimed:
                problem(seq, where, f"seq {seq}: hash mismatch: the record was changed after it was written")
            elif not canonical:
                problem(seq, where, f"seq {seq}: not in canonical form: the line was rewritten after it was written")
            if not isinstance(kind, str) or kind not in KINDS:
                problem(seq, where, f"seq {seq}: unknown kind {kind!r}")
            if seq != expected_seq:
                if seq > expected_seq:
                    missing = f"record {expected_seq}" if seq == expected_seq + 1 else f"records {expected_seq}..{seq - 1}"
                    problem(expected_seq, where, f"{missing} missing: seq {seq} follows seq {expected_seq - 1} (deleted?)")
                else:
                    problem(seq, where, f"seq {seq} comes after seq {expected_seq - 1}: records reordered or duplicated")
            elif record.get("prev_hash") != expected_prev:
                problem(
                    seq,
                    where,
                    f"seq {seq}: prev_hash does not match the hash of seq {seq - 1}: "
                    f"record {seq - 1} was changed or replaced, or records were reordered",
                )
            if kind == "startup":
                report.startup_sidecar = record.get("sidecar")
                log_id = record.get("log_id")
                if not report.log_id:
                    report.log_id = log_id or ""
                    if seq != 1 and report.first_seq == seq:
                        problem(seq, where, "the log does not start at seq 1")
                    if report.expected_log_id and log_id != report.expected_log_id:
                        problem(seq, where, f"seq {seq}: this is log {log_id!r}, not {report.expected_log_id!r} "
                                "(--log-id): another log in the place of the one expected")
                elif log_id != report.log_id:
                    problem(seq, where, f"seq {seq}: startup record names log {log_id!r}, not {report.log_id!r}")
            elif report.records == 1:
                problem(seq, where, "the first record is not a startup record")
            if kind == "checkpoint":
                _check_checkpoint(record, seq, where, report, anchors, problem)
                checkpoint_hashes[seq] = claimed if isinstance(claimed, str) else ""
            report.last_seq = seq
            report.last_hash = claimed if isinstance(claimed, str) else ""
            expected_seq, expected_prev = seq + 1, claimed

    mirror_path = Path(mirror) if mirror else default_mirror_path(directory)
    _check_outside_copies(directory, mirror_path, report, checkpoint_hashes, problem)
    if report.anchored and report.ok and not mirror_path.exists() and not (directory / SHIP_STATE_NAME).exists():
        report.warnings.append(
            f"no checkpoint mirror at {mirror_path} and no span acknowledgements: records cut off after "
            "the last checkpoint cannot be seen (pass --mirror)"
        )
    return report


def canonical_json_or_repr(value: Any) -> str:
    try:
        return canonical_json(value).decode()
    except NotCanonicalizable:
        return repr(value)


def _check_checkpoint(record, seq, where, report: VerifyReport, anchors: _Anchors, problem) -> None:
    report.checkpoints += 1
    report.last_checkpoint_seq = seq
    payload = record.get("checkpoint")
    signature = record.get("signature")
    signer = record.get("signer")
    if not (isinstance(payload, dict) and isinstance(signature, dict) and isinstance(signer, dict)):
        problem(seq, where, f"seq {seq}: checkpoint lacks checkpoint/signature/signer")
        return
    if payload.get("seq") != seq - 1 or payload.get("head_hash") != record.get("prev_hash"):
        problem(seq, where, f"seq {seq}: checkpoint does not cover the record before it")
        return
    if payload.get("log_id") != report.log_id:
        problem(seq, where, f"seq {seq}: checkpoint names log {payload.get('log_id')!r}, not {report.log_id!r}")
        return
    alg, value = signature.get("alg", ""), signature.get("value", "")
    claimed_id = signature.get("key_id")
    spiffe_id = ""
    if anchors.given:
        named = anchors.keys.get(claimed_id) if isinstance(claimed_id, str) else None
        if named is not None:
            key, spiffe_id = named.key, named.spiffe_id
        elif anchors.bundle:
            key, spiffe_id, wrong = _svid_signer(signer, payload, anchors)
            if wrong:
                problem(seq, where, f"seq {seq}: checkpoint signer not trusted: {wrong}")
                return
        else:
            problem(seq, where, f"seq {seq}: checkpoint signed by key {claimed_id}, not one named with --key")
            return
    else:
        try:
            key = _decode_public(signer.get("public_key", ""))
        except (ValueError, TypeError):
            problem(seq, where, f"seq {seq}: checkpoint signer key does not parse")
            return
        if key_id(key) != claimed_id:
            problem(seq, where, f"seq {seq}: checkpoint key_id does not match the signer key")
            return
    if not verify_signature(key, alg, payload, value):
        problem(seq, where, f"seq {seq}: checkpoint signature is not valid (forged or altered)")
        return
    unsigned = _unsigned_parts_wrong(record, payload, signature, signer, key, report.startup_sidecar)
    if unsigned:
        # what the signature does not cover must be what the writer derives from what it does: the
        # last checkpoint is followed by nothing whose prev_hash would hold it
        problem(seq, where, f"seq {seq}: checkpoint record altered outside its signed payload: {unsigned}")
        return
    who = report.signers.setdefault(key_id(key), Signer(key_id(key), spiffe_id, str(signer.get("source") or "")))
    who.checkpoints += 1
    who.first_seq = seq if who.first_seq is None else who.first_seq
    who.last_seq = seq
    if anchors.given:
        # the checkpoint's payload is signed and names the record before it: seq 1..seq are covered
        report.covered_seq = seq


_CHECKPOINT_KEYS = {"checkpoint", "hash", "kind", "logged_at", "prev_hash", "seq", "sidecar", "signature", "signer"}
_PAYLOAD_KEYS = {"head_hash", "log_id", "seq", "time"}
_SIGNATURE_KEYS = {"alg", "key_id", "value"}
_SIGNER_KEYS = {"certificates", "key_id", "public_key", "source"}


def _unsigned_parts_wrong(record: dict, payload: dict, signature: dict, signer: dict, key: Any,
                          startup_sidecar: Any) -> str:
    """Why the parts of a checkpoint record its signature does not cover are not the ones the writer
    (log.py `_checkpoint_line`) derives from the signed payload and the key; "" when they are."""
    if set(record) != _CHECKPOINT_KEYS:
        return f"members {sorted(set(record) ^ _CHECKPOINT_KEYS)} added or removed"
    if set(payload) != _PAYLOAD_KEYS or set(signature) != _SIGNATURE_KEYS or not set(signer) <= _SIGNER_KEYS:
        return "members added to or removed from checkpoint, signature or signer"
    if record.get("logged_at") != payload.get("time"):
        return "logged_at is not the signed time"
    kid = key_id(key)
    if signature.get("key_id") != kid or signer.get("key_id") != kid:
        return "key_id is not the signing key's"
    if signer.get("public_key") != base64.b64encode(public_der(key)).decode():
        return "public_key is not the signing key"
    certificates = signer.get("certificates")
    if certificates is not None:
        try:
            if not isinstance(certificates, list) or not certificates or not all(isinstance(c, str) for c in certificates):
                raise ValueError("not a list of PEM strings")
            leaf = x509.load_pem_x509_certificate(certificates[0].encode())
        except ValueError:
            return "certificates do not parse"
        if public_der(leaf.public_key()) != public_der(key):
            return "the signer certificate is not the signing key's"
    if signer.get("source") not in (("svid",) if certificates is not None else ("file", "dev")):
        return f"source {signer.get('source')!r} does not match the signer"
    if startup_sidecar is not None and record.get("sidecar") != startup_sidecar:
        return f"sidecar {record.get('sidecar')!r} is not the one that started the log ({startup_sidecar!r})"
    return ""


def _svid_signer(signer: dict, payload: dict, anchors: _Anchors) -> tuple[Any, str, str]:
    """(key, SPIFFE ID, "") for an SVID chaining to the bundle, named by --signer; else (None, "", why)."""
    try:
        at = parse_rfc3339(str(payload.get("time")))
    except ValueError:
        return None, "", "checkpoint time does not parse"
    certificates = signer.get("certificates") or []
    if not isinstance(certificates, list) or not all(isinstance(c, str) for c in certificates):
        return None, "", "the signer certificates are not a list of PEM strings"
    wrong = chain_trusted(certificates, anchors.bundle, at)
    if wrong:
        return None, "", wrong
    leaf = x509.load_pem_x509_certificate(signer["certificates"][0].encode())
    spiffe_id = spiffe_id_of(leaf)
    if not spiffe_id:
        return None, "", "the signer certificate is not an SVID (no single spiffe:// URI SAN)"
    if anchors.signer_ids and not spiffe_id_matches(spiffe_id, anchors.signer_ids):
        return None, "", f"signed by {spiffe_id}, not a SPIFFE ID named with --signer"
    return leaf.public_key(), spiffe_id, ""


def where_logs_are(directory: str | Path) -> str:
    """For a directory that holds no log: "; an evidence log is in D: give that directory" when a
    subdirectory holds one (var/ given for var/evidence), else "". verify, show and replay say it alike."""
    below = _logs_below(Path(directory))
    return f"; an evidence log is in {', '.join(below)}: give that directory" if below else ""


def _logs_below(directory: Path) -> list[str]:
    """The subdirectories of `directory` that hold evidence files (unreadable ones skipped), sorted."""
    found = []
    try:
        children = sorted(child for child in directory.iterdir() if child.is_dir())
    except OSError:
        return []
    for child in children:
        try:
            if list_log_files(child):
                found.append(str(child))
        except OSError:
            continue
    return found


def _read_regular(path: Path) -> tuple[bytes, str]:
    """(the bytes of `path`, "") when it is a regular file it can read; else (b"", why not). A FIFO
    put where a log file or the mirror belongs would block a read forever; a directory or an
    unreadable file made `verify` raise instead of giving a verdict."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return b"", f"cannot be read ({exc.strerror})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b"", "is not a regular file"
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), ""
    except OSError as exc:
        return b"", f"cannot be read ({exc.strerror})"
    finally:
        os.close(fd)


def _check_outside_copies(directory, mirror, report, checkpoint_hashes, problem) -> None:
    last = report.last_seq or 0
    mirror_data, unreadable = _read_regular(mirror) if mirror.exists() or mirror.is_symlink() else (b"", "")
    if unreadable:
        problem(None, mirror.name, f"the checkpoint mirror {unreadable}")
    elif mirror.exists():
        for number, line in enumerate(mirror_data.splitlines(), start=1):
            where = f"{mirror.name}:{number}"
            try:
                copy = parse_json(line)
                seq, claimed = copy["seq"], copy["hash"]
                if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(claimed, str):
                    raise TypeError("seq is not an integer or hash not a string")
            except (ValueError, KeyError, TypeError):
                report.warnings.append(f"{where}: unreadable checkpoint copy")
                continue
            if seq > last:
                problem(
                    last + 1,
                    where,
                    f"log truncated: the mirror holds a checkpoint at seq {seq} "
                    f"(written {copy.get('logged_at')}) but the log ends at seq {last}",
                )
                break
            if checkpoint_hashes.get(seq) != claimed:
                problem(seq, where, f"seq {seq}: the log's record differs from the mirrored checkpoint")
    elif report.checkpoints:
        report.warnings.append(f"no checkpoint mirror at {mirror}: truncation is checked against the log alone")
    state = directory / SHIP_STATE_NAME
    if state.exists():
        try:
            data, unreadable = _read_regular(state)
            if unreadable:
                raise ValueError(unreadable)
            shipped = int(parse_json(data)["seq"])
        except (ValueError, KeyError, TypeError, OSError):
            report.warnings.append(f"{SHIP_STATE_NAME}: unreadable")
        else:
            if shipped > last:
                problem(
                    last + 1,
                    SHIP_STATE_NAME,
                    f"log truncated: spans up to seq {shipped} were acknowledged by the collector "
                    f"but the log ends at seq {last}",
                )


def format_report(report: VerifyReport) -> str:
    out = [f"evidence: {report.directory}"]
    expected = report.expected_log_id
    pinned = "" if not expected else " (as --log-id expects)" if expected == report.log_id else f" (--log-id expects {expected})"
    out.append(f"log id:   {report.log_id or '-'}{pinned}")
    seqs = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no records"
    out.append(f"records:  {report.records} in {report.files} file(s), {seqs}")
    if report.kinds:
        out.append("kinds:    " + ", ".join(f"{k}={n}" for k, n in sorted(report.kinds.items(), key=lambda x: str(x[0]))))
    if report.checkpoints:
        out.append(f"checkpoints: {report.checkpoints}, last at seq {report.last_checkpoint_seq}")
    else:
        out.append("checkpoints: none")
    out.append(f"trust anchors: {report.anchors}")
    for signer in report.signers.values():
        name = signer.spiffe_id or ("(a key you gave; no SPIFFE ID)" if report.anchored else "(unauthenticated: carried by the log)")
        claimed = f", log says source {signer.source}" if signer.source else ""
        out.append(
            f"signed by: {name} key {signer.key_id}: {signer.checkpoints} checkpoint(s), "
            f"seq {signer.first_seq}..{signer.last_seq}{claimed}"
        )
    for warning in report.warnings:
        out.append(f"warning: {warning}")
    verdict = report.verdict
    if verdict == INTACT:
        out.append(f"INTACT: seq 1..{report.last_seq} covered by checkpoints of trusted signers; head {report.last_hash}")
    elif verdict == NOT_YET_COVERED:
        covered = f"seq 1..{report.covered_seq} intact; " if report.covered_seq else "no record is covered; "
        out.append(
            f"NOT YET COVERED: {covered}seq {report.covered_seq + 1}..{report.last_seq} "
            f"({report.uncovered} record(s)) follow the last checkpoint a trusted signer signed, "
            "so nothing shows who wrote them (a clean shutdown or the next checkpoint covers them)"
        )
    elif verdict == CONSISTENT:
        out.append(
            f"CONSISTENT: internal consistency only, head seq {report.last_seq} {report.last_hash}. "
            "No trust anchor was given (--key, --bundle): hashes, chain and signatures agree with each other "
            "and with keys the log carries itself, which whoever can rewrite the log can replace"
        )
    else:
        first = report.first_broken
        if first is not None:
            at = f"seq {first.seq}" if first.seq is not None else "the start"
            out.append(f"BROKEN at {at} ({first.where}): {first.message}")
            for p in report.problems[1:]:
                out.append(f"  also {p.where}: {p.message}")
            if report.truncated_problems:
                out.append(f"  ... and {report.truncated_problems} more")
        else:
            out.append("BROKEN: no records")
    return "\n".join(out)


def exit_code(report: VerifyReport) -> int:
    """0 intact (or, without anchors, consistent), 1 broken, 3 not yet covered (2 is a usage error)."""
    return {INTACT: 0, CONSISTENT: 0, NOT_YET_COVERED: 3}.get(report.verdict, 1)
