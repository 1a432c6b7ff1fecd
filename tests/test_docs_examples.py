"""Every shell and Python example in README.md and docs/*.md runs (issue 14 item 5).

Each fenced block whose info string starts with `sh`, `console` or `python`
is extracted and run against a served sidecar: `agent-sidecar serve` with
examples/mcp.yaml (examples/dev.yaml plus the MCP gateway and its two example
MCP servers, so the MCP examples have their gateway), in a temporary copy of
the repository's layout (rego/ and examples/ copied, and candidate/: rego/
with the edits of docs/policy-authoring.md's "A new tool, end to end"; the
package, .venv, tests/, bench/, the Makefile and .tools linked), with the
working directory at its root, as a reader who cloned the repository and ran `make run` would
be. Only the ports (and an MCP unix socket) are its own.

- `sh`: the block runs as one bash script (`set -e`); it must exit 0.
- `console`: each `$ command` (with `\\` continuations) runs in one bash
  session; each must exit 0 (a documented `$ echo $?` shows otherwise), and
  each documented output line that starts with a word label (`state`,
  `evidence:`, `INTACT:`, a table header...) must start an output line of
  the command too. Lines of `…` or `...` stand for anything.
- `python`: the blocks of one file run in order in one namespace (later
  blocks continue earlier ones, as a reader would type them), in a child
  process; top-level `await` is allowed.

What the examples take from their context is supplied, and only that:
addresses the docs write for the pod (`unix:/run/agent-sidecar/sidecar.sock`,
`/run/sidecar/mcp.sock`) or the default ports (`127.0.0.1:50051`, the MCP
gateway's `127.0.0.1:8765`) are the served sidecar's; an
escalation id shown elided (`esc-…`, `esc-...`) or as a sample is a fresh
pending escalation of the documented kind (one whose task id hides control
characters where the documented output flags `[!]`); a person stands by and
approves, as `email:alice@example.org`, every escalation an agent is waiting
on (so an example that "waits for a person" returns); the Python examples
that fetch SVIDs (py-spiffe, `$SPIFFE_ENDPOINT_SOCKET`) get a real SPIRE
Workload API (tests/infra/spire.py, trust domain example.org) that gives
their process `spiffe://example.org/ns/agents/sa/research`; the served
sidecar exports its spans to a real Jaeger (tests/infra/jaeger.py), whose
query service stands for the one the docs reach at `127.0.0.1:16686`, and a
sample trace id in a query URL is the trace of a call the reader made.

Not run: a block whose info string says `no-run: <reason>`, only for
commands that start long-lived or long-running processes (`make run`, the
whole test suite, benchmarks and soaks) or need a cluster (`kubectl`);
`NO_RUN_ALLOWED` lists the few there may be.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sidecar import reasons
from sidecar.client import Client
from sidecar.escalation.client import ApprovalsClient
from tests.conftest import REPO
from tests.infra.jaeger import Jaeger, wait_until
from tests.infra.spire import SpireServer, SpireUnavailable, own_process_selectors
from tests.test_policy_docs import apply_new_tool_example

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_KINDS = ("sh", "console", "python")
NO_RUN_ALLOWED = 7  # keep it short: see the module docstring
APPROVER = "email:alice@example.org"
POD_SOCKET = "unix:/run/agent-sidecar/sidecar.sock"
DEFAULT_TCP = "127.0.0.1:50051"
POD_MCP_SOCKET = "/run/sidecar/mcp.sock"
DEFAULT_MCP = "127.0.0.1:8765"
DEFAULT_JAEGER = "http://127.0.0.1:16686"
SAMPLE_TRACE = re.compile(r"(?<=/traces/)[0-9a-f]{32}")
SERVED_CONFIG = "examples/mcp.yaml"
# A fenced code block (CommonMark 4.5): the opening fence may be indented (inside a list item),
# the closing fence has the same indentation, and a backtick fence's info string has no backticks.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
ELIDED_ID = re.compile(r"esc-(?:[0-9a-f]{32}|…|\.\.\.)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    kind: str
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def no_run(self) -> str | None:
        """The reason given after `no-run:`, "" if none was given, None if the block runs."""
        match = re.search(r"\bno-run\b:?\s*(.*)", self.info)
        return None if match is None else match.group(1).strip()


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            info = match.group("info").strip()
            kind = info.split()[0] if info else ""
            if kind in RUN_KINDS:
                body = textwrap.dedent(match.group("body")) if match.group("indent") else match.group("body")
                found.append(Block(path, text[: match.start()].count("\n") + 1, kind, info, body))
    return found


ALL = blocks()
RUN = [b for b in ALL if b.no_run is None]


def test_the_blocks_not_run_are_few_and_say_why():
    skipped = [b for b in ALL if b.no_run is not None]
    for block in skipped:
        assert block.no_run, f"{block.where}: `no-run` needs a reason next to it"
        assert re.search(r"long-lived|long-running|whole test suite|kubectl|cluster|benchmark|soak", block.no_run), (
            f"{block.where}: only long-lived or long-running processes and cluster commands are not run ({block.no_run})")
    assert len(skipped) <= NO_RUN_ALLOWED, [b.where for b in skipped]
    assert len(RUN) >= 15, "the extraction found the examples"


# --- the served sidecar ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    root: Path
    tcp: str
    unix: str
    mcp: str
    mcp_unix: str
    jaeger: str
    trace_id: str
    env: dict[str, str]
    process: subprocess.Popen
    made: int = 0

    def escalation(self, hostile: bool = False) -> str:
        """A fresh pending escalation: the send_email call docs/escalation.md shows (a new body each time:
        the sidecar answers a repeated pending call with its existing escalation)."""
        task = "t-1\x1b[1A\r\x1b[2Ktool         create_ticket" if hostile else "t-1"
        self.made += 1
        with Client(self.unix) as client:
            result = client.authorize(
                "send_email",
                {"to": ["cfo@example.com"], "subject": "Q3 numbers", "body": f"See attached ({self.made}).",
                 "api_token": "s3cret-token"},
                task_id=task, intent="Send the Q3 numbers to the CFO",
                signals={"model": "claude-example", "risk_score": 0.82},
            )
        assert result.outcome == "escalate" and result.escalation_id, result
        return result.escalation_id


def layout(root: Path, otlp_endpoint: str) -> None:
    """The repository as a reader has it: policy and examples copied (they may be written), the rest linked."""
    for name in ("rego", "examples"):
        shutil.copytree(REPO / name, root / name)
    # The reader's changed copy of rego/ that docs/policy-authoring.md's commands work on ("A new tool, end to
    # end": cp -r rego candidate, then its edits).
    apply_new_tool_example(shutil.copytree(REPO / "rego", root / "candidate"))
    for name in ("sidecar", "tests", "bench", "protos", "tools", "Makefile", "pyproject.toml", ".venv", ".tools", "deploy"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    tcp = f"127.0.0.1:{free_port()}"
    for name in ("dev.yaml", "mcp.yaml"):
        config = yaml.safe_load((root / "examples" / name).read_text())
        # Ports of its own on a shared machine; everything else as shipped.
        config["listen"]["tcp"] = tcp
        if "metrics" in config:
            config["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
        if "console" in config:
            config["console"]["listen"] = f"127.0.0.1:{free_port()}"
        if config.get("telemetry", {}).get("exporter") == "otlp":
            config["telemetry"]["endpoint"] = otlp_endpoint
        if "mcp" in config:
            config["mcp"]["listen"] = f"127.0.0.1:{free_port()}"
            config["mcp"]["unix"] = str(root / "var" / "run" / "mcp.sock")
        # The evidence examples show a log every record of which a checkpoint covers, as after a clean
        # shutdown; a checkpoint after each record gives the same while the sidecar serves.
        config.setdefault("evidence", {})["checkpoint_every"] = 1
        (root / "examples" / name).write_text(yaml.safe_dump(config, sort_keys=False))


class Approver(threading.Thread):
    """A person at the console: approves every escalation an agent is waiting on."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address = address
        self.stopping = threading.Event()
        self.approved: list[str] = []

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with ApprovalsClient(self.address) as approvals:
            while not self.stopping.is_set():
                try:
                    for escalation in await approvals.list(state="pending"):
                        if escalation["agent_waiting"]:
                            await approvals.approve(escalation["escalation_id"], approver=APPROVER,
                                                    note="checked (tests/test_docs_examples.py)")
                            self.approved.append(escalation["escalation_id"])
                except Exception:  # the sidecar is starting or stopping; try again
                    pass
                await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def served():
    root = Path(tempfile.mkdtemp(prefix="docs-", dir="/tmp"))  # short: the unix socket path lives here
    jaeger = Jaeger(root / "jaeger").start()
    layout(root, jaeger.otlp_grpc_endpoint)
    config = yaml.safe_load((root / SERVED_CONFIG).read_text())
    env = {
        **os.environ,
        "PATH": f"{root / '.venv' / 'bin'}:{root / '.tools' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "AGENT_SIDECAR_ADDRESS": config["listen"]["tcp"],
        "PYTHONPATH": str(root),
    }
    env.pop("SPIFFE_ENDPOINT_SOCKET", None)
    log = (root / "serve.log").open("wb")
    process = subprocess.Popen([str(root / ".venv" / "bin" / "agent-sidecar"), "serve", "--config", SERVED_CONFIG],
                               cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    socket_path = root / config["listen"]["unix"]
    deadline = time.monotonic() + 120
    # Its banner: every stage up, the MCP gateway serving. (The listeners exist sooner: they are bound first.)
    while f"agent-sidecar {process.pid} serving" not in (root / "serve.log").read_text():
        assert process.poll() is None, (root / "serve.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the sidecar did not start"
        time.sleep(0.1)
    # What a reader has after trying the sidecar a little: decisions of each outcome in var/evidence.
    with Client(f"unix:{socket_path}") as client:
        read = client.authorize("read_file", {"path": "/workspace/a.txt"}, task_id="t-1")
        client.authorize("nope", {})
    assert wait_until(lambda: jaeger.trace(read.trace_id), timeout=60), "the call's trace did not reach Jaeger"
    served = Served(root, config["listen"]["tcp"], f"unix:{socket_path}", config["mcp"]["listen"],
                    config["mcp"]["unix"], jaeger.query_url, read.trace_id, env, process)
    approver = Approver(served.tcp)
    approver.start()
    yield served
    approver.stopping.set()
    approver.join(10)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    log.close()
    jaeger.close()
    shutil.rmtree(root, ignore_errors=True)


def in_context(text: str, served: Served, ids: dict[str, str], hostile: bool) -> str:
    text = text.replace(POD_SOCKET, served.unix).replace(DEFAULT_TCP, served.tcp)
    text = text.replace(POD_MCP_SOCKET, served.mcp_unix).replace(DEFAULT_MCP, served.mcp)
    text = SAMPLE_TRACE.sub(served.trace_id, text.replace(DEFAULT_JAEGER, served.jaeger))
    for placeholder in dict.fromkeys(ELIDED_ID.findall(text)):
        if placeholder not in ids:
            ids[placeholder] = served.escalation(hostile=hostile)
        text = text.replace(placeholder, ids[placeholder])
    return text


# --- running the blocks ----------------------------------------------------------------------------------------


def run_sh(block: Block, served: Served) -> None:
    script = in_context(block.text, served, {}, hostile=False)
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=served.root, env=served.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{block.where}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    """[(command, documented output lines)] from `$ ` prompts, `\\` continuations joined."""
    steps: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            command = lines[i][2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            steps.append((command, []))
        elif steps:
            steps[-1][1].append(lines[i])
        i += 1
    return steps


LABEL = re.compile(r"^([A-Za-z][A-Za-z_-]*:?)(?=\s|$)")


def labels(lines: list[str]) -> list[str]:
    """The word labels documented output lines start with (values, ids and sample text are not compared)."""
    found = []
    for line in lines:
        stripped = line.strip()
        if stripped in ("…", "...") or not stripped:
            continue
        match = LABEL.match(line)  # at the line's start: indented lines are values
        if match:
            found.append(match.group(1))
    return found


def run_console(block: Block, served: Served) -> None:
    steps = console_steps(block.text)
    assert steps, f"{block.where}: a console block shows `$ ` commands"
    hostile = "[!]" in block.text
    ids: dict[str, str] = {}
    script = []
    for n, (command, _) in enumerate(steps):
        command = in_context(command, served, ids, hostile)
        script.append(f"echo '@@step {n}'; {command}\n__rc=$?; echo \"@@rc {n} $__rc\"; (exit $__rc)")
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=served.root, env=served.env,
                          capture_output=True, text=True, timeout=300)
    outputs = re.split(r"^@@step \d+\n", done.stdout, flags=re.M)[1:]
    assert len(outputs) == len(steps), f"{block.where}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    for n, ((command, documented), output) in enumerate(zip(steps, outputs)):
        body, _, rc = output.rpartition(f"@@rc {n} ")
        expected_rc = 0
        if n + 1 < len(steps) and steps[n + 1][0].strip() == "echo $?":
            expected_rc = int(steps[n + 1][1][0].strip())
        assert int(rc) == expected_rc, f"{block.where}: `{command}` exited {rc.strip()}\n{body[-3000:]}\n{done.stderr[-3000:]}"
        starts = {m.group(1) for line in body.splitlines() if (m := LABEL.match(line))}
        missing = [label for label in labels(documented) if label not in starts]
        assert not missing, f"{block.where}: `{command}` printed no line starting {missing}:\n{body[-3000:]}"
        # A revision shown is the one the shipped bundle has: it changes with every edit of rego/.
        stale = set(REVISION.findall("\n".join(documented))) - set(REVISION.findall(body))
        assert not stale, f"{block.where}: `{command}` shows policy_revision {stale}, not what it prints:\n{body[-3000:]}"


REVISION = re.compile(r'"policy_revision": "(sha256:[0-9a-f]{16})"')


def test_every_revision_the_docs_quote_for_the_shipped_bundle_is_the_same():
    """README's console example checks its revision against `check`; the others quote the same bundle."""
    quoted = {path: set(REVISION.findall((REPO / path).read_text())) for path in ("README.md", "docs/policy-authoring.md")}
    assert all(quoted.values()), quoted
    assert len(set().union(*quoted.values())) == 1, quoted


PYTHON_RUNNER = r"""
import ast, asyncio, inspect, json, sys
namespace = {"__name__": "__docs__"}
for where, source in json.load(sys.stdin):
    code = compile(source, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        asyncio.run(result)
    print("ran", where, flush=True)
"""


def run_python(blocks_of_file: list[Block], served: Served, env: dict[str, str]) -> None:
    ids: dict[str, str] = {}
    sources = [(b.where, in_context(b.text, served, ids, hostile=False)) for b in blocks_of_file]
    done = subprocess.run([str(served.root / ".venv" / "bin" / "python"), "-c", PYTHON_RUNNER],
                          input=json.dumps(sources), cwd=served.root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{blocks_of_file[0].path.name}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"


SH_AND_CONSOLE = [b for b in RUN if b.kind in ("sh", "console")]
PYTHON_FILES = sorted({b.path for b in RUN if b.kind == "python"})


@pytest.mark.parametrize("block", SH_AND_CONSOLE, ids=lambda b: b.where)
def test_shell_example_runs(block, served):
    (run_sh if block.kind == "sh" else run_console)(block, served)


@pytest.fixture(scope="module")
def workload_api():
    """SPIFFE_ENDPOINT_SOCKET of a real SPIRE agent that gives the examples' Python processes an identity."""
    try:
        server = SpireServer("example.org").start()
    except SpireUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    agent = server.agent("docs")
    agent.register("/ns/agents/sa/research", *own_process_selectors())  # the same interpreter runs the examples
    yield agent.endpoint
    server.close()


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_python_examples_run(path, served, workload_api):
    env = {**served.env, "SPIFFE_ENDPOINT_SOCKET": workload_api}
    run_python([b for b in RUN if b.kind == "python" and b.path == path], served, env)


# --- example records ----------------------------------------------------------------------------------------------

PRODUCERS = [*(REPO / "rego").rglob("*.rego"), *(REPO / "sidecar").rglob("*.py")]


def reason_codes_produced() -> set[str]:
    """Reason codes the policy (`reason(["code: ...`) or the sidecar (sidecar/reasons.py, or `"code: ...`) can write."""
    codes = {value for name, value in vars(reasons).items() if name.isupper() and isinstance(value, str)}
    for path in PRODUCERS:
        if path.name.endswith("_test.rego") or "/tests/" in path.as_posix():
            continue
        codes |= set(re.findall(r"[\"']([a-z][a-z0-9_]*): ", path.read_text()))
    return codes


def test_example_records_show_reasons_the_policy_or_sidecar_produce():
    produced = reason_codes_produced()
    shown = []
    for path in DOCS:
        for listed in re.findall(r'"reasons":\s*\[([^\]]*)\]', path.read_text()):
            for reason in re.findall(r'"((?:[^"\\]|\\.)*)"', listed):
                match = re.match(r"([a-z][a-z0-9_]*): ", reason)
                if match:
                    shown.append((path.name, match.group(1)))
    assert shown, "the docs show example records"
    unknown = [(name, code) for name, code in shown if code not in produced]
    assert not unknown, f"example records show reasons nothing produces: {unknown}"


def test_the_client_signature_in_the_api_docs_is_the_clients():
    """docs/api.md writes out Client's parameters and defaults: a parameter added, renamed or made
    keyword-only in sidecar/client.py shows here, for AsyncClient too (which the docs say takes the same)."""
    import inspect

    from sidecar.client import AsyncClient

    documented = re.search(r"`Client\((target, \*, .*?)\)`", (REPO / "docs" / "api.md").read_text(), re.S)
    assert documented, "docs/api.md writes out Client(...)"
    text = " ".join(documented.group(1).split())
    for cls in (Client, AsyncClient):
        actual = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in inspect.signature(cls).parameters.values()
        )
        actual = actual.replace("target, ", "target, *, ", 1)
        assert sorted(text.split(", ")) == sorted(actual.split(", ")), (cls.__name__, text, actual)
