"""`agent-sidecar evidence verify DIR`: prove the log is whole and unaltered, or say where it is not.

Checks, in order of the log:
- files evidence-NNNNNN.jsonl are numbered without gaps;
- every line is a complete, canonical JSON record whose `hash` is the sha256
  of the record without `hash`;
- `seq` counts 1, 2, 3, ... and each `prev_hash` is the previous record's hash
  (seq 1: GENESIS), across files;
- every checkpoint covers exactly the record before it, names this log's
  log_id and carries a valid signature (by a key given with --key, by a
  certificate that chains to --bundle, or else by the key it carries);
and then, against copies kept outside the chain:
- every checkpoint in the mirror (checkpoints.jsonl) is in the log, unchanged;
- the span shipper never acknowledged a seq the log no longer has.

Truncation after the last checkpoint that reached the mirror (or the
collector) is the one change this cannot see.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from sidecar.canonical import NotCanonicalizable, canonical_json
from sidecar.evidence.log import list_log_files
from sidecar.evidence.records import GENESIS, KINDS, MIRROR_NAME, SHIP_STATE_NAME, parse_rfc3339, record_hash
from sidecar.evidence.signing import chain_trusted, key_id, verify_signature


@dataclass
class Problem:
    seq: int | None
    where: str  # file:line
    message: str


@dataclass
class VerifyReport:
    directory: str
    files: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str = ""
    log_id: str = ""
    kinds: Counter = field(default_factory=Counter)
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    signature_trust: str = ""
    signer_keys: set = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.records > 0

    @property
    def first_broken(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    @property
    def unprotected_tail(self) -> int:
        if self.last_seq is None:
            return 0
        return self.last_seq - (self.last_checkpoint_seq or 0)


def _decode_public(b64: str) -> Any:
    return serialization.load_der_public_key(base64.b64decode(b64))


def verify_dir(
    directory: str | Path,
    *,
    public_keys: list[Any] | None = None,
    bundle: list[Any] | None = None,
    mirror: str | Path | None = None,
    max_problems: int = 50,
) -> VerifyReport:
    directory = Path(directory)
    report = VerifyReport(str(directory))
    keys_by_id = {key_id(k): k for k in public_keys or []}
    if keys_by_id:
        report.signature_trust = f"--key ({len(keys_by_id)} key{'s' if len(keys_by_id) > 1 else ''})"
    elif bundle:
        report.signature_trust = f"--bundle ({len(bundle)} CA certificate{'s' if len(bundle) > 1 else ''})"
    else:
        report.signature_trust = "keys carried in the log itself (pass --key or --bundle to prove who signed)"

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
        problem(None, str(directory), "no evidence files (evidence-NNNNNN.jsonl) here")
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
        data = path.read_bytes()
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
                record = json.loads(line)
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
            report.kinds[kind] += 1
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
            if kind not in KINDS:
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
                log_id = record.get("log_id")
                if not report.log_id:
                    report.log_id = log_id or ""
                    if seq != 1 and report.first_seq == seq:
                        problem(seq, where, "the log does not start at seq 1")
                elif log_id != report.log_id:
                    problem(seq, where, f"seq {seq}: startup record names log {log_id!r}, not {report.log_id!r}")
            elif report.records == 1:
                problem(seq, where, "the first record is not a startup record")
            if kind == "checkpoint":
                _check_checkpoint(record, seq, where, report, keys_by_id, bundle or [], problem)
                checkpoint_hashes[seq] = claimed if isinstance(claimed, str) else ""
            report.last_seq = seq
            report.last_hash = claimed if isinstance(claimed, str) else ""
            expected_seq, expected_prev = seq + 1, claimed

    _check_outside_copies(directory, Path(mirror) if mirror else directory / MIRROR_NAME, report, checkpoint_hashes, problem)
    return report


def _check_checkpoint(record, seq, where, report, keys_by_id, bundle, problem) -> None:
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
    if payload.get("log_id") != report.log_id:
        problem(seq, where, f"seq {seq}: checkpoint names log {payload.get('log_id')!r}, not {report.log_id!r}")
    alg, value = signature.get("alg", ""), signature.get("value", "")
    if keys_by_id:
        key = keys_by_id.get(signature.get("key_id"))
        if key is None:
            problem(seq, where, f"seq {seq}: checkpoint signed by key {signature.get('key_id')}, not one given with --key")
            return
    else:
        try:
            key = _decode_public(signer.get("public_key", ""))
        except (ValueError, TypeError):
            problem(seq, where, f"seq {seq}: checkpoint signer key does not parse")
            return
        if key_id(key) != signature.get("key_id"):
            problem(seq, where, f"seq {seq}: checkpoint key_id does not match the signer key")
            return
        if bundle:
            try:
                at = parse_rfc3339(str(payload.get("time")))
            except ValueError:
                problem(seq, where, f"seq {seq}: checkpoint time does not parse")
                return
            wrong = chain_trusted(signer.get("certificates") or [], bundle, at)
            if wrong:
                problem(seq, where, f"seq {seq}: checkpoint signer not trusted: {wrong}")
                return
            leaf_key = _leaf_key(signer)
            if leaf_key is None or key_id(leaf_key) != key_id(key):
                problem(seq, where, f"seq {seq}: checkpoint key is not the signer certificate's key")
                return
    report.signer_keys.add(key_id(key))
    if not verify_signature(key, alg, payload, value):
        problem(seq, where, f"seq {seq}: checkpoint signature is not valid (forged or altered)")


def _leaf_key(signer: dict) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(signer["certificates"][0].encode()).public_key()
    except (KeyError, IndexError, ValueError, AttributeError):
        return None


def _check_outside_copies(directory, mirror, report, checkpoint_hashes, problem) -> None:
    last = report.last_seq or 0
    if mirror.exists():
        for number, line in enumerate(mirror.read_bytes().splitlines(), start=1):
            where = f"{mirror.name}:{number}"
            try:
                copy = json.loads(line)
                seq, claimed = copy["seq"], copy["hash"]
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
            shipped = int(json.loads(state.read_text())["seq"])
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
    out.append(f"log id:   {report.log_id or '-'}")
    seqs = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no records"
    out.append(f"records:  {report.records} in {report.files} file(s), {seqs}")
    if report.kinds:
        out.append("kinds:    " + ", ".join(f"{k}={n}" for k, n in sorted(report.kinds.items(), key=lambda x: str(x[0]))))
    if report.checkpoints:
        out.append(
            f"checkpoints: {report.checkpoints}, last at seq {report.last_checkpoint_seq}; "
            f"{report.unprotected_tail} record(s) after it are covered only by the mirror/collector copies"
        )
    else:
        out.append("checkpoints: none (any truncation of this log is undetectable)")
    out.append(f"signatures checked with: {report.signature_trust}")
    if report.signer_keys:
        out.append("signing keys: " + ", ".join(sorted(report.signer_keys)))
    for warning in report.warnings:
        out.append(f"warning: {warning}")
    if report.ok:
        out.append(f"INTACT: head seq {report.last_seq} {report.last_hash}")
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
