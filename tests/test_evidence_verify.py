"""`evidence verify` catches every kind of tampering it promises to, and `evidence show` finds records."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from sidecar.cli import main
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.records import default_mirror_path, seal
from sidecar.evidence.recorder import EvidenceRecorder
from sidecar.evidence.signing import SigningKey, dev_signing_key, load_bundle
from sidecar.evidence.verify import verify_dir
from tests.test_evidence_log import make_event

PY = sys.executable


def build_log(directory: Path, records: int = 30, checkpoint_every: int = 10, clean: bool = False, **kwargs) -> Path:
    """A log of `records` decisions; `clean`: closed with a final checkpoint, else as after a crash.

    The dev key is shared by every log built under the same parent (`<parent>/ev-dev-key.pem`).
    """
    key = dev_signing_key(directory.parent / "ev-dev-key.pem")
    log = EvidenceLog.open(
        directory,
        instance_id="s",
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=0,
        key_provider=kwargs.pop("key_provider", lambda: key),
        **kwargs,
    )
    recorder = EvidenceRecorder(log, None)
    try:
        for i in range(records):
            log.append_sync("decision", recorder.fields_for(make_event(i, outcome=("allow", "deny", "escalate")[i % 3])))
    finally:
        log.close(checkpoint=clean)
    return directory


def lines_of(directory: Path) -> tuple[Path, list[bytes]]:
    path = directory / "evidence-000001.jsonl"
    return path, path.read_bytes().splitlines(keepends=True)


def seq_of(line: bytes) -> int:
    return json.loads(line)["seq"]


@pytest.fixture
def log_dir(tmp_path) -> Path:
    return build_log(tmp_path / "ev")


def test_an_untouched_log_verifies(log_dir):
    report = verify_dir(log_dir)
    assert report.ok, report.problems
    assert report.records == 34 and report.checkpoints == 3  # startup + 30 + 3 checkpoints
    assert report.last_checkpoint_seq == 34 - 1 or report.last_seq - report.last_checkpoint_seq <= 10


def test_an_edited_record_is_caught_at_its_seq(log_dir):
    path, lines = lines_of(log_dir)
    lines[5] = lines[5].replace(b'"outcome":"deny"', b'"outcome":"allow"')
    assert b'"outcome":"allow"' in lines[5]
    path.write_bytes(b"".join(lines))
    report = verify_dir(log_dir)
    assert not report.ok
    assert report.first_broken.seq == 6 and "hash mismatch" in report.first_broken.message


def test_an_edited_record_with_a_recomputed_hash_breaks_the_next_link(log_dir):
    path, lines = lines_of(log_dir)
    record = json.loads(lines[5])
    record["outcome"] = "allow"
    lines[5] = seal(record)
    path.write_bytes(b"".join(lines))
    report = verify_dir(log_dir)
    assert report.first_broken.seq == 7 and "prev_hash" in report.first_broken.message


def test_a_rewritten_chain_is_caught_by_the_checkpoint_signature(log_dir):
    """Edit seq 6 and re-seal every record after it: only the signature can tell."""
    path, lines = lines_of(log_dir)
    records = [json.loads(line) for line in lines]
    records[5]["outcome"] = "allow"
    for i in range(5, len(records)):
        records[i]["prev_hash"] = records[i - 1]["hash"]
        if records[i]["kind"] == "checkpoint":
            records[i]["checkpoint"]["head_hash"] = records[i - 1]["hash"]
        seal(records[i])
    path.write_bytes(b"".join(seal(r) for r in records))
    report = verify_dir(log_dir)
    assert not report.ok
    assert "signature" in report.first_broken.message
    assert report.first_broken.seq == next(r["seq"] for r in records[5:] if r["kind"] == "checkpoint")


def test_a_deleted_record_is_caught(log_dir):
    path, lines = lines_of(log_dir)
    del lines[8]
    path.write_bytes(b"".join(lines))
    report = verify_dir(log_dir)
    assert report.first_broken.seq == 9 and "record 9 missing" in report.first_broken.message


def test_reordered_records_are_caught(log_dir):
    path, lines = lines_of(log_dir)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_bytes(b"".join(lines))
    report = verify_dir(log_dir)
    assert not report.ok and report.first_broken.seq in (4, 5)
    assert "missing" in report.first_broken.message or "reordered" in report.first_broken.message


def test_a_forged_checkpoint_signature_is_caught(log_dir):
    path, lines = lines_of(log_dir)
    index = next(i for i, line in enumerate(lines) if b'"kind":"checkpoint"' in line)
    record = json.loads(lines[index])
    forger = ed25519.Ed25519PrivateKey.generate()
    from sidecar.evidence.signing import sign_payload

    record["signature"], _ = sign_payload(SigningKey(forger, "dev"), record["checkpoint"])
    lines[index] = seal(record)
    path.write_bytes(b"".join(lines))
    report = verify_dir(log_dir)
    assert report.first_broken.seq == record["seq"]
    assert "key_id" in report.first_broken.message or "signature" in report.first_broken.message


def test_a_forger_who_rewrites_everything_with_their_own_key_is_caught_with_key(log_dir, tmp_path):
    """Edit a record, re-seal the rest of the chain, re-sign every checkpoint, drop the mirror."""
    from sidecar.evidence.signing import load_public_keys, sign_payload

    forger = SigningKey(ed25519.Ed25519PrivateKey.generate(), "dev")
    path, lines = lines_of(log_dir)
    records = [json.loads(line) for line in lines]
    records[5]["outcome"] = "allow"
    for i in range(5, len(records)):
        records[i]["prev_hash"] = records[i - 1]["hash"]
        if records[i]["kind"] == "checkpoint":
            records[i]["checkpoint"]["head_hash"] = records[i - 1]["hash"]
            records[i]["signature"], records[i]["signer"] = sign_payload(forger, records[i]["checkpoint"])
        seal(records[i])
    path.write_bytes(b"".join(seal(r) for r in records))
    default_mirror_path(log_dir).unlink()
    # against the keys the log carries, a complete forgery is self-consistent...
    assert verify_dir(log_dir).ok
    # ...which is why an auditor passes the real public key (or the trust bundle)
    report = verify_dir(log_dir, public_keys=load_public_keys([tmp_path / "ev-dev-key.pub.pem"]))
    first_checkpoint = next(r["seq"] for r in records if r["kind"] == "checkpoint")
    assert report.first_broken.seq == first_checkpoint and "--key" in report.first_broken.message


def test_truncation_across_a_checkpoint_is_caught_by_the_mirror(log_dir):
    path, lines = lines_of(log_dir)
    last_checkpoint = max(i for i, line in enumerate(lines) if b'"kind":"checkpoint"' in line)
    path.write_bytes(b"".join(lines[: last_checkpoint - 3]))
    report = verify_dir(log_dir)
    assert not report.ok
    assert "truncated" in report.first_broken.message
    assert report.first_broken.seq == last_checkpoint - 3 + 1


def test_truncation_is_caught_by_what_the_collector_acknowledged(log_dir):
    default_mirror_path(log_dir).unlink()
    (log_dir / "ship-state.json").write_text(json.dumps({"file_index": 1, "offset": 0, "seq": 34}))
    path, lines = lines_of(log_dir)
    path.write_bytes(b"".join(lines[:20]))
    report = verify_dir(log_dir)
    assert "acknowledged by the collector" in report.first_broken.message


def test_truncation_after_the_last_checkpoint_is_the_documented_blind_spot(log_dir):
    path, lines = lines_of(log_dir)
    # records after the last checkpoint can go unnoticed: the bounded window docs/evidence.md names
    last_checkpoint = max(i for i, line in enumerate(lines) if b'"kind":"checkpoint"' in line)
    path.write_bytes(b"".join(lines[: last_checkpoint + 1]))
    assert verify_dir(log_dir).ok


def test_a_deleted_file_in_the_middle_is_caught(tmp_path):
    directory = build_log(tmp_path / "ev", records=60, rotate_bytes=4096)
    files = sorted(directory.glob("evidence-*.jsonl"))
    assert len(files) >= 3
    files[1].unlink()
    report = verify_dir(directory)
    assert not report.ok and "missing" in report.first_broken.message


def test_a_replaced_first_startup_record_is_caught(log_dir):
    path, lines = lines_of(log_dir)
    record = json.loads(lines[0])
    record["log_id"] = "another-log"
    lines[0] = seal(record)
    path.write_bytes(b"".join(lines))
    report = verify_dir(log_dir)
    assert not report.ok  # seq 2 no longer links, and checkpoints name the old log id


def _ca_and_svid(tmp_path: Path):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test trust domain")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    svid_key = ec.generate_private_key(ec.SECP256R1())
    svid = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(svid_key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/sidecar")]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return SigningKey(svid_key, "svid", (svid,)), bundle


def test_checkpoints_signed_with_an_svid_verify_against_the_trust_bundle(tmp_path):
    svid_key, bundle = _ca_and_svid(tmp_path)
    directory = build_log(tmp_path / "ev", key_provider=lambda: svid_key)
    report = verify_dir(directory, bundle=load_bundle(bundle))
    assert report.ok, report.problems
    checkpoint = next(json.loads(line) for line in lines_of(directory)[1] if b'"kind":"checkpoint"' in line)
    assert checkpoint["signer"]["source"] == "svid" and checkpoint["signature"]["alg"] == "ecdsa-sha256"
    other_ca, other_bundle = _ca_and_svid(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    report = verify_dir(directory, bundle=load_bundle(other_bundle))
    assert not report.ok and "trust bundle" in report.first_broken.message


def test_a_dev_signed_log_does_not_pass_a_bundle_check(tmp_path, log_dir):
    _, bundle = _ca_and_svid(tmp_path)
    report = verify_dir(log_dir, bundle=load_bundle(bundle))
    assert not report.ok


def test_cli_verify_exit_codes_and_summary(log_dir, tmp_path, capsys):
    key = str(tmp_path / "ev-dev-key.pub.pem")
    assert main(["evidence", "verify", str(log_dir), "--key", key]) == 3  # seq 34 follows the last checkpoint
    out = capsys.readouterr().out
    assert "NOT YET COVERED: seq 1..33 intact; seq 34..34" in out and "records:  34" in out
    closed = build_log(tmp_path / "closed", records=30, clean=True)
    assert main(["evidence", "verify", str(closed), "--key", key]) == 0
    out = capsys.readouterr().out
    assert "INTACT: seq 1..35" in out and "log says source dev" in out
    path, lines = lines_of(log_dir)
    del lines[8]
    path.write_bytes(b"".join(lines))
    assert main(["evidence", "verify", str(log_dir)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN at seq 9" in out


def test_cli_show_filters_and_json(log_dir, capsys):
    assert main(["evidence", "show", str(log_dir), "--outcome", "deny", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown and all(r["outcome"] == "deny" for r in shown) and len(shown) == 10
    assert main(["evidence", "show", str(log_dir), "--decision-id", "decision-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "read_file" in out[1] and "deny" in out[1]
    assert main(["evidence", "show", str(log_dir), "--subject", "spiffe://example.org/ns/agents", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 30
    assert main(["evidence", "show", str(log_dir), "--since", "1h", "--tool", "nope"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # header only
    assert main(["evidence", "show", str(log_dir), "--since", "2026-11-22T09:00:00Z", "--kind", "decision", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 30
    assert main(["evidence", "show", str(log_dir), "--since", "yesterday"]) == 2


def test_console_script_verify_runs(log_dir):
    done = subprocess.run([PY, "-m", "sidecar", "evidence", "verify", str(log_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "CONSISTENT: internal consistency only" in done.stdout and "INTACT" not in done.stdout
