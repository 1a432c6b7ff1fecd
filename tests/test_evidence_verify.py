"""`evidence verify` catches every kind of tampering it promises to, gives a verdict (never a crash) on
whatever a hostile writer puts in the log, and `evidence show` finds records."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from sidecar.cli import main
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.records import default_mirror_path, seal
from sidecar.evidence.recorder import EvidenceRecorder
from sidecar.evidence.signing import SigningKey, dev_signing_key, load_bundle, load_public_keys
from sidecar.evidence.verify import BROKEN, verify_dir
from tests.test_evidence_log import make_event
from tests.test_evidence_trust import SIDECAR_ID, _ca, _svid, read, rewrite, write_log


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


def verify_cli(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    """`agent-sidecar evidence verify` in its own process: a verify that blocks is killed, not waited on."""
    return subprocess.run([sys.executable, "-m", "sidecar", "evidence", "verify", str(directory), *extra],
                          capture_output=True, text=True, timeout=60)


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
    from sidecar.evidence.signing import sign_payload

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


def test_checkpoints_signed_with_an_svid_verify_against_the_trust_bundle(tmp_path):
    ca_key, ca_cert, bundle = _ca(tmp_path, "td")
    svid_key = _svid(ca_key, ca_cert, SIDECAR_ID)
    directory = build_log(tmp_path / "ev", key_provider=lambda: svid_key)
    report = verify_dir(directory, bundle=load_bundle(bundle))
    assert report.ok, report.problems
    checkpoint = next(json.loads(line) for line in lines_of(directory)[1] if b'"kind":"checkpoint"' in line)
    assert checkpoint["signer"]["source"] == "svid" and checkpoint["signature"]["alg"] == "ecdsa-sha256"
    _, _, other_bundle = _ca(tmp_path, "other")
    report = verify_dir(directory, bundle=load_bundle(other_bundle))
    assert not report.ok and "trust bundle" in report.first_broken.message


def test_a_dev_signed_log_does_not_pass_a_bundle_check(tmp_path, log_dir):
    _, _, bundle = _ca(tmp_path, "td")
    report = verify_dir(log_dir, bundle=load_bundle(bundle))
    assert not report.ok


def swap(place: Path, other: Path) -> None:
    """Put the log in `other` (its files and mirror) where the log in `place` was."""
    for path in place.glob("evidence-*.jsonl"):
        path.unlink()
    for path in other.glob("evidence-*.jsonl"):
        (place / path.name).write_bytes(path.read_bytes())
    default_mirror_path(place).write_bytes(default_mirror_path(other).read_bytes())


def test_log_id_pins_the_log_a_whole_other_one_signed_with_the_same_key_is_caught(tmp_path):
    """Checkpoints sign {log_id, seq, head_hash, time}: another log of the same signer (another run's
    directory, an older export) put in the place of the expected one is intact by every other check."""
    key = str(tmp_path / "ev-dev-key.pub.pem")
    expected = build_log(tmp_path / "expected", clean=True)  # the real EvidenceLog, one dev key for both
    other = build_log(tmp_path / "other", records=12, clean=True)
    expected_id, other_id = read(expected)[0]["log_id"], read(other)[0]["log_id"]
    assert expected_id != other_id
    assert main(["evidence", "verify", str(expected), "--key", key, "--log-id", expected_id]) == 0
    swap(expected, other)
    assert main(["evidence", "verify", str(expected), "--key", key]) == 0  # the gap --log-id closes
    result = verify_cli(expected, "--key", key, "--log-id", expected_id)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"log id:   {other_id} (--log-id expects {expected_id})" in result.stdout
    assert (f"BROKEN at seq 1 (evidence-000001.jsonl:1): seq 1: this is log {other_id!r}, not {expected_id!r} "
            "(--log-id): another log in the place of the one expected") in result.stdout


def test_log_id_catches_records_of_another_log_part_way(tmp_path):
    """The expected log with another log's records (its startup and checkpoints) spliced in, re-chained
    and re-signed with the same key; or the other log first and the expected one after it."""
    signer = dev_signing_key(tmp_path / "ev-dev-key.pem")
    key = str(tmp_path / "ev-dev-key.pub.pem")
    expected, other = read(build_log(tmp_path / "expected", clean=True)), read(build_log(tmp_path / "other", clean=True))
    expected_id, other_id = expected[0]["log_id"], other[0]["log_id"]
    for records, first_wrong in ((expected + other, len(expected) + 1), (other + expected, 1)):
        rewrite(tmp_path / "expected", records, resign=signer)
        default_mirror_path(tmp_path / "expected").unlink(missing_ok=True)
        report = verify_dir(tmp_path / "expected", public_keys=load_public_keys([key]), log_id=expected_id)
        assert report.verdict == BROKEN and report.first_broken.seq == first_wrong, report.problems
        assert other_id in report.first_broken.message and expected_id in report.first_broken.message
    rewrite(tmp_path / "expected", expected, resign=signer)  # the untouched records, re-written alike, pass
    assert verify_dir(tmp_path / "expected", public_keys=load_public_keys([key]), log_id=expected_id).ok


@pytest.mark.parametrize("given", ["", " 0f8e2c1a-5b7d-4e3f-9a61-2d4c8b0e7f13", "0f8e2c1a-5b7d-4e3f-9a61-2d4c8b0e7f13\n",
                                   "0f8e2c1a5b7d4e3f9a612d4c8b0e7f13", "{0f8e2c1a-5b7d-4e3f-9a61-2d4c8b0e7f13}",
                                   "urn:uuid:0f8e2c1a-5b7d-4e3f-9a61-2d4c8b0e7f13", "another-log", "0f8e2c1a-5b7d"])
def test_cli_a_log_id_that_is_not_one_is_bad_usage_not_a_broken_log(log_dir, capsys, given):
    with pytest.raises(SystemExit) as exited:
        main(["evidence", "verify", str(log_dir), "--log-id", given])
    assert exited.value.code == 2 and "is not a log id" in capsys.readouterr().err


def test_cli_log_id_in_upper_case_is_the_same_id(tmp_path):
    key = str(tmp_path / "ev-dev-key.pub.pem")
    log = build_log(tmp_path / "ev", clean=True)
    log_id = read(log)[0]["log_id"]
    assert main(["evidence", "verify", str(log), "--key", key, "--log-id", log_id.upper()]) == 0


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


def test_a_directory_without_log_files_is_broken_and_names_a_log_below_it(log_dir, tmp_path, capsys):
    """A log whose files were removed stays BROKEN; a reader who gave the parent (var/ for var/evidence)
    is told where the log is; a subdirectory without log files names nothing."""
    parent = log_dir.parent
    (parent / "other").mkdir()
    assert main(["evidence", "verify", str(parent)]) == 1
    out = capsys.readouterr().out
    assert f"no evidence files (evidence-NNNNNN.jsonl) here; an evidence log is in {log_dir}: give that" in out
    emptied = tmp_path / "emptied"
    (emptied / "nothing-here").mkdir(parents=True)
    assert main(["evidence", "verify", str(emptied)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("no evidence files (evidence-NNNNNN.jsonl) here")


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
    done = verify_cli(log_dir)
    assert done.returncode == 0, done.stderr
    assert "CONSISTENT: internal consistency only" in done.stdout and "INTACT" not in done.stdout


# -- a hostile writer ------------------------------------------------------------------------------------
# Someone with write access to the log directory (not the signing key) can put any value in any field and
# re-hash the record. `verify_dir` promises never to raise on a bad log and to call every such log BROKEN:
# a checkpoint whose signer certificates were not strings (`certificates: [1]`) made `verify --bundle`
# crash with AttributeError, and a mirror line whose seq was a string (`{"seq": "9", ...}`) made every
# `verify` crash with TypeError. And the last record, when it is a checkpoint, is held by no later
# prev_hash while its signature covers only its payload: its logged_at, sidecar or signer could be
# changed, or members added (an `outcome` beside the payload), and `verify --bundle` still said INTACT.

ODD = [None, True, 0, -1, 2**60, 1.5, "", "x", [], [1], ["x"], {}, {"a": 1}]


def _write(directory: Path, records: list[dict]) -> None:
    (directory / "evidence-000001.jsonl").write_bytes(b"".join(seal(copy.deepcopy(r)) for r in records))


def _paths(value, prefix=()):
    """Every (path to a member) inside a record, nested objects and arrays included."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield prefix + (key,)
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield prefix + (i,)
            yield from _paths(item, prefix + (i,))


def _get(record: dict, path: tuple):
    node = record
    for part in path:
        node = node[part]
    return node


def _set(record: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(record)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


@pytest.fixture(scope="module")
def signed_log(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-verify")
    ca_key, ca_cert, bundle = _ca(base, "td")
    directory = write_log(base / "ev", _svid(ca_key, ca_cert, SIDECAR_ID), records=12)
    return directory, load_bundle(bundle)


def _mutations(records: list[dict]):
    """(seq, path, value) for every member of the startup record, one decision and every checkpoint."""
    chosen = [r for r in records if r["kind"] in ("startup", "checkpoint")] + [records[1]]
    for record in chosen:
        members = {k: v for k, v in record.items() if k != "hash"}
        for path in _paths(members):
            for value in ODD:
                yield record["seq"], path, value
        # members added, at the top and inside every object (an "outcome" beside the signed payload)
        for path in [()] + [p for p in _paths(members) if isinstance(_get(record, p), dict)]:
            for name in ("aa", "outcome", "zz"):
                yield record["seq"], path + (name,), "allow"


def test_any_value_in_any_field_is_a_verdict_never_a_crash(signed_log, tmp_path):
    original, bundle = signed_log
    records = read(original)
    directory = tmp_path / "ev"
    directory.mkdir()
    crashes, not_broken, tried = [], [], 0
    for seq, path, value in _mutations(records):
        changed = [(_set(r, path, value) if r["seq"] == seq else r) for r in records]
        if changed == records:
            continue
        try:
            _write(directory, changed)
        except ValueError:  # no canonical form: the writer of a line could not produce it either
            continue
        tried += 1
        for anchors in ({}, {"bundle": bundle, "signer_ids": [SIDECAR_ID]}):
            try:
                report = verify_dir(directory, mirror=tmp_path / "no-mirror", **anchors)
            except Exception as exc:  # noqa: BLE001 - the finding
                crashes.append(f"seq {seq} {list(path)} = {value!r} ({'bundle' if anchors else 'no anchors'}): "
                               f"{type(exc).__name__}: {exc}")
                continue
            if report.verdict != BROKEN:
                not_broken.append(f"seq {seq} {list(path)} = {value!r}: {report.verdict}")
    assert tried > 500
    assert crashes == [], "\n".join(crashes)
    assert not_broken == [], "\n".join(not_broken)


@pytest.mark.parametrize("line", [
    {"seq": "99", "hash": "sha256:x"},
    {"seq": None, "hash": "sha256:x"},
    {"seq": [99], "hash": "sha256:x"},
    {"seq": True, "hash": "sha256:x"},
    {"seq": 3.5, "hash": "sha256:x"},
    {"seq": {"n": 1}, "hash": "sha256:x"},
    ["seq", 99],
    "99",
])
def test_a_mirror_line_of_any_shape_is_a_verdict_never_a_crash(signed_log, tmp_path, capsys, line):
    original, bundle = signed_log
    directory = tmp_path / "ev"
    directory.mkdir()
    records = read(original)
    _write(directory, records)
    mirror = tmp_path / "mirror.jsonl"
    good = default_mirror_path(original).read_bytes()
    mirror.write_bytes(json.dumps(line).encode() + b"\n" + good)
    # a line that is no copy of a checkpoint is named (like an unreadable one); the others still count
    report = verify_dir(directory, mirror=mirror, bundle=bundle, signer_ids=[SIDECAR_ID])
    assert report.verdict == "intact", report.problems
    assert any(w.startswith("mirror.jsonl:1: unreadable") for w in report.warnings), report.warnings
    assert main(["evidence", "verify", str(directory), "--mirror", str(mirror)]) == 0
    assert "mirror.jsonl:1: unreadable" in capsys.readouterr().out
    # and a log cut before the last mirrored checkpoint is still caught behind such a line
    last_checkpoint = max(r["seq"] for r in records if r["kind"] == "checkpoint")
    _write(directory, [r for r in records if r["seq"] < last_checkpoint])
    report = verify_dir(directory, mirror=mirror, bundle=bundle, signer_ids=[SIDECAR_ID])
    assert report.verdict == BROKEN and "log truncated" in report.problems[0].message, report.problems
    assert main(["evidence", "verify", str(directory), "--mirror", str(mirror)]) == 1


def test_the_untouched_copies_still_verify(signed_log, tmp_path):
    original, bundle = signed_log
    directory = tmp_path / "ev"
    directory.mkdir()
    _write(directory, read(original))
    mirror = tmp_path / "mirror.jsonl"
    mirror.write_bytes(default_mirror_path(original).read_bytes())
    report = verify_dir(directory, mirror=mirror, bundle=bundle, signer_ids=[SIDECAR_ID])
    assert report.verdict == "intact", report.problems


# -- what sits where a log file or the mirror belongs -------------------------------------------------


@pytest.mark.parametrize("shape", ["fifo", "directory"])
def test_a_non_file_where_a_log_file_belongs_is_a_verdict(signed_log, tmp_path, shape):
    """A FIFO named evidence-000002.jsonl made `verify` block forever (no verdict, ever); a directory
    made it raise IsADirectoryError."""
    original, _ = signed_log
    directory = tmp_path / "ev"
    directory.mkdir()
    _write(directory, read(original))
    planted = directory / "evidence-000002.jsonl"
    os.mkfifo(planted) if shape == "fifo" else planted.mkdir()
    report = verify_dir(directory)
    assert report.verdict == BROKEN
    assert any(p.where == planted.name and "not a regular file" in p.message for p in report.problems), report.problems
    done = verify_cli(directory)
    assert done.returncode == 1 and "BROKEN" in done.stdout and "not a regular file" in done.stdout, done.stderr


@pytest.mark.parametrize("shape", ["fifo", "directory"])
def test_a_non_file_where_the_mirror_or_the_ship_state_belongs_is_a_verdict(signed_log, tmp_path, shape):
    from sidecar.evidence.records import SHIP_STATE_NAME

    original, bundle = signed_log
    directory = tmp_path / "ev"
    directory.mkdir()
    _write(directory, read(original))
    mirror = tmp_path / "mirror.jsonl"
    for planted in (mirror, directory / SHIP_STATE_NAME):
        os.mkfifo(planted) if shape == "fifo" else planted.mkdir()
    report = verify_dir(directory, mirror=mirror, bundle=bundle, signer_ids=[SIDECAR_ID])
    assert report.verdict == BROKEN and "the checkpoint mirror is not a regular file" in report.problems[0].message
    assert any(w.startswith(f"{SHIP_STATE_NAME}: unreadable") for w in report.warnings), report.warnings
    done = verify_cli(directory, "--mirror", str(mirror))
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stderr
