"""`make bench`: what the sidecar adds to every tool call, against a bare gRPC floor.

Starts the sidecar (managed OPA over its private unix socket, durable
evidence) and a bare floor server as separate processes, drives each from a
separate load process (bench/loadgen, Go, sending bench/calls.py's call mix),
and prints a table and each identity mode against the speed targets
(bench/targets.py); then what one large call costs the sidecar, by the shape
of its arguments (bench/large_calls.py), what the MCP gateway adds to a call
over calling the MCP server directly (bench/mcp_gateway.py, its own process),
how long waking the managed OPA holds the sender under each scheduling
policy (bench/opa_wakeup.py), and what one durable evidence write takes from
idle (bench/durable_write.py): with the floor, the fixed hops of a call at
100 calls/s (bench/targets.py).
`--out` writes the figures as JSON, with the machine's load average. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
import durable_write  # noqa: E402
import large_calls  # noqa: E402
import opa_wakeup  # noqa: E402
import targets  # noqa: E402
from calls import call_mix, write_calls  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The load process: bench/loadgen (Go), built into .tools/bin by `tools/build.sh loadgen`.
LOADGEN = REPO / ".tools" / "bin" / "sidecar-loadgen"

SCENARIOS = [
    ("open 100/s", ["open", "--rate", "100"]),
    ("open 1000/s", ["open", "--rate", "1000"]),
    ("closed x64", ["closed", "--concurrency", "64"]),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_bundle(workdir: Path) -> Path:
    """rego/ with the rate limits lifted, so load is decided by the rules, not throttled.

    The bundle's own *_test.rego are left out: they pin the shipped limits.
    """
    bundle = workdir / "rego"
    shutil.copytree(REPO / "rego", bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    limits_file = bundle / "sidecar" / "limits" / "data.yaml"
    limits = yaml.safe_load(limits_file.read_text())
    limits.update(max_calls_in_window=10**9, max_calls_in_task=10**9)
    limits_file.write_text(yaml.safe_dump(limits))
    return bundle


def start(command: list[str], ready: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if ready in line:
            return process
        if process.poll() is not None:
            break
    process.kill()
    raise SystemExit(f"{' '.join(command)} did not start; see {log}:\n{log.read_text()[-2000:]}")


def stage_totals(port: int) -> dict[str, tuple[float, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("sidecar_stage_seconds_sum", "sidecar_stage_seconds_count"):
                entry = totals.setdefault(sample.labels["stage"], [0.0, 0.0])
                entry[0 if sample.name.endswith("_sum") else 1] = sample.value
    return {stage: (s, c) for stage, (s, c) in totals.items()}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a live process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5))


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (the managed OPA of a sidecar)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # that thread ended meanwhile
            continue
    return found


def server_cpu(sidecar_pid: int) -> dict[str, float]:
    """CPU seconds used so far by a server process (`sidecar`) and its child processes (`opa`, a managed OPA)."""
    return {"sidecar": cpu_seconds(sidecar_pid), "opa": sum(cpu_seconds(c) for c in children(sidecar_pid))}


def machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine has spent, all cores: `busy` (neither idle nor waiting for I/O)
    and `steal` (a virtual machine's cores taken by its host), from the first line of /proc/stat (proc(5)),
    with `at`, the monotonic clock when read."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle, iowait, steal = ticks[3], ticks[4], ticks[7]
    return {"busy": (sum(ticks[:8]) - idle - iowait - steal) / hz, "steal": steal / hz, "at": time.monotonic()}


def other_work(before: dict, after: dict, ours: dict[str, float], calls: int) -> dict[str, float]:
    """Cores kept busy, on average over a scenario, by what the bench does not measure: `other` (every
    process but the server, its OPA and the load process: other work on the machine) and `steal` (the
    host). `ours` is cpu_per_call's split, in ms per call. A figure taken with either well above zero
    shares its cores with something else, and is not comparable with a quiet run."""
    wall = max(after["at"] - before["at"], 1e-9)
    ours_seconds = (ours["total"] * max(calls, 1)) / 1000
    return {"other": max(0.0, after["busy"] - before["busy"] - ours_seconds) / wall,
            "steal": (after["steal"] - before["steal"]) / wall}


def cpu_per_call(before: dict, after: dict, result: dict) -> dict[str, float]:
    """Milliseconds of CPU per answered call: sidecar, OPA, the load process, and their sum."""
    calls = max(result["calls"], 1)
    split = {name: (after[name] - before[name]) * 1000 / calls for name in ("sidecar", "opa")}
    split["load"] = result["cpu_seconds"] * 1000 / calls
    split["total"] = sum(split.values())
    return split


def cost_split(before: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds per decision spent in each stage between two scrapes."""
    split = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            split[stage] = (total - total0) / (count - count0) * 1000
    return split


def build_loadgen() -> Path:
    """The Go load generator (bench/loadgen) in .tools/bin, built by tools/build.sh when its sources changed."""
    if subprocess.run([str(REPO / "tools" / "build.sh"), "loadgen"], cwd=REPO).returncode != 0:
        raise SystemExit("could not build the load generator (tools/build.sh loadgen); see above")
    return LOADGEN


def loader_command(target: str, args: list[str], seconds: float, calls_file: Path) -> list[str]:
    """The load process's command line: `sidecar-loadgen TARGET MODE ...` sending the requests in `calls_file`."""
    return [str(LOADGEN), target, *args, "--seconds", str(seconds), "--calls", str(calls_file)]


def load(target: str, args: list[str], seconds: float, calls_file: Path, on_warm=None) -> dict:
    """Run one load process; `on_warm` runs once its warm-up calls are done."""
    process = subprocess.Popen(loader_command(target, args, seconds, calls_file), stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    warm = process.stdout.readline()
    if warm.strip() != "warmed":
        process.kill()
        raise SystemExit(f"load process failed before warming up: {warm}")
    if on_warm is not None:
        on_warm()
    output, _ = process.communicate(timeout=seconds + 120)
    if process.returncode != 0:
        raise SystemExit(f"load process failed (exit {process.returncode})")
    return json.loads(output.strip().splitlines()[-1])


def write_config(workdir: Path, name: str, bundle: Path, metrics_port: int, identity: dict, listen: dict) -> Path:
    config = {
        "listen": listen,
        "policy": {"dir": str(bundle), "reload": False},
        "identity": identity,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "sidecar": {"instance_id": f"bench-{name}"},
        "evidence": {"dir": str(workdir / f"evidence-{name}")},
        "telemetry": {"exporter": "none"},
        "escalation": {"approvers": ["email:bench-approver@example.org"]},  # required outside dev mode
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_fake_spire(workdir: Path):
    """TEST DOUBLE Workload APIs (tests/doubles): one for the sidecar, one for the agent, one CA."""
    sys.path.insert(0, str(REPO))
    from tests.doubles.fake_workload_api import FakeWorkloadApi

    sidecar_api = FakeWorkloadApi(str(workdir / "spire-sidecar.sock"), "example.org").start()
    sidecar_api.set_identity("/ns/agents/sa/sidecar", ttl=3600, dns_names=("sidecar.local",))
    agent_api = FakeWorkloadApi(str(workdir / "spire-agent.sock"), "example.org", ca=sidecar_api.ca).start()
    (agent_svid,) = agent_api.set_identity("/ns/agents/sa/ops-agent", ttl=3600)
    tls_dir = workdir / "agent-tls"
    tls_dir.mkdir()
    (tls_dir / "svid.pem").write_bytes(agent_svid.chain_pem())
    (tls_dir / "key.pem").write_bytes(agent_svid.key_pem())
    (tls_dir / "bundle.pem").write_bytes(sidecar_api.ca.bundle_pem())
    return [sidecar_api, agent_api], sidecar_api.endpoint, tls_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each scenario (default 5)")
    parser.add_argument("--modes", default="unix,mtls", help="identity modes to run: unix (dev identity over the "
                        "in-pod socket), mtls (X.509-SVIDs from a test Workload API); default both")
    parser.add_argument("--mcp-calls", type=int, default=300, help="calls direct and through the MCP gateway "
                        "(bench/mcp_gateway.py; default 300, 0 = skip)")
    parser.add_argument("--large-calls", type=int, default=3, metavar="N", help="send each large-call shape N "
                        "times (bench/large_calls.py; default 3, 0 = skip)")
    parser.add_argument("--opa-wakeups", type=int, default=300, metavar="N", help="decision requests sent "
                        "to a lone managed OPA per scheduling policy and pause (bench/opa_wakeup.py; default 300, "
                        "0 = skip)")
    parser.add_argument("--durable-writes", type=int, default=300, metavar="N", help="record-sized appends, "
                        "each synced, per pause (bench/durable_write.py; default 300, 0 = skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    load_before = os.getloadavg()

    build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))  # short: unix socket paths are limited
    bundle = bench_bundle(workdir)
    calls_file = write_calls(workdir / "calls.bin", call_mix())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    floor = start([PYTHON, str(REPO / "bench" / "floor.py"), f"unix:{workdir / 'floor.sock'}"], "floor serving",
                  workdir / "floor.log")
    fakes: list = []
    results = []
    try:
        for mode in modes:
            metrics_port = free_port()
            tls_dir = None
            if mode == "unix":
                target = f"unix:{workdir / 'sidecar.sock'}"
                config = write_config(workdir, mode, bundle, metrics_port, {"sources": ["dev"]},
                                      {"tcp": "", "unix": str(workdir / "sidecar.sock")})
                label = "dev identity, unix socket"
            elif mode == "mtls":
                apis, endpoint, tls_dir = start_fake_spire(workdir)
                fakes += apis
                port = free_port()
                target = f"127.0.0.1:{port}"
                config = write_config(workdir, mode, bundle, metrics_port,
                                      {"sources": ["mtls"], "workload_api_socket": endpoint},
                                      {"tcp": target, "unix": ""})
                label = "X.509-SVID, mTLS over loopback"
            else:
                raise SystemExit(f"unknown mode {mode!r}: use unix or mtls")
            sidecar = start([PYTHON, "-m", "sidecar", "serve", "--config", str(config)], "serving",
                            workdir / f"sidecar-{mode}.log")
            try:
                time.sleep(1.0)  # identity fetched, health SERVING
                for name, scenario in SCENARIOS:
                    floor_before: dict = {}
                    floor_machine: dict = {}

                    def on_floor_warm() -> None:
                        floor_before.update(server_cpu(floor.pid))
                        floor_machine.update(machine_cpu())

                    floor_result = load(f"unix:{workdir / 'floor.sock'}", scenario, args.seconds, calls_file,
                                        on_warm=on_floor_warm)
                    floor_result["cpu_ms_per_call"] = cpu_per_call(floor_before, server_cpu(floor.pid), floor_result)
                    floor_result["other_cores"] = other_work(floor_machine, machine_cpu(),
                                                             floor_result["cpu_ms_per_call"], floor_result["calls"])
                    before: dict = {}
                    cpu_before: dict = {}
                    machine_before: dict = {}
                    extra = ["--tls-dir", str(tls_dir)] if tls_dir else []

                    def on_warm() -> None:
                        before.update(stage_totals(metrics_port))
                        cpu_before.update(server_cpu(sidecar.pid))
                        machine_before.update(machine_cpu())

                    sidecar_result = load(target, scenario + extra, args.seconds, calls_file, on_warm=on_warm)
                    sidecar_result["cost_split_ms"] = cost_split(before, stage_totals(metrics_port))
                    sidecar_result["cpu_ms_per_call"] = cpu_per_call(cpu_before, server_cpu(sidecar.pid), sidecar_result)
                    sidecar_result["other_cores"] = other_work(machine_before, machine_cpu(),
                                                               sidecar_result["cpu_ms_per_call"], sidecar_result["calls"])
                    results.append({"scenario": name, "identity": label, "floor": floor_result,
                                    "sidecar": sidecar_result})
            finally:
                sidecar.terminate()
                sidecar.wait(timeout=15)
    finally:
        floor.terminate()
        floor.wait(timeout=15)
        for api in fakes:
            api.stop()

    large = large_call_costs(workdir, bundle, args.large_calls) if args.large_calls > 0 else None
    gateway = mcp_gateway(workdir, args.mcp_calls) if args.mcp_calls > 0 else None
    wakeups = opa_wakeup.measure(bundle, args.opa_wakeups) if args.opa_wakeups > 0 else None
    writes = durable_write.measure(workdir, args.durable_writes) if args.durable_writes > 0 else None
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(),
               # 1/5/15-minute load averages (os.getloadavg) at the start and the end: other work on the machine.
               "load_average": {"start": [round(x, 2) for x in load_before],
                                "end": [round(x, 2) for x in os.getloadavg()]}}
    report = {"machine": machine, "seconds_per_scenario": args.seconds, "results": results,
              "targets": targets.judge(results)}
    if large:
        report["large_calls"] = large
    if gateway:
        report["mcp_gateway"] = gateway
    if wakeups:
        report["opa_wakeup"] = wakeups
    if writes:
        report["durable_write"] = writes
    if wakeups and writes:
        report["fixed_hops"] = targets.fixed_hops(results, wakeups, writes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nJSON: {args.out}   (work dir with logs and evidence: {workdir})")
    return 0


def large_call_costs(workdir: Path, bundle: Path, repeats: int) -> dict:
    """bench/large_calls.py's figures, from a sidecar of its own (dev identity, unix socket)."""
    import asyncio

    socket_path = workdir / "large.sock"
    config = write_config(workdir, "large", bundle, free_port(), {"sources": ["dev"]},
                          {"tcp": "", "unix": str(socket_path)})
    sidecar = start([PYTHON, "-m", "sidecar", "serve", "--config", str(config)], "serving", workdir / "sidecar-large.log")
    try:
        return asyncio.run(large_calls.measure(f"unix:{socket_path}", lambda: server_cpu(sidecar.pid), repeats=repeats))
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=15)


def mcp_gateway(workdir: Path, calls: int) -> dict:
    """bench/mcp_gateway.py's figures ({calls, direct, through_gateway, overhead}: p50_ms, p99_ms, mean_ms)."""
    out, log = workdir / "mcp_gateway.json", workdir / "mcp_gateway.log"
    with log.open("w") as stderr:  # the sidecar's and the SDK's logging: one line per HTTP request
        done = subprocess.run([PYTHON, str(REPO / "bench" / "mcp_gateway.py"), "--calls", str(calls), "--out", str(out)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    if done.returncode != 0:
        raise SystemExit(f"bench/mcp_gateway.py failed ({done.returncode}); see {log}")
    return json.loads(out.read_text())


def print_table(report: dict) -> None:
    header = f"{'identity':<31} {'scenario':<13} {'server':<8} {'calls/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        for label in ("floor", "sidecar"):
            r = row[label]
            lat = r["latency_ms"]
            print(f"{row['identity']:<31} {row['scenario']:<13} {label:<8} {r['throughput']:>9.0f} {lat['p50']:>8.3f} {lat['p90']:>8.3f} "
                  f"{lat['p99']:>8.3f} {lat['max']:>8.3f} {r['errors']:>6}")
        ratio = row["sidecar"]["latency_ms"]["p50"] / row["floor"]["latency_ms"]["p50"]
        split = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["sidecar"]["cost_split_ms"].items()))
        print(f"{'':<45} ratio p50 sidecar/floor {ratio:.2f}x; sidecar mean ms per stage: {split}")
        print(f"{'':<45} outcomes {row['sidecar']['outcomes']}; fail-closed denies {row['sidecar'].get('fail_closed') or 'none'}")
        if row["sidecar"]["errors"]:
            print(f"{'':<45} calls that failed in gRPC, by status: {row['sidecar'].get('error_codes')}")
        by_outcome = row["sidecar"].get("latency_ms_by_outcome") or {}
        if by_outcome:
            each = ", ".join(f"{name} {p['p50']:.2f} / {p['p99']:.2f}" for name, p in sorted(by_outcome.items()))
            print(f"{'':<45} p50 / p99 ms by outcome: {each}")
        cpu = row["sidecar"]["cpu_ms_per_call"]
        ceiling = report["machine"]["cpus"] * 1000 / cpu["total"]
        floor_cpu = row["floor"]["cpu_ms_per_call"]
        print(f"{'':<45} CPU ms per call: sidecar {cpu['sidecar']:.3f}, OPA {cpu['opa']:.3f}, load {cpu['load']:.3f} "
              f"(all {report['machine']['cpus']} cores busy at ~{ceiling:.0f} calls/s); floor server {floor_cpu['sidecar']:.3f}")
        print(f"{'':<45} cores busy with other work (steal) meanwhile: "
              + "; ".join(f"{label} {row[label]['other_cores']['other']:.2f} ({row[label]['other_cores']['steal']:.2f})"
                          for label in ("floor", "sidecar")))
    targets.print_table(report["targets"], report.get("fixed_hops"))
    if report.get("large_calls"):
        large_calls.print_table(report["large_calls"])
    gateway = report.get("mcp_gateway")
    if gateway:
        print(f"\nMCP tool call, {gateway['calls']} sequential calls (bench/mcp_gateway.py)")
        print(f"{'':<18}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
        for label in ("direct", "through_gateway", "overhead"):
            row = gateway[label]
            print(f"{label:<18}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['mean_ms']:>10}")
    if report.get("opa_wakeup"):
        opa_wakeup.print_table(report["opa_wakeup"])
    if report.get("durable_write"):
        durable_write.print_table(report["durable_write"])
    load = report["machine"]["load_average"]
    print(f"\nload average (1/5/15 min) at start {load['start']}, at end {load['end']} on {report['machine']['cpus']} CPUs")


if __name__ == "__main__":
    raise SystemExit(main())
