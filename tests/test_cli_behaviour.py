"""The command line as a script sees it: exit codes, refused abbreviations, usage lines,
quiet broken pipes, `evidence show` on the wrong directory, the dev config's spans.

Every case runs the real `agent-sidecar` (python -m sidecar) as a subprocess;
the sidecars it talks to are real, started in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import json
import os
import re
import socket
import sys

import pytest

from sidecar.cli import BROKEN_PIPE_EXIT, CHECK_EXIT, Parser, build_parser
from sidecar.client import AsyncClient
from sidecar.config import ConfigError, load_config
from tests.conftest import REGO, REPO
from tests.doubles.escalation import ALICE, make_config

CLI = [sys.executable, "-m", "sidecar"]
AGENT = "spiffe://dev.local/agent"


async def run(*args: str, stdout: int | None = asyncio.subprocess.PIPE) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, cwd=REPO, stdout=stdout, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, (out or b"").decode(), err.decode()


async def run_into_closed_pipe(*args: str) -> tuple[int, str]:
    """Run with stdout a real pipe whose reader has already gone (what `| head` leaves behind)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        code, _, err = await run(*args, stdout=write_end)
    finally:
        os.close(write_end)
    return code, err


@pytest.fixture
def patient_config(tmp_path) -> str:
    """A loaded test machine must not turn the decision under test into policy_timeout."""
    path = tmp_path / "patient.yaml"
    path.write_text(f"policy:\n  dir: {REGO}\n  timeout_ms: 5000\nidentity:\n  sources: [dev]\n")  # a dev config
    return str(path)


@pytest.mark.parametrize(
    "tool, arguments, outcome",
    [
        ("read_file", '{"path": "/workspace/notes.txt"}', "allow"),
        ("read_file", '{"path": "/etc/shadow"}', "deny"),
        ("send_email", '{"to": ["cfo@example.com"], "subject": "Q3", "body": "hi"}', "escalate"),
    ],
)
async def test_check_exit_status_names_the_outcome(tool, arguments, outcome, patient_config):
    code, out, err = await run("check", "--config", patient_config, "--subject", AGENT, "--tool", tool,
                               "--args", arguments, "--compact")
    assert f'"outcome": "{outcome}"' in out, err
    assert code == CHECK_EXIT[outcome]
    assert sorted(CHECK_EXIT.values()) == [0, 3, 4]  # distinct, and none is 1 (error) or 2 (usage)


def test_every_parser_refuses_abbreviations():
    """Structural: every parser in the tree, subcommands' included, is a Parser without abbreviations."""
    seen = []

    def walk(parser: argparse.ArgumentParser) -> None:
        seen.append(parser.prog)
        assert isinstance(parser, Parser) and parser.allow_abbrev is False, parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    walk(build_parser())
    for command in ("check", "evidence show", "approvals list", "approvals approve", "console", "policy test"):
        assert f"agent-sidecar {command}" in seen


@pytest.mark.parametrize(
    "args, command, unknown",
    [
        (["check", "--subject", AGENT, "--tool", "read_file", "--arg", "{}"], "check", "--arg"),
        (["check", "--subj", AGENT, "--subject", AGENT, "--tool", "read_file"], "check", "--subj"),
        (["check", "--subject", AGENT, "--tool", "read_file", "--arguments", "{}"], "check", "--arguments"),
        (["evidence", "show", "var/evidence", "--subj", AGENT], "evidence show", "--subj"),
        (["approvals", "list", "--stat", "all"], "approvals list", "--stat"),
        (["policy", "test", "--verb"], "policy test", "--verb"),
        (["serve", "--conf", "x.yaml"], "serve", "--conf"),
    ],
)
async def test_an_unknown_or_abbreviated_option_is_refused_with_the_subcommands_usage(args, command, unknown):
    code, out, err = await run(*args)
    assert code == 2 and out == ""
    assert err.startswith(f"usage: agent-sidecar {command} "), err
    assert f"agent-sidecar {command}: error: unrecognized arguments: {unknown}" in err


@pytest.mark.parametrize(
    "args, command",
    [
        (["serve", "--config", "examples/dev.yaml", "--log-level", "DEBUG"], "serve"),
        (["evidence", "verify", "var/evidence", "--log-level=debug"], "evidence verify"),
    ],
)
async def test_log_level_after_the_command_says_where_it_goes(args, command):
    code, _, err = await run(*args)
    assert code == 2
    assert f"(--log-level goes before the command: agent-sidecar --log-level LEVEL {command} ...)" in err


async def test_another_unknown_option_gets_no_log_level_hint():
    code, _, err = await run("serve", "--log", "DEBUG")
    assert code == 2 and "unrecognized arguments: --log DEBUG" in err and "goes before" not in err


async def test_the_console_on_a_port_in_use_is_refused_naming_the_key():
    """Like the sidecar's listeners: a taken port is exit 2 naming console.listen, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code, out, err = await run("console", "--config", "examples/dev.yaml", "--listen", address)
    assert code == 2 and out == "", err
    assert err.startswith(f"agent-sidecar: console.listen: cannot listen on {address} (Address already in use)")
    assert "Traceback" not in err


async def test_a_top_level_abbreviation_is_refused():
    code, _, err = await run("--log-lev", "DEBUG", "policy", "test")
    assert code == 2 and err.startswith("usage: agent-sidecar [-h]")


@pytest.fixture
async def served(running_sidecar, sidecar_config, tmp_path):
    """(address, evidence dir) of a sidecar with decisions, escalations and an evidence log to read."""
    config = sidecar_config(**{"policy.timeout_ms": 5000})
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as agent:
        for i in range(3):
            await agent.authorize("send_email", {"to": [f"p{i}@example.com"], "subject": "Q3", "body": "hi"})
            await agent.authorize("read_file", {"path": f"/workspace/{i}.txt"})
    return sidecar.addresses[0], config.evidence.dir


async def test_broken_pipes_are_quiet(served):
    address, evidence_dir = served
    for args in (
        ["approvals", "list", "--address", address],
        ["approvals", "list", "--address", address, "--json"],
        ["evidence", "show", evidence_dir],
        ["evidence", "show", evidence_dir, "--json"],
        ["check", "--subject", AGENT, "--tool", "send_email", "--args", '{"to": ["a@example.com"]}'],
    ):
        code, err = await run_into_closed_pipe(*args)
        assert code == BROKEN_PIPE_EXIT, (args, err)
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


async def test_a_real_pipe_into_head_prints_no_error(served):
    """The shell pipeline itself, with a listing longer than the pipe's buffer."""
    address, evidence_dir = served
    async with AsyncClient(address) as agent:
        for i in range(300):
            await agent.authorize("read_file", {"path": f"/workspace/{i}.txt"})
    command = f"{' '.join(CLI)} evidence show {evidence_dir} --json | head -n 1"
    process = await asyncio.create_subprocess_shell(
        command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert len(out.decode().splitlines()) == 1
    assert err.decode() == ""


async def test_evidence_show_refuses_a_directory_without_a_log(served, tmp_path):
    _, evidence_dir = served
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    for where, message in (
        (tmp_path / "empty", "no evidence log here"),
        (tmp_path / "missing", "no such directory"),
        (tmp_path / "a-file", "not a directory"),
    ):
        code, out, err = await run("evidence", "show", str(where))
        assert code == 2 and out == "", (where, out)
        assert message in err and str(where) in err
    # The parent given for evidence.dir (var/ for var/evidence): show and replay name where the log is, as verify does.
    parent = os.path.dirname(evidence_dir)
    hint = f"an evidence log is in {evidence_dir}: give that directory"
    code, out, err = await run("evidence", "show", parent)
    assert (code, out) == (2, "") and err.rstrip().endswith(hint), err
    code, out, err = await run("policy", "replay", "--evidence", parent, "--policy", str(REGO))
    assert (code, out) == (3, "") and err.rstrip().endswith(hint), err  # 3: nothing to replay, as documented
    code, out, err = await run("evidence", "verify", parent)
    assert code == 1 and out.rstrip().endswith(hint), out
    code, out, err = await run("evidence", "show", evidence_dir, "--tool", "send_email", "--kind", "decision", "--json")
    assert code == 0 and len(out.splitlines()) == 3, err
    code, out, _ = await run("evidence", "show", evidence_dir, "--tool", "no_such_tool")
    assert code == 0 and len(out.splitlines()) == 1  # the header: a log with no match is not an error


async def test_a_wrong_path_or_value_is_bad_usage_never_a_finding(tmp_path):
    """Exit 1 (BROKEN, a failed test) and 3 (deny) are findings a script acts on: a typo must not look like one."""
    (tmp_path / "a-file").write_text("x")
    missing, a_file, here = str(tmp_path / "missing"), str(tmp_path / "a-file"), str(tmp_path)
    for args, message in (
        (["evidence", "verify", missing], f"{missing}: no such directory"),
        (["evidence", "verify", a_file], f"{a_file}: not a directory"),
        (["evidence", "show", missing], f"{missing}: no such directory"),
        (["evidence", "verify", here, "--key", missing], f"--key: {missing}: No such file or directory"),
        (["evidence", "verify", here, "--key", a_file], f"--key: {a_file}: no PEM public key, private key or certificate"),
        (["evidence", "verify", here, "--bundle", missing], f"--bundle: {missing}: No such file or directory"),
        (["evidence", "verify", here, "--bundle", here], f"--bundle: {here}: Is a directory"),
        (["evidence", "verify", here, "--bundle", a_file], f"--bundle: {a_file}: no PEM certificate found"),
        (["policy", "test", missing], f"{missing}: no such directory"),
        (["policy", "test", a_file], f"{a_file}: not a directory"),
        (["policy", "replay", "--evidence", missing, "--policy", str(REGO)], f"--evidence: {missing}: no such directory"),
        (["policy", "replay", "--evidence", here, "--policy", a_file], f"--policy: {a_file}: not a directory"),
        (["check", "--subject", AGENT, "--tool", "read_file", "--args", "[1]"], "--args: must be a JSON object"),
        (["check", "--subject", AGENT, "--tool", "read_file", "--signals", '"high"'], "--signals: must be a JSON object"),
    ):
        code, out, err = await run(*args)
        assert (code, out) == (2, ""), (args, code, out, err)
        assert err.startswith("agent-sidecar: ") and err.count("\n") == 1 and message in err, (args, err)
    for args, message in (  # refused by the parser: its usage line, then the option and why
        (["evidence", "show", here, "--limit", "-3"], "argument --limit: must be 0 or more, not -3"),
        (["approvals", "list", "--limit", "many"], "argument --limit: not a whole number: 'many'"),
        (["approvals", "list", "--timeout", "0"], "argument --timeout: must be a number of seconds above 0, not 0"),
        (["check", "--subject", AGENT, "--tool", ""], "argument --tool: must not be empty"),
    ):
        code, out, err = await run(*args)
        assert (code, out) == (2, ""), (args, code, out, err)
        assert err.startswith("usage: agent-sidecar ") and err.splitlines()[-1].endswith(message), (args, err)


async def test_check_with_an_unreachable_opa_is_no_deny(tmp_path):
    """The fail-closed deny is printed (it is what the server would answer), but exit 2: nothing was decided."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "external.yaml"
    config.write_text(f"identity: {{sources: [dev]}}\npolicy: {{dir: {REGO}, opa: {{url: 'http://127.0.0.1:{port}'}}}}\n")
    code, out, err = await run("check", "--config", str(config), "--subject", AGENT, "--tool", "read_file",
                               "--args", '{"path": "/workspace/a.txt"}', "--compact")
    assert code == 2, (out, err)
    assert json.loads(out)["reasons"][0].startswith(f"policy_unavailable: OPA at http://127.0.0.1:{port}")
    assert f"agent-sidecar: the policy could not decide: policy_unavailable: OPA at http://127.0.0.1:{port}" in err


async def test_a_misspelt_choice_is_refused_not_read_as_no_match(running_sidecar, tmp_path):
    """`--kind decisions` printed an empty table (exit 0); `--log-level bogus` logged at INFO; `--outcome`
    could not pick an escalation's end, which the records hold."""
    sidecar = await running_sidecar(make_config(tmp_path))
    address, evidence_dir = sidecar.addresses[0], str(tmp_path / "evidence")
    async with AsyncClient(address) as agent:
        email = await agent.authorize("send_email", {"to": "cfo@example.com", "body": "hi"})
        repo = await agent.authorize("delete_repo", {"repo": "acme/old"})
    for verb, escalation in (("approve", email), ("deny", repo)):
        code, _, err = await run("approvals", verb, escalation.escalation_id, "--address", address, "--approver", ALICE)
        assert code == 0, err
    for outcome, kind, escalation in (("approved", "approval", email), ("denied", "human_denial", repo)):
        code, out, err = await run("evidence", "show", evidence_dir, "--outcome", outcome, "--json")
        assert code == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        assert [(r["kind"], r["escalation_id"]) for r in records] == [(kind, escalation.escalation_id)]
    for args, wrong, valid in (
        (["evidence", "show", evidence_dir, "--kind", "decisions"], "'decisions'", "decision"),
        (["evidence", "show", evidence_dir, "--outcome", "allowed"], "'allowed'", "approved"),
        (["--log-level", "bogus", "evidence", "show", evidence_dir], "'BOGUS'", "WARNING"),
    ):
        code, out, err = await run(*args)
        assert (code, out) == (2, ""), (args, err)
        assert "invalid choice: " + wrong in err and valid in err, err
    code, out, err = await run("--log-level", "debug", "evidence", "show", evidence_dir, "--kind", "startup")
    assert code == 0 and len(out.splitlines()) == 2, err  # the header and the one start


async def test_the_dev_config_exports_no_spans(running_sidecar, tmp_path, caplog):
    config = load_config(REPO / "examples" / "dev.yaml", {
        "listen.tcp": "127.0.0.1:0", "listen.unix": str(tmp_path / "s.sock"), "metrics.listen": "",
        "evidence.dir": str(tmp_path / "evidence"), "policy.dir": str(REGO), "policy.reload": False,
    })
    assert config.telemetry.exporter == "none"
    caplog.set_level(logging.WARNING)
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as agent:
        for _ in range(3):
            await agent.authorize("read_file", {"path": "/workspace/a.txt"})
    assert getattr(sidecar.recorder, "shipper", None) is None  # nothing ships spans: nothing can fail to
    assert not [r for r in caplog.records if r.name.startswith(("sidecar.evidence.shipper", "opentelemetry"))]


@pytest.mark.parametrize("key", ["listen.tcp", "metrics.listen", "mcp.listen", "console.listen"])
@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:65536", "localhost", "9464", ":9464",
                                     "[::1:50051", "127.0.0.1:50051x", "127.0.0.1:"])
def test_a_tcp_address_that_is_not_host_port_is_refused_naming_the_key(key, address):
    """Every TCP listener's address, alike: gRPC served listen.tcp 127.0.0.1:99999 on port 34463, and
    metrics.listen with that port ended the start in a traceback (OverflowError, exit 1)."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be host:port \(a port from 0 to 65535"):
        load_config(None, {"identity.sources": ["dev"], key: address})
    for good in ("127.0.0.1:0", "[::1]:65535", "localhost:8080"):
        assert load_config(None, {"identity.sources": ["dev"], key: good})


async def test_serve_refuses_a_port_beyond_65535_before_it_listens(tmp_path):
    config = tmp_path / "dev.yaml"
    config.write_text(f"identity: {{sources: [dev]}}\npolicy: {{dir: {REGO}}}\nevidence: {{dir: {tmp_path / 'ev'}}}\n"
                      "telemetry: {exporter: none}\n")
    for args, key in ((["--listen", "127.0.0.1:99999"], "listen.tcp"), ([], "metrics.listen")):
        if not args:
            config.write_text(config.read_text() + "listen: {tcp: '127.0.0.1:0', unix: ''}\n"
                              "metrics: {listen: '127.0.0.1:99999'}\n")
        code, out, err = await run("serve", "--config", str(config), *args)
        assert (code, out) == (2, ""), (code, out, err)
        assert err == f"agent-sidecar: {key}: must be host:port (a port from 0 to 65535; [v6]:port for IPv6), " \
                      f"not '127.0.0.1:99999'\n"
    assert not (tmp_path / "ev").exists()


def test_every_command_says_what_it_does_and_its_exit_statuses():
    """Each command's own --help (a leaf of the tree: serve, check, policy test, approvals approve, ...) has a
    description naming its exit statuses: a script's author should not have to read the source for them."""
    leaves = []

    def walk(parser: argparse.ArgumentParser) -> None:
        children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not children:
            leaves.append(parser)
        for action in children:
            for child in action.choices.values():
                walk(child)

    walk(build_parser())
    assert len(leaves) >= 12
    missing = [p.prog for p in leaves if not re.search(r"\bexit\b", p.description or "", re.IGNORECASE)]
    assert not missing, missing


async def test_examples_dev_yaml_from_outside_the_checkout_says_where_relative_paths_were_looked_for(tmp_path):
    """docs/configuration.md: relative paths are the working directory's; a reader who ran the example from
    elsewhere is told so, not only that `rego` does not exist. Nothing is left in that directory."""
    for command in (["serve", "--config", str(REPO / "examples" / "dev.yaml")],
                    ["check", "--subject", AGENT, "--tool", "read_file"]):
        process = await asyncio.create_subprocess_exec(*CLI, *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert (process.returncode, out) == (2, b""), err
        assert err.decode().splitlines()[-3:] == [
            "agent-sidecar: the policy in rego cannot be served:",
            "  rego: policy directory does not exist",
            f"  (a relative path in the config is taken from the working directory, {tmp_path}, not from the "
            "config file's; run from the checkout's root or give absolute paths)",
        ], err.decode()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, prog, commands", [
    ([], "agent-sidecar", "serve, check, policy, evidence, approvals, console, rollback"),
    (["policy"], "agent-sidecar policy", "test, replay"),
    (["evidence"], "agent-sidecar evidence", "verify, show"),
    (["approvals"], "agent-sidecar approvals", "list, show, approve, deny"),
])
def test_a_missing_command_names_the_commands_there_are(args, prog, commands, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(args)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"required: {'SUBCOMMAND' if args else 'COMMAND'} (one of {commands}; {prog} --help says what each does)")


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "localhost", "127.0.0.1:5005x", "[::1:50051"])
async def test_a_client_address_that_is_not_a_grpc_target_is_bad_usage(address, tmp_path):
    """gRPC dialled 127.0.0.1:99999 as port 34463: the approvals commands, rollback and the console would reach
    (and hand a token to) whatever listens there. Refused before anything is sent, naming the option."""
    expected = (f"must be host:port (a port from 0 to 65535; [v6]:port for IPv6) or unix:/path, not {address!r}\n")
    for args, option in ((["approvals", "list", "--address", address], "--address (or $AGENT_SIDECAR_ADDRESS)"),
                         (["approvals", "approve", "esc-1", "--address", address],
                          "--address (or $AGENT_SIDECAR_ADDRESS)"),
                         (["rollback", "d-1", "--address", address], "--address"),
                         (["console", "--config", "examples/dev.yaml", "--sidecar", address], "console.sidecar")):
        code, out, err = await run(*args)
        assert (code, out) == (2, ""), (args, err)
        assert err == f"agent-sidecar: {option}: {expected}", (args, err)
    for good in ("127.0.0.1:50051", "[::1]:50051", "unix:/run/agent-sidecar/sidecar.sock", "dns:///localhost:50051"):
        config = load_config(None, {"identity.sources": ["dev"], "console.sidecar": good,
                                    "console.sidecar_allow_plaintext": True})  # dns:/// is off the pod
        config.validate_console()


@pytest.mark.parametrize("key", ["listen.unix", "mcp.unix"])
def test_a_unix_socket_path_too_long_to_bind_is_refused_at_load(key, tmp_path):
    """grpc logged the reason on its own line and the sidecar asked whether another server listened there;
    mcp.unix said `cannot listen on ... (None)`. 107 bytes is the most a path may have."""
    fits, too_long = (str(tmp_path / ("a" * (n - len(str(tmp_path)) - 1))) for n in (107, 108))
    assert len(fits) == 107 and len(too_long) == 108
    load_config(None, {"identity.sources": ["dev"], key: fits})
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .* is 108 bytes; a unix socket's path holds at most 107"):
        load_config(None, {"identity.sources": ["dev"], key: too_long})


async def test_a_listener_address_this_host_does_not_have_is_not_called_in_use(tmp_path):
    """EADDRNOTAVAIL is not another server: the message gives the cause and does not ask about one."""
    config = tmp_path / "dev.yaml"
    config.write_text(f"identity: {{sources: [dev]}}\npolicy: {{dir: {REGO}}}\nevidence: {{dir: {tmp_path / 'ev'}}}\n"
                      "telemetry: {exporter: none}\nlisten: {tcp: '127.0.0.1:0', unix: ''}\n"
                      "metrics: {listen: '192.0.2.1:9464'}\n")  # TEST-NET-1: on no interface here
    code, out, err = await run("serve", "--config", str(config))
    assert (code, out) == (2, "")
    assert err == "agent-sidecar: metrics.listen: cannot listen on 192.0.2.1:9464 (Cannot assign requested address)\n"
