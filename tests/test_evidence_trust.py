"""`evidence verify` decides from the operator's trust anchors, never from what the log carries (issue 11, §3).

The attacker here can rewrite the evidence directory (and the mirror, where
it says so) but holds no key the operator named. Variants: the issue's
example (drop every checkpoint and the mirror, flip a deny, re-hash), a log
re-signed with the attacker's own key, an SVID of the same trust domain
that is not the sidecar, a truncated tail, a checkpoint taken from another
log, an older checkpoint replayed, files reordered, records appended after
the last checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from sidecar.cli import main
from sidecar.config import ConfigError, load_config
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.recorder import EvidenceRecorder, open_recorder
from sidecar.evidence.records import default_mirror_path, dev_key_path, seal
from sidecar.evidence.signing import SigningKey, load_bundle, load_public_keys, sign_payload
from sidecar.evidence.verify import BROKEN, CONSISTENT, INTACT, NOT_YET_COVERED, verify_dir
from tests.test_evidence_log import make_event


def write_log(directory: Path, key: SigningKey, *, records: int = 30, clean: bool = True, **kwargs) -> Path:
    log = EvidenceLog.open(directory, instance_id="s", checkpoint_every=10, checkpoint_seconds=0,
                           key_provider=lambda: key, **kwargs)
    recorder = EvidenceRecorder(log, None)
    try:
        for i in range(records):
            log.append_sync("decision", recorder.fields_for(make_event(i, outcome=("allow", "deny")[i % 2])))
    finally:
        log.close(checkpoint=clean)
    return directory


def read(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return out


def rewrite(directory: Path, records: list[dict], resign: SigningKey | None = None) -> None:
    """Renumber, re-chain and re-seal every record (re-signing checkpoints with `resign`), into one file."""
    prev = "sha256:" + "0" * 64
    lines = []
    for seq, record in enumerate(records, start=1):
        record = dict(record)
        record["seq"], record["prev_hash"] = seq, prev
        if record["kind"] == "checkpoint" and resign is not None:
            record["checkpoint"] = {**record["checkpoint"], "seq": seq - 1, "head_hash": prev}
            record["signature"], record["signer"] = sign_payload(resign, record["checkpoint"])
        line = seal(record)
        prev = record["hash"]
        lines.append(line)
    for path in directory.glob("evidence-*.jsonl"):
        path.unlink()
    (directory / "evidence-000001.jsonl").write_bytes(b"".join(lines))


def flip_a_deny(records: list[dict]) -> list[dict]:
    index = next(i for i, r in enumerate(records) if r.get("outcome") == "deny")
    records[index] = {**records[index], "outcome": "allow"}
    return records


@pytest.fixture
def sidecar_key() -> SigningKey:
    return SigningKey(ed25519.Ed25519PrivateKey.generate(), "file")


@pytest.fixture
def pub(tmp_path, sidecar_key) -> Path:
    path = tmp_path / "sidecar.pub.pem"
    path.write_bytes(sidecar_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture
def log_dir(tmp_path, sidecar_key) -> Path:
    return write_log(tmp_path / "ev", sidecar_key)


def keys(*paths: Path):
    return load_public_keys(paths)


def test_an_untouched_cleanly_closed_log_is_intact_only_with_anchors(log_dir, pub, capsys):
    report = verify_dir(log_dir, public_keys=keys(pub))
    assert report.verdict == INTACT and report.covered_seq == report.last_seq
    assert verify_dir(log_dir).verdict == CONSISTENT
    assert main(["evidence", "verify", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert "CONSISTENT: internal consistency only" in out and "INTACT" not in out
    assert "(unauthenticated: carried by the log)" in out


def test_the_issue_example_drop_checkpoints_and_mirror_flip_a_deny_rehash(log_dir, pub, capsys):
    records = [r for r in read(log_dir) if r["kind"] != "checkpoint"]
    rewrite(log_dir, flip_a_deny(records))
    default_mirror_path(log_dir).unlink()
    report = verify_dir(log_dir, public_keys=keys(pub))
    assert report.verdict == NOT_YET_COVERED and report.covered_seq == 0 and report.uncovered == report.records
    assert main(["evidence", "verify", str(log_dir), "--key", str(pub)]) == 3
    out = capsys.readouterr().out
    assert "INTACT" not in out and f"NOT YET COVERED: no record is covered; seq 1..{report.last_seq}" in out
    # without anchors the rewrite is consistent, and the report says that is all it is
    assert verify_dir(log_dir).verdict == CONSISTENT


def test_a_log_re_signed_with_an_unknown_key_is_broken(log_dir, pub):
    forger = SigningKey(ed25519.Ed25519PrivateKey.generate(), "file")
    rewrite(log_dir, flip_a_deny(read(log_dir)), resign=forger)
    default_mirror_path(log_dir).unlink()
    report = verify_dir(log_dir, public_keys=keys(pub))
    assert report.verdict == BROKEN and "not one named with --key" in report.first_broken.message
    assert verify_dir(log_dir).verdict == CONSISTENT  # self-consistent forgery: why anchors are needed


def test_a_private_key_file_as_anchor_works_like_its_public_half(log_dir, tmp_path, sidecar_key):
    private = tmp_path / "k.pem"
    private.write_bytes(sidecar_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert verify_dir(log_dir, public_keys=keys(private)).verdict == INTACT


def test_records_appended_after_the_last_checkpoint_are_not_yet_covered(log_dir, pub, capsys):
    records = read(log_dir)
    extra = {**records[2], "decision_id": "forged", "outcome": "allow"}
    rewrite(log_dir, records + [extra])
    report = verify_dir(log_dir, public_keys=keys(pub))
    assert report.verdict == NOT_YET_COVERED and report.uncovered == 1
    assert report.covered_seq == len(records)
    assert main(["evidence", "verify", str(log_dir), "--key", str(pub)]) == 3
    assert f"seq 1..{len(records)} intact; seq {len(records) + 1}..{len(records) + 1} (1 record(s))" in capsys.readouterr().out


def test_a_crash_leaves_a_not_yet_covered_tail_which_the_next_checkpoint_covers(tmp_path, sidecar_key, pub):
    directory = write_log(tmp_path / "ev", sidecar_key, records=15, clean=False)
    report = verify_dir(directory, public_keys=keys(pub))
    assert report.verdict == NOT_YET_COVERED and report.uncovered == 6  # checkpoint at 11 (after 10), then 12..17
    log = EvidenceLog.open(directory, instance_id="s", checkpoint_every=10, checkpoint_seconds=0,
                           key_provider=lambda: sidecar_key)
    log.close()
    assert verify_dir(directory, public_keys=keys(pub)).verdict == INTACT


def test_truncating_the_tail_is_seen_through_the_mirror(log_dir, pub):
    records = read(log_dir)
    last_checkpoint = max(i for i, r in enumerate(records) if r["kind"] == "checkpoint")
    rewrite(log_dir, records[: last_checkpoint - 2])
    report = verify_dir(log_dir, public_keys=keys(pub))
    assert report.verdict == BROKEN and "truncated" in report.first_broken.message


def test_truncating_the_tail_and_the_mirror_leaves_a_warning_not_silence(log_dir, pub, capsys):
    records = read(log_dir)
    earlier = sorted(i for i, r in enumerate(records) if r["kind"] == "checkpoint")[-2]
    rewrite(log_dir, records[: earlier + 1])
    default_mirror_path(log_dir).unlink()
    assert main(["evidence", "verify", str(log_dir), "--key", str(pub)]) == 0
    assert "records cut off after the last checkpoint cannot be seen (pass --mirror)" in capsys.readouterr().out


def test_a_checkpoint_taken_from_another_log_does_not_cover(tmp_path, sidecar_key, pub):
    mine = write_log(tmp_path / "mine", sidecar_key)
    other = write_log(tmp_path / "other", sidecar_key)
    records = [r for r in read(mine) if r["kind"] != "checkpoint"]
    foreign = [r for r in read(other) if r["kind"] == "checkpoint"][-1]
    rewrite(mine, flip_a_deny(records) + [foreign])
    default_mirror_path(mine).unlink()
    report = verify_dir(mine, public_keys=keys(pub))
    assert report.verdict == BROKEN
    assert "does not cover the record before it" in report.first_broken.message
    # even at the position it signed, it names another log
    records = read(other)
    last = max(i for i, r in enumerate(records) if r["kind"] == "checkpoint")
    head = [r for r in read(tmp_path / "mine")][0]
    records[0] = head  # this log's startup (its log_id), the rest copied from the other log
    rewrite(mine, records[: last + 1])
    report = verify_dir(mine, public_keys=keys(pub))
    assert report.verdict == BROKEN


def test_an_older_checkpoint_replayed_after_a_forged_tail_does_not_cover(log_dir, pub):
    records = read(log_dir)
    checkpoints = [i for i, r in enumerate(records) if r["kind"] == "checkpoint"]
    kept = records[: checkpoints[0] + 1]
    forged_tail = [{**r, "outcome": "allow"} for r in records[checkpoints[0] + 1 : checkpoints[1]]]
    rewrite(log_dir, kept + forged_tail + [records[checkpoints[0]]])
    default_mirror_path(log_dir).unlink()
    report = verify_dir(log_dir, public_keys=keys(pub))
    assert report.verdict == BROKEN and "does not cover the record before it" in report.first_broken.message


def test_reordered_files_are_broken(tmp_path, sidecar_key, pub):
    directory = write_log(tmp_path / "ev", sidecar_key, records=60, rotate_bytes=4096)
    files = sorted(directory.glob("evidence-*.jsonl"))
    assert len(files) >= 3
    files[1].rename(directory / "swap")
    files[2].rename(files[1])
    (directory / "swap").rename(files[2])
    report = verify_dir(directory, public_keys=keys(pub))
    assert report.verdict == BROKEN


# -- SVIDs and trust bundles ---------------------------------------------------------------------------


def _ca(tmp_path: Path, name: str):
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    bundle = tmp_path / f"{name}-bundle.pem"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, bundle


def _svid(ca_key, ca_cert, spiffe_id: str) -> SigningKey:
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return SigningKey(key, "svid", (cert,))


SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"


def test_the_bundle_and_signer_name_who_signed(tmp_path, capsys):
    ca_key, ca_cert, bundle = _ca(tmp_path, "td")
    directory = write_log(tmp_path / "ev", _svid(ca_key, ca_cert, SIDECAR_ID))
    report = verify_dir(directory, bundle=load_bundle(bundle), signer_ids=[SIDECAR_ID])
    assert report.verdict == INTACT
    assert [s.spiffe_id for s in report.signers.values()] == [SIDECAR_ID]
    assert main(["evidence", "verify", str(directory), "--bundle", str(bundle), "--signer", "spiffe://example.org/ns/*/sa/sidecar"]) == 0
    out = capsys.readouterr().out
    assert f"signed by: {SIDECAR_ID} key sha256:" in out and "INTACT" in out
    # a bundle alone accepts any SVID it issued, and says so
    assert main(["evidence", "verify", str(directory), "--bundle", str(bundle)]) == 0
    assert "without --signer accepts a checkpoint signed by any SVID" in capsys.readouterr().out


def test_another_workload_of_the_same_trust_domain_cannot_sign(tmp_path):
    ca_key, ca_cert, bundle = _ca(tmp_path, "td")
    directory = write_log(tmp_path / "ev", _svid(ca_key, ca_cert, SIDECAR_ID))
    agent = _svid(ca_key, ca_cert, "spiffe://example.org/ns/agents/sa/research")
    rewrite(directory, flip_a_deny(read(directory)), resign=agent)
    default_mirror_path(directory).unlink()
    report = verify_dir(directory, bundle=load_bundle(bundle), signer_ids=[SIDECAR_ID])
    assert report.verdict == BROKEN and "not a SPIFFE ID named with --signer" in report.first_broken.message
    _, _, other_bundle = _ca(tmp_path, "elsewhere")
    assert verify_dir(directory, bundle=load_bundle(other_bundle)).verdict == BROKEN


def test_an_svid_certificate_given_with_key_names_the_signer(tmp_path):
    ca_key, ca_cert, _ = _ca(tmp_path, "td")
    svid = _svid(ca_key, ca_cert, SIDECAR_ID)
    directory = write_log(tmp_path / "ev", svid)
    cert = tmp_path / "svid.pem"
    cert.write_bytes(svid.certificates[0].public_bytes(serialization.Encoding.PEM))
    report = verify_dir(directory, public_keys=keys(cert))
    assert report.verdict == INTACT and [s.spiffe_id for s in report.signers.values()] == [SIDECAR_ID]


def test_signer_without_bundle_is_refused(log_dir, capsys):
    assert main(["evidence", "verify", str(log_dir), "--signer", SIDECAR_ID]) == 2
    assert "--signer" in capsys.readouterr().err


# -- where the dev key and the mirror live -------------------------------------------------------------


async def test_the_dev_key_and_the_mirror_are_not_in_the_evidence_directory(tmp_path):
    directory = tmp_path / "ev"
    recorder = open_recorder(directory, checkpoint_every=2, instance_id="s")
    try:
        for i in range(3):
            await recorder.record(make_event(i))
    finally:
        await recorder.aclose()
    inside = sorted(p.name for p in directory.iterdir())
    assert not [n for n in inside if n.endswith(".pem") or "checkpoints" in n], inside
    assert dev_key_path(directory) == tmp_path / "ev-dev-key.pem" and dev_key_path(directory).exists()
    assert default_mirror_path(directory) == tmp_path / "ev-checkpoints.jsonl"
    assert default_mirror_path(directory).read_bytes().count(b"\n") == 2
    report = verify_dir(directory, public_keys=keys(tmp_path / "ev-dev-key.pub.pem"))
    assert report.verdict == INTACT
    # copying the evidence directory elsewhere does not carry the key along
    shutil.copytree(directory, tmp_path / "copy")
    assert not list((tmp_path / "copy").glob("*.pem"))


@pytest.mark.parametrize("key", ["evidence.signing_key", "evidence.checkpoint_mirror"])
def test_config_refuses_a_key_or_mirror_inside_the_evidence_directory(tmp_path, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, {"evidence.dir": str(tmp_path / "ev"), key: str(tmp_path / "ev" / "sub" / "x")})
    load_config(None, {"evidence.dir": str(tmp_path / "ev"), key: str(tmp_path / "ev2" / "x")}, runs_sidecar=False)
    os.makedirs(tmp_path / "ev", exist_ok=True)
    with pytest.raises(ConfigError, match=key):
        load_config(None, {"evidence.dir": str(tmp_path / "ev") + "/", key: str(tmp_path / "ev" / ".." / "ev" / "x")})
