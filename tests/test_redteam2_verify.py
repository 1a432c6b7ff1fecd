"""Red team, round 2: `evidence verify` against a log whose writer is hostile.

Someone with write access to the log directory (not the signing key) can put any value in any
field and re-hash the record. `verify_dir` promises never to raise on a bad log and to call every
such log BROKEN; before this, a checkpoint whose signer certificates were not strings
(`certificates: [1]`) made `verify --bundle` crash with AttributeError, and a mirror line whose seq
was a string (`{"seq": "9", ...}`) made every `verify` crash with TypeError, so `agent-sidecar
evidence verify` printed a traceback instead of a verdict and the report named nothing.

And the last record, when it is a checkpoint, is held by no later prev_hash while its signature
covers only its payload: its logged_at, sidecar, signer (source, key ids, public key, certificates)
could be changed, or members added (an `outcome` beside the payload), and `verify --bundle` still
said INTACT (with no mirror to compare against).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.evidence.records import default_mirror_path, seal
from sidecar.evidence.signing import load_bundle
from sidecar.evidence.verify import BROKEN, verify_dir
from tests.test_evidence_trust import SIDECAR_ID, _ca, _svid, write_log

ODD = [None, True, 0, -1, 2**60, 1.5, "", "x", [], [1], ["x"], {}, {"a": 1}]


def _records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "evidence-000001.jsonl").read_bytes().splitlines()]


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
    base = tmp_path_factory.mktemp("rt2-verify")
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
    records = _records(original)
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
    records = _records(original)
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
    _write(directory, _records(original))
    mirror = tmp_path / "mirror.jsonl"
    mirror.write_bytes(default_mirror_path(original).read_bytes())
    report = verify_dir(directory, mirror=mirror, bundle=bundle, signer_ids=[SIDECAR_ID])
    assert report.verdict == "intact", report.problems


# -- what sits where a log file or the mirror belongs -------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def _verify_cli(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    """`agent-sidecar evidence verify` in its own process: a verify that blocks is killed, not waited on."""
    return subprocess.run([sys.executable, "-m", "sidecar", "evidence", "verify", str(directory), *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("shape", ["fifo", "directory"])
def test_a_non_file_where_a_log_file_belongs_is_a_verdict(signed_log, tmp_path, shape):
    """A FIFO named evidence-000002.jsonl made `verify` block forever (no verdict, ever); a directory
    made it raise IsADirectoryError."""
    original, _ = signed_log
    directory = tmp_path / "ev"
    directory.mkdir()
    _write(directory, _records(original))
    planted = directory / "evidence-000002.jsonl"
    os.mkfifo(planted) if shape == "fifo" else planted.mkdir()
    report = verify_dir(directory)
    assert report.verdict == BROKEN
    assert any(p.where == planted.name and "not a regular file" in p.message for p in report.problems), report.problems
    done = _verify_cli(directory)
    assert done.returncode == 1 and "BROKEN" in done.stdout and "not a regular file" in done.stdout, done.stderr


@pytest.mark.parametrize("shape", ["fifo", "directory"])
def test_a_non_file_where_the_mirror_or_the_ship_state_belongs_is_a_verdict(signed_log, tmp_path, shape):
    from sidecar.evidence.records import SHIP_STATE_NAME

    original, bundle = signed_log
    directory = tmp_path / "ev"
    directory.mkdir()
    _write(directory, _records(original))
    mirror = tmp_path / "mirror.jsonl"
    for planted in (mirror, directory / SHIP_STATE_NAME):
        os.mkfifo(planted) if shape == "fifo" else planted.mkdir()
    report = verify_dir(directory, mirror=mirror, bundle=bundle, signer_ids=[SIDECAR_ID])
    assert report.verdict == BROKEN and "the checkpoint mirror is not a regular file" in report.problems[0].message
    assert any(w.startswith(f"{SHIP_STATE_NAME}: unreadable") for w in report.warnings), report.warnings
    done = _verify_cli(directory, "--mirror", str(mirror))
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stderr
