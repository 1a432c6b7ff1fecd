"""`make demo`: SPIRE, the sidecar and Jaeger running locally, a few calls of each outcome, where to look.

    .venv/bin/python scripts/demo.py [--dir var/demo] [--query-port 16686] [--once]

What runs (all local, all stopped on Ctrl-C / SIGTERM, none left behind):

- SPIRE (`.tools/bin/spire-server`, `spire-agent`; tests/infra/spire.py, its
  datastore on the PostgreSQL of tests/doubles/postgres.py): trust domain
  example.org, one agent; the sidecar's process is registered as
  spiffe://example.org/ns/agents/sa/ops-agent (the `unix` selectors of this
  Python interpreter, which `agent-sidecar serve` runs too) and an approver
  workload as spiffe://example.org/ns/ops/sa/approver;
- Jaeger v2 (`.tools/bin/jaeger`, tests/infra/jaeger.py: memory storage,
  OTLP and the query API on free ports; the query API on --query-port when
  that port is free);
- the sidecar (`agent-sidecar serve`) on rego/, its identity from SPIRE's
  Workload API, its evidence in DIR/evidence (checkpoints signed with its
  SVID), its spans exported to that Jaeger over OTLP/gRPC.

Then, as the agent in the pod (over the sidecar's unix socket, so the caller
is the pod's SPIFFE ID): two allowed calls, two denied ones, and an escalated
`send_email` that the approver workload approves with its JWT-SVID and the
agent repeats (the three share one trace). It prints each call's outcome and
trace id with the Jaeger query URL that returns it, waits until Jaeger has
them all, and prints how to verify the evidence against SPIRE's bundle
(DIR/bundle.pem). With --once it stops everything right away; without, it
waits for Ctrl-C. Either way it then runs `evidence verify` itself.

DIR (default var/demo) is emptied at start: only a directory the demo made
(it leaves a .agent-sidecar-demo file there), the default one, or an empty or
new one; any other is refused (exit 2), so a mistyped --dir empties nothing.
Exit status 0 when every call got the outcome the policy promises and every
trace reached Jaeger, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from sidecar.client import AsyncClient  # noqa: E402
from sidecar.escalation.client import ApprovalsClient  # noqa: E402
from tests.infra.jaeger import Jaeger, JaegerError, free_port, pinned_version, wait_until  # noqa: E402
from tests.infra.spire import SpireError, SpireServer, SpireUnavailable, own_process_selectors  # noqa: E402

CLI = str(Path(sys.executable).parent / "agent-sidecar")
SERVICE = "agent-sidecar-demo"
TRUST_DOMAIN = "example.org"
AGENT_PATH = "/ns/agents/sa/ops-agent"  # rego/sidecar/grants: may read, fetch and send_email (escalated)
APPROVER_PATH = "/ns/ops/sa/approver"
AUDIENCE = "agent-sidecar-demo"  # identity.jwt_audience: what the approver's JWT-SVID is minted for
# (tool, arguments, the outcome rego/ gives it; see README "Five-minute walk-through")
CALLS = [
    ("read_file", {"path": "/workspace/notes.txt"}, "allow"),
    ("http_get", {"url": "https://example.org/"}, "allow"),
    ("read_file", {"path": "/etc/shadow"}, "deny"),
    ("rm_rf_everything", {"path": "/"}, "deny"),
]
ESCALATED = ("send_email", {"to": ["cfo@example.com"], "subject": "Q3", "body": "numbers"})


def say(text: str = "") -> None:
    print(text, flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Sidecar:
    """`agent-sidecar serve` as a child process: in its own session, dying with this process."""

    def __init__(self, directory: Path, jaeger: Jaeger, spire: SpireServer, workload_api: str):
        self.dir = directory
        self.address = f"127.0.0.1:{free_port()}"  # health checks; the agent uses the unix socket
        self.unix = f"unix:{spire.directory / 'sidecar.sock'}"  # a short path: unix sockets are limited to 108 bytes
        self.evidence = directory / "evidence"
        self.config_path = directory / "sidecar.yaml"
        self.log_path = directory / "sidecar.log"
        bundle = directory / "bundle.pem"
        bundle.write_text(spire.bundle_pem())
        # what `evidence verify` trusts: SPIRE's CAs, and only the sidecar's SVID as the signer
        self.anchors = ("--bundle", str(bundle), "--signer", spire.spiffe_id(AGENT_PATH))
        config: dict[str, Any] = {
            "listen": {"tcp": self.address, "unix": self.unix.removeprefix("unix:")},
            # A generous budget: on a busy laptop the default 100 ms can turn a demo call into policy_timeout.
            "policy": {"dir": str(REPO / "rego"), "reload": False, "timeout_ms": 2000},
            # jwt_svid first: a call that presents a JWT-SVID (the approver) is that workload; the
            # other unix-socket callers are the pod, i.e. the SVID SPIRE gives the sidecar.
            "identity": {
                "sources": ["jwt_svid", "workload_api"], "workload_api_socket": workload_api,
                "jwt_audience": AUDIENCE, "max_delegation_links": 0,
            },
            "sidecar": {"instance_id": "demo-sidecar"},
            "evidence": {"dir": str(self.evidence)},
            "telemetry": {
                "exporter": "otlp", "protocol": "grpc", "endpoint": jaeger.otlp_grpc_endpoint,
                "service_name": SERVICE, "max_backoff_seconds": 2.0,
            },
            "escalation": {
                "path": str(directory / "escalations.db"),
                "approvers": [spire.spiffe_id(APPROVER_PATH)],
            },
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["PATH"] = f"{REPO / '.tools' / 'bin'}:{env.get('PATH', '')}"
        command = [CLI, "serve", "--config", str(self.config_path)]
        if shutil.which("setpriv"):
            command = ["setpriv", "--pdeathsig", "KILL", "--", *command]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
        if not wait_until(self._serving_or_exited, timeout, 0.2) or self.process.poll() is not None:
            raise RuntimeError(f"the sidecar did not start; {self.log_path}:\n{self.log_path.read_text()[-3000:]}")

    def _serving_or_exited(self) -> bool:
        if self.process.poll() is not None:
            return True
        import grpc

        try:
            with grpc.insecure_channel(self.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: the sidecar drains, writes its closing checkpoint and ships what it can."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def run_calls(address: str, approver: str, approver_token: str) -> list[tuple[str, str, Any]]:
    """The agent's calls: (label, expected outcome, AuthorizationResult)."""
    done = []
    bearer = (("authorization", f"Bearer {approver_token}"),)
    async with AsyncClient(address) as agent, ApprovalsClient(address, metadata=lambda: bearer) as approvals:
        for tool, arguments, expected in CALLS:
            done.append((f"{tool} {json.dumps(arguments)}", expected, await agent.authorize(tool, arguments)))
        tool, arguments = ESCALATED
        escalated = await agent.authorize(tool, arguments)
        done.append((f"{tool} (first try)", "escalate", escalated))
        if escalated.escalation_id:
            await approvals.approve(escalated.escalation_id, note="demo: approved")
            retry = await agent.authorize(tool, arguments, escalation_id=escalated.escalation_id)
            done.append((f"{tool} (retry after {approver} approved {escalated.escalation_id})", "allow", retry))
    return done


def report(calls, jaeger: Jaeger, sidecar: Sidecar) -> bool:
    say("\nCalls (outcome, trace id, the Jaeger query that returns its trace):")
    ok = True
    for label, expected, result in calls:
        mark = "ok" if result.outcome == expected else f"UNEXPECTED (policy promised {expected})"
        ok &= result.outcome == expected
        say(f"  {result.outcome:<8} {label}")
        say(f"           trace {result.trace_id}  {jaeger.trace_url(result.trace_id)}  [{mark}]")
        if result.outcome != "allow":
            say(f"           reasons: {'; '.join(result.reasons)}")

    trace_ids = {result.trace_id for _, _, result in calls}
    arrived = wait_until(lambda: all(jaeger.trace(t) for t in trace_ids), 60, 0.5)
    say(f"\nJaeger has {'every' if arrived else 'NOT every'} trace "
        f"({len(trace_ids)} traces; the escalated call, its approval and the retry share one).")
    ok &= bool(arrived)
    say(f"  query API      {jaeger.query_url}/api/traces?service={SERVICE}&limit=20")
    say(f"  by tool name   {jaeger.query_url}/api/traces?service={SERVICE}&tags=%7B%22gen_ai.tool.name%22%3A%22read_file%22%7D")
    say(f"  services       {jaeger.query_url}/api/services")
    say(f"  (a module build of Jaeger has no UI assets: {jaeger.query_url}/ is a placeholder page)")
    say("\nEvidence (checkpoints signed with the sidecar's SVID; the bundle proves who signed):")
    say(f"  {CLI} evidence show {sidecar.evidence}")
    say(f"  {CLI} evidence verify {sidecar.evidence} {' '.join(sidecar.anchors)}")
    return ok


def verify(sidecar: Sidecar) -> bool:
    result = subprocess.run([CLI, "evidence", "verify", str(sidecar.evidence), *sidecar.anchors],
                            capture_output=True, text=True, check=False)
    say(f"\n$ agent-sidecar evidence verify {sidecar.evidence} {' '.join(sidecar.anchors)}")
    say(result.stdout.rstrip() or result.stderr.rstrip())
    return result.returncode == 0


DEFAULT_DIR = REPO / "var" / "demo"
MARKER = ".agent-sidecar-demo"


def _ours(directory: Path) -> bool:
    """Whether --dir may be emptied: the default, new or empty, or made by an earlier demo."""
    if directory == DEFAULT_DIR.resolve() or not directory.exists():
        return True
    return directory.is_dir() and (not any(directory.iterdir()) or (directory / MARKER).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), metavar="DIR",
                        help=f"working directory, emptied at start (default {DEFAULT_DIR.relative_to(REPO)}); one "
                        f"holding anything but an earlier demo's files ({MARKER}) is refused")
    parser.add_argument("--query-port", type=int, default=16686, metavar="PORT",
                        help="Jaeger query port when free (0: any free port)")
    parser.add_argument("--once", action="store_true", help="stop after the calls instead of waiting for Ctrl-C")
    args = parser.parse_args(argv)

    directory = Path(args.dir).resolve()
    if not _ours(directory):
        why = (f"it holds files and no {MARKER} (a directory an earlier demo made)" if directory.is_dir()
               else "not a directory")
        print(f"demo: --dir {args.dir}: {why}, so it is not emptied; give a new or empty directory", file=sys.stderr)
        return 2
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by scripts/demo.py, which empties this directory at its next start\n")

    def on_signal(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    ports = {"query_http": args.query_port} if args.query_port and port_free(args.query_port) else {}
    try:
        jaeger = Jaeger(directory / "jaeger", ports=ports)
        spire = SpireServer(TRUST_DOMAIN)
    except (JaegerError, SpireUnavailable) as exc:  # a binary is missing: the message says how to build it
        say(f"demo: {exc}")
        return 1
    sidecar = None
    ok = False
    try:
        say(f"demo: starting SPIRE ({TRUST_DOMAIN}: server and one agent)")
        spire.start()
        node = spire.agent("node1")
        node.register(AGENT_PATH, *own_process_selectors())
        approver = node.workload("approver")
        node.register(APPROVER_PATH, *approver.selectors)
        approver.wait_for_identity()
        say(f"demo: SPIRE runs in {spire.directory}; Workload API {node.endpoint}")
        say(f"demo: starting Jaeger v2 (module {pinned_version()}; query API {jaeger.query_url}, OTLP {jaeger.otlp_grpc_endpoint})")
        jaeger.start()
        say(f"demo: jaeger pid {jaeger.pid}")
        sidecar = Sidecar(directory, jaeger, spire, node.endpoint)
        say(f"demo: starting the sidecar on {sidecar.unix} and {sidecar.address} (rego/; log {sidecar.log_path})")
        sidecar.start()
        say(f"demo: sidecar pid {sidecar.process.pid}, identity {spire.spiffe_id(AGENT_PATH)} from SPIRE")
        calls = asyncio.run(run_calls(sidecar.unix, spire.spiffe_id(APPROVER_PATH), approver.fetch_jwt(AUDIENCE)))
        ok = report(calls, jaeger, sidecar)
        if not args.once:
            say("\nRunning. Press Ctrl-C to stop the sidecar, Jaeger and SPIRE.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        say("\ndemo: stopping")
    except (JaegerError, SpireError, RuntimeError) as exc:
        say(f"demo: {exc}")
        ok = False
    finally:
        if sidecar is not None:
            sidecar.stop()
        jaeger.stop()
        spire.close()
    if sidecar is not None:
        ok = verify(sidecar) and ok
        say(f"demo: stopped; evidence kept in {sidecar.evidence}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
