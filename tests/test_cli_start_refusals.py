"""A refused `agent-sidecar serve` leaves nothing behind.

A config problem the start can find without starting anything (a file it names that cannot
be read) is found first: no OPA, no `startup` record or checkpoint, no generated dev key, no
span export. A refusal found later (the evidence directory locked by another writer) still
removes everything the start made, the managed OPA's `sidecar-opa-<pid>-*` directory included.
Each case runs the real CLI, with its own TMPDIR so what it leaves there can be seen.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

import pytest
import yaml

from tests.conftest import REGO, REPO


def settings(tmp_path, **sections) -> dict:
    base = {
        "identity": {"sources": ["dev"]},
        "listen": {"tcp": "127.0.0.1:0", "unix": str(tmp_path / "sidecar.sock")},
        "metrics": {"listen": ""},
        "policy": {"dir": str(REGO), "reload": False},
        "evidence": {"dir": str(tmp_path / "evidence")},
        "telemetry": {"exporter": "otlp", "endpoint": "http://127.0.0.1:9"},  # a span export would be tried
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


async def serve(tmp_path, config: dict) -> tuple[int, str, str]:
    """`agent-sidecar serve` with a TMPDIR of its own; (exit status, stderr, what is left in that TMPDIR)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    with tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:  # short: OPA's unix socket goes under it
        code, err = await _run(path, tmpdir)
        return code, err, sorted(os.listdir(tmpdir))


async def _run(path, tmpdir: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--config", str(path), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, err.decode()


@pytest.mark.parametrize("section, values, message", [
    ("escalation", {"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret_file": "{tmp}/missing"},
     "escalation.webhook_secret_file: cannot read {tmp}/missing"),
    ("escalation", {"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret_file": "{tmp}/short"},
     "escalation.webhook_secret_file: {tmp}/short holds 3 bytes"),
    ("evidence", {"signing_key": "{tmp}/missing"}, "evidence.signing_key: cannot read signing key {tmp}/missing"),
    ("evidence", {"signing_key": "{tmp}/short"}, "evidence.signing_key: {tmp}/short: not an unencrypted PEM"),
    ("policy", {"shadow_dir": "{tmp}/missing"}, "policy.shadow_dir: {tmp}/missing: no such directory"),
])
async def test_a_file_the_config_names_is_checked_before_anything_starts(tmp_path, section, values, message):
    (tmp_path / "short").write_text("abc")
    values = {key: value.replace("{tmp}", str(tmp_path)) for key, value in values.items()}
    code, err, left = await serve(tmp_path, settings(tmp_path, **{section: values}))
    assert code == 2, err
    assert f"agent-sidecar: {message.replace('{tmp}', str(tmp_path))}" in err
    assert "OPA" not in err and "Traceback" not in err, err  # refused before the policy stage
    assert not (tmp_path / "evidence").exists()  # no startup record, no checkpoint
    assert not (tmp_path / "evidence-dev-key.pem").exists() and not (tmp_path / "evidence-checkpoints.jsonl").exists()
    assert left == []


async def test_a_start_refused_for_a_locked_evidence_directory_removes_its_opa_directory(tmp_path, running_sidecar,
                                                                                      sidecar_config):
    holder = await running_sidecar(sidecar_config(**{"evidence.dir": str(tmp_path / "evidence")}))
    assert holder.recorder is not None
    config = settings(tmp_path, listen={"unix": str(tmp_path / "second.sock")}, telemetry={"exporter": "none"})
    code, err, left = await serve(tmp_path, config)
    assert code == 2, err
    assert "is in use by another evidence writer" in err
    assert "serving revision" in err  # the managed OPA had started, in a directory under TMPDIR
    assert left == []
