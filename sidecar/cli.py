"""`agent-sidecar`: serve the sidecar, try one decision, test policies.

Each subcommand is a small function over the same stages the server uses.
Exit status: 0 success, 1 a check failed (e.g. policy tests), 2 bad usage or
configuration; `check` exits 0 allow, 3 deny, 4 escalate (CHECK_EXIT); 141
(128 + SIGPIPE) when whoever reads the output stops reading (`| head`);
`serve` 130 or 143 (128 + SIGINT or SIGTERM) when signalled before its start commits
(its `startup` record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from typing import Any, Sequence

from sidecar.argtypes import EVIDENCE_DIR, count, existing_directory, log_id, name
from sidecar.config import (
    TRY_LOCALLY,
    Config,
    ConfigError,
    load_command_config,
    load_config,
    load_sidecar_config,
    outside_dev_mode,
)

DESCRIPTION = """\
agent-sidecar puts every AI-agent tool call through a verified SPIFFE
identity and Rego policy (allow / deny / escalate) before it runs.

  agent-sidecar serve --config examples/dev.yaml     run the sidecar
  agent-sidecar check --subject spiffe://dev.local/agent --tool read_file \\
      --args '{"path": "/workspace/notes.txt"}'       one decision, as JSON
  agent-sidecar policy test rego/                    run the *_test.rego tests
  agent-sidecar policy replay --evidence var/evidence --policy candidate/ --fail-on allow
                                                     what a policy change would have decided
  agent-sidecar evidence verify var/evidence --key var/evidence-dev-key.pub.pem
                                                     prove the evidence log is intact (its signing key)
  agent-sidecar approvals list                       escalated calls waiting for a human
  agent-sidecar approvals approve ID --note TEXT     let one escalated call through, once
      [--approver email:alice@example.org]           (dev mode: who you are; never the caller)
  agent-sidecar console --config FILE                the approvers' web page
  agent-sidecar --version                            this version, and the OPA it would run
"""


LOG_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
# `check`'s exit status per outcome: scripts can branch on the decision without parsing JSON.
CHECK_EXIT = {"allow": 0, "deny": 3, "escalate": 4}
# Exit status when stdout's reader went away (a shell reports a process killed by SIGPIPE the same way).
BROKEN_PIPE_EXIT = 128 + 13


class Parser(argparse.ArgumentParser):
    """Every parser of this CLI, subcommands' included (add_subparsers makes them of this class).

    Options are never abbreviated (`--subj` is not `--subject`), and an
    argument a subcommand does not know is refused by that subcommand, with
    its own usage line (argparse would hand it up to the top-level parser).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._misplaced_hint(unknown)}")
        return parsed, unknown

    def error(self, message: str) -> Any:
        """A missing command names the commands there are (argparse's says only `required: COMMAND`)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and message.endswith(f"required: {action.metavar}"):
                message += f" (one of {', '.join(action.choices)}; {self.prog} --help says what each does)"
        super().error(message)

    def _misplaced_hint(self, unknown: list[str]) -> str:
        """Where a top-level option given after the command belongs (`serve --log-level DEBUG`)."""
        command = self.prog.removeprefix("agent-sidecar").strip()
        if command and any(arg == "--log-level" or arg.startswith("--log-level=") for arg in unknown):
            return f" (--log-level goes before the command: agent-sidecar --log-level LEVEL {command} ...)"
        return ""


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "policy", None):
        overrides["policy.dir"] = args.policy
    if getattr(args, "listen", None):
        if args.listen.startswith("unix:"):
            overrides["listen.unix"] = args.listen[len("unix:"):]
            overrides["listen.tcp"] = ""
        else:
            overrides["listen.tcp"] = args.listen
    return overrides


def _refusal_problems(exc: Exception) -> list[str]:
    """The lines that say why a policy was refused: a rejection lists them, a start failure is one."""
    from sidecar.policy.opa.service import PolicyRejected

    return list(exc.problems) if isinstance(exc, PolicyRejected) else [str(exc)]


def _policy_failure(config: Any, exc: Exception) -> int | None:
    """Print why the policy cannot serve (exit 2), or None if `exc` is not such a failure."""
    from sidecar.policy.opa.runner import OpaNotFound, OpaStartError
    from sidecar.policy.opa.service import PolicyRejected

    if isinstance(exc, OpaNotFound):
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, (PolicyRejected, OpaStartError)):
        print(f"agent-sidecar: the policy in {config.policy.dir} cannot be served:", file=sys.stderr)
        for problem in _refusal_problems(exc):
            print(f"  {problem}", file=sys.stderr)
        if not os.path.isabs(config.policy.dir) and not os.path.exists(config.policy.dir):
            # examples/dev.yaml run from outside the checkout: say where a relative path was looked for.
            print(f"  (a relative path in the config is taken from the working directory, {os.getcwd()}, not "
                  "from the config file's; run from the checkout's root or give absolute paths)", file=sys.stderr)
        return 2
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.escalation import StoreError
    from sidecar.evidence import EvidenceError
    from sidecar.server import StartInterrupted, serve
    from sidecar.task_store import TaskStoreError

    config = load_sidecar_config("serve", args.config, _config_overrides(args))
    try:
        asyncio.run(serve(config))
    except StartInterrupted as exc:  # as a shell reports a process its signal ended
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except ConfigError as exc:  # found at start, e.g. no Workload API socket
        raise outside_dev_mode(exc, "serve", args.config, config) from None
    except EvidenceError as exc:
        print(f"agent-sidecar: the evidence log cannot be opened: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"agent-sidecar: the escalation store cannot be opened: {exc}", file=sys.stderr)
        return 2
    except TaskStoreError as exc:
        print(f"agent-sidecar: the task store cannot be opened: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        code = _policy_failure(config, exc)
        if code is None:
            raise
        return code
    return 0


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """The option's JSON object; anything else is bad usage (exit 2), not a call for policy to deny.
    Read strictly (`canonical.parse_json`): a repeated key or NaN/Infinity is refused, not read as one of
    its values, so the call decided is the one written."""
    from sidecar.canonical import parse_json

    if text is None:
        return None
    try:
        value = parse_json(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: must be a JSON object ({{...}}), not {json.dumps(value)[:40]}")
    return value


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.calls import ToolCall
    from sidecar.identity import CallerIdentity, Subject
    from sidecar.identity.spiffe_id import SpiffeIdError, validate_spiffe_id
    from sidecar.reasons import POLICY_UNAVAILABLE, parse
    from sidecar.server import build_gate, build_policy

    # The subject is --subject/--source, not a verified caller.
    config = load_command_config("check", args.config, {**_config_overrides(args), "policy.reload": False})
    try:
        subject = Subject(validate_spiffe_id(args.subject), source=args.source)
    except SpiffeIdError as exc:
        raise ConfigError(f"--subject: {exc}") from None
    arguments = _json_object(args.args, "--args")
    call = ToolCall(
        tool=args.tool,
        arguments=arguments if arguments is not None else {},
        task_id=args.task or "",
        intent=args.intent or "",
        signals=_json_object(args.signals, "--signals"),
        server=args.server or "",
    )

    async def decide() -> dict[str, Any]:
        # The server's own path: the same policy service (managed OPA on the same files, or policy.opa.url).
        async with build_policy(config) as policy:
            verdict = await build_gate(config, policy, recorder=None).authorize(call, CallerIdentity(subject))
        decision = verdict.decision
        result = {
            "error": decision.error,
            "outcome": decision.outcome,
            "reasons": list(decision.reasons),
            "decision_id": verdict.decision_id,
            "policy_revision": decision.policy_revision,
            "obligations": decision.obligations,
            "engine": decision.engine,
        }
        # A sidecar run with this config serves its policy.dir: compare only when check decided on that one
        # (`--policy` naming another bundle is a candidate the server would never reload to).
        serving = await _served_revision(config) if _same_dir(args.policy, args.config) else ""
        if serving and serving != decision.policy_revision:
            result["note"] = (
                f"the sidecar serving at {config.listen.unix or config.listen.tcp} still serves revision {serving}, "
                f"not {decision.policy_revision}: it decides differently until it reloads"
            )
        return result

    try:
        result = asyncio.run(decide())
    except Exception as exc:
        code = _policy_failure(config, exc)
        if code is None:
            raise
        return code
    if "note" in result:
        print(f"agent-sidecar: note: {result['note']}", file=sys.stderr)
    error = result.pop("error")
    print(json.dumps(result, indent=None if args.compact else 2, sort_keys=True))
    reason = parse(error) if error else None
    if reason is not None and reason.code == POLICY_UNAVAILABLE:
        # The fail-closed deny the server would give, but OPA was never asked: no verdict on the call, and a
        # script must not read it as one. (A policy_error is the policy's own answer to this input: a deny.)
        print(f"agent-sidecar: the policy could not decide: {error}", file=sys.stderr)
        return 2
    return CHECK_EXIT[result["outcome"]]


def _same_dir(policy: str | None, config_file: str | None) -> bool:
    """True unless `--policy` names another directory than the config's own policy.dir."""
    if not policy:
        return True
    configured = load_config(config_file, {}, runs_sidecar=False).policy.dir  # cmd_check validated the file
    return os.path.realpath(policy) == os.path.realpath(configured)


async def _served_revision(config: Config) -> str:
    """The revision a sidecar running with this config serves (from its health detail), or "" if none answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"unix:{config.listen.unix}" if config.listen.unix else config.listen.tcp
    if not target or (config.listen.unix and not os.path.exists(config.listen.unix)):
        return ""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            await call
            trailers = await call.trailing_metadata()
    except (grpc.RpcError, OSError):
        return ""
    detail = dict(trailers or ()).get("sidecar-health-detail", "")
    found = re.search(r"serving revision (\S+?)[;)]", detail)
    return found.group(1) if found else ""


def cmd_policy_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecar.policy.opa import tools
    from sidecar.policy.opa.runner import OpaNotFound, find_opa

    directory = Path(existing_directory(args.dir, "the policy bundle directory"))
    config = load_config(args.config, {}, runs_sidecar=False)  # only policy.opa.binary is used
    try:
        binary = find_opa(config.policy.opa.binary)
    except OpaNotFound as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2

    async def run() -> tuple[tools.TestReport, list[str], dict[str, str]]:
        report = await tools.run_tests(binary, directory)
        lint = await tools.check(binary, directory) if args.lint else []
        explained = await tools.explain_failures(binary, directory, report.failed, trace=args.trace)
        return report, lint, explained

    try:
        report, lint, explained = asyncio.run(run())
    except tools.PolicyToolError as exc:
        for problem in exc.problems:
            print(f"ERROR {problem}")
        return 1
    for problem in [*report.problems, *(f"opa check --strict: {p}" for p in lint)]:
        print(f"ERROR {problem}")
    for result in report.results:
        if not result.passed:
            print(f"FAIL {result.file}:{result.row}: {result.rule}" + (f": {result.error}" if result.error else ""))
            why = explained.get(result.rule, "")
            if why:
                print("\n".join("    " + line for line in why.splitlines()))
        elif args.verbose:
            print(f"PASS {result.file}:{result.row}: {result.rule}")
    passed = sum(r.passed for r in report.results)
    failed = len(report.results) - passed + (1 if report.problems or lint else 0)
    if not report.results and not report.problems:
        print(f"no test_* rules found in {args.dir}/**/*_test.rego")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and report.results else 1


def cmd_policy_replay(args: argparse.Namespace) -> int:
    """Exit codes: sidecar/policy/replay.py EXIT_* (docs/policy-authoring.md)."""
    from sidecar.evidence.show import parse_since
    from sidecar.policy import replay
    from sidecar.policy.opa.runner import OpaNotFound, OpaStartError, find_opa
    from sidecar.policy.opa.service import PolicyRejected

    existing_directory(args.evidence, EVIDENCE_DIR, "--evidence")
    existing_directory(args.policy, "the candidate bundle directory", "--policy")
    config = load_config(args.config, {}, runs_sidecar=False)  # only policy.opa.binary is used
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        until = parse_since(args.until) if args.until else None
    except ValueError as exc:
        raise ConfigError(str(exc).replace("--since", "--until", 1)) from None
    selection = replay.Selection(tool=args.tool or "", subject=args.subject or "", since=since, until=until)
    try:
        binary = find_opa(config.policy.opa.binary)
        report = asyncio.run(
            replay.replay(args.evidence, args.policy, selection, binary=binary, verify=not args.no_verify)
        )
    except OpaNotFound as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return replay.EXIT_USAGE
    except (PolicyRejected, OpaStartError) as exc:
        print(f"agent-sidecar: the candidate {args.policy} is refused; nothing replayed:", file=sys.stderr)
        for problem in _refusal_problems(exc):
            print(f"  {problem}", file=sys.stderr)
        return replay.EXIT_USAGE
    except replay.ReplayError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        for line in replay.json_lines(report):
            print(line)
        print(replay.format_report(report).splitlines()[-1], file=sys.stderr)
    else:
        print(replay.format_report(report))
    code = replay.exit_code(report, args.fail_on or ())
    if code and args.fail_on:
        hit = sorted({r.outcome for r in report.changed if r.outcome in args.fail_on})
        if hit:
            print(f"agent-sidecar: decisions changed to {', '.join(hit)} (--fail-on)", file=sys.stderr)
    if report.errors:
        print(f"agent-sidecar: the candidate could not decide {len(report.errors)} recorded inputs", file=sys.stderr)
    return code


def cmd_evidence_verify(args: argparse.Namespace) -> int:
    from sidecar.evidence.signing import SigningError, load_bundle, load_public_keys
    from sidecar.evidence.verify import exit_code, format_report, verify_dir

    existing_directory(args.dir, EVIDENCE_DIR)
    if args.signer and not args.bundle:
        raise ConfigError("--signer names SPIFFE IDs of SVIDs checked against --bundle; give --bundle too")
    try:
        keys = load_public_keys(args.key or [])
    except (SigningError, OSError) as exc:
        raise ConfigError(f"--key: {_file_problem(exc)}") from None
    try:
        bundle = load_bundle(args.bundle) if args.bundle else None
    except (SigningError, OSError) as exc:
        raise ConfigError(f"--bundle: {_file_problem(exc)}") from None
    report = verify_dir(args.dir, public_keys=keys, bundle=bundle, signer_ids=args.signer or (), mirror=args.mirror,
                        log_id=args.log_id or "")
    print(format_report(report))
    return exit_code(report)


def _file_problem(exc: Exception) -> str:
    """`PATH: No such file or directory`, not Python's `[Errno 2] ...: 'PATH'`."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def cmd_evidence_show(args: argparse.Namespace) -> int:
    from sidecar.evidence.log import list_log_files
    from sidecar.evidence.show import Filter, parse_since, show
    from sidecar.evidence.verify import where_logs_are

    existing_directory(args.dir, EVIDENCE_DIR)
    if not list_log_files(args.dir):
        raise ConfigError(
            f"{args.dir}: no evidence log here (no evidence-NNNNNN.jsonl files)"
            + (where_logs_are(args.dir) or "; give the evidence directory, evidence.dir")
        )
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    flt = Filter(
        tool=args.tool or "",
        subject=args.subject or "",
        outcome=args.outcome or "",
        since=since,
        decision_id=args.decision_id or "",
        kind=args.kind or "",
    )
    show(args.dir, flt, as_json=args.json, out=sys.stdout, limit=args.limit)
    return 0


def version_text() -> str:
    """`--version`: this package's version, and the OPA that `check`, `policy` and a managed OPA would
    run without a config (policy.opa.binary's default), by its own `opa version`."""
    import subprocess

    from sidecar import package_version
    from sidecar.policy.opa.runner import OpaNotFound, find_opa

    lines = [f"agent-sidecar {package_version()}"]
    try:
        binary = find_opa()
    except OpaNotFound as exc:
        return "\n".join([*lines, f"opa: {exc}"])
    try:
        answer = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=10)
        found = re.search(r"^Version: (\S+)", answer.stdout, re.MULTILINE)
        opa_version = found.group(1) if found else f"unknown (`{binary} version` exit {answer.returncode})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        opa_version = f"unknown ({exc})"
    return "\n".join([*lines, f"opa {opa_version} ({binary})"])


class _Version(argparse.Action):
    """Print version_text and exit 0, like argparse's "version" action, but computed only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from sidecar.evidence.records import KINDS, OUTCOMES

    parser = Parser(
        prog="agent-sidecar", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default INFO): the sidecar's own log lines; other libraries' "
        "log only warnings and errors, except at DEBUG",
    )
    parser.add_argument(
        "-V", "--version", action=_Version,
        help="print agent-sidecar's version and the OPA binary (and its version) it would run, then exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the sidecar's gRPC server",
        description="Run the sidecar until SIGINT/SIGTERM (exit 0 after the drain; 130/143 when signalled "
        "before it writes its startup record, e.g. while it waits for evidence.lock_wait_seconds or OPA starts). "
        "Exit 2 when it cannot start: the config is refused, an address is in use (every listener is bound "
        "first), another process holds evidence.dir, the evidence log cannot be read back, a store cannot be "
        "opened, or the policy fails its checks; the message names which, nothing is left running, and "
        "evidence.dir is as it was found (docs/evidence.md#a-refused-start). Dev mode (every caller the dev identity, marked "
        "source: dev) only when the config says identity.sources: [dev], as examples/dev.yaml does (make run); "
        "without --config the defaults are not dev mode and, alone, are refused (they need listen.unix and "
        "escalation.approvers).",
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (docs/configuration.md). Without it the defaults apply: identity from the SPIRE "
        "Workload API (identity.sources: [workload_api]), which also needs listen.unix and "
        f"escalation.approvers. To try it locally: {TRY_LOCALLY.replace('%', '%%')}",
    )
    serve.add_argument(
        "--listen", metavar="ADDR",
        help="host:port replaces listen.tcp (listen.unix stays); unix:/path replaces listen.unix and turns "
        "listen.tcp off",
    )
    serve.add_argument("--policy", metavar="DIR", help="policy bundle directory, overriding policy.dir")
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser(
        "check",
        help="decide one call exactly as the server would (same OPA path) and print it as JSON (records no evidence)",
        description="Decide one tool call as if SUBJECT made it, and print "
        '{"outcome", "reasons", "decision_id", "policy_revision", ...} as JSON. '
        "Exit status: 0 allow, 3 deny, 4 escalate; 2 bad usage (e.g. --args not a JSON object), "
        "configuration, or a policy that cannot serve or be reached (policy.opa.url unreachable: the JSON "
        "shows the fail-closed deny the server would give).",
    )
    check.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config; its policy section says how OPA is reached (the file is validated as serve would). "
        "Without it the defaults apply; check needs no identity settings (the caller is --subject/--source)",
    )
    check.add_argument("--policy", metavar="DIR", help="policy bundle directory, overriding policy.dir")
    check.add_argument("--subject", required=True, metavar="SPIFFE_ID", help="the caller, e.g. spiffe://dev.local/agent")
    check.add_argument(
        "--source",
        default="dev",
        choices=["workload_api", "mtls", "jwt_svid", "dev"],
        help="input.subject.source to pretend (default dev); no dev-mode config is needed for it",
    )
    check.add_argument("--tool", required=True, type=name, metavar="NAME", help="tool name from the catalog")
    check.add_argument("--args", metavar="JSON", help="tool arguments as a JSON object")
    check.add_argument("--server", metavar="NAME", help="tool server the tool belongs to")
    check.add_argument(
        "--task",
        metavar="ID",
        help="task id, given to policy as input.task.id only: check keeps no tasks, so a task the server "
        "has ended is not refused here",
    )
    check.add_argument("--intent", metavar="TEXT", help="what the agent is trying to do")
    check.add_argument("--signals", metavar="JSON", help='model signals as a JSON object, e.g. {"risk_score": 0.9}')
    check.add_argument("--compact", action="store_true", help="print the JSON on one line")
    check.set_defaults(run=cmd_check)

    policy = commands.add_parser("policy", help="work with the policy bundle")
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    policy_test = policy_commands.add_parser(
        "test",
        help="run every test_* rule in *_test.rego with `opa test`; ends with 'N passed, M failed'",
        description="Run `opa test` on DIR: every test_* rule in its *_test.rego files. Each failing test is "
        "printed as FAIL file:line: rule, with OPA's values for the expression that failed; the last line is "
        "'N passed, M failed'. Exit status: 0 every test passed (and, with --lint, `opa check --strict` found "
        "nothing), 1 a test or the lint failed, DIR could not be loaded or holds no test, 2 DIR is not a "
        "directory or no OPA binary.",
    )
    policy_test.add_argument("--config", metavar="FILE", help="YAML config: only policy.opa.binary (OPA) is read from it")
    policy_test.add_argument("--lint", action="store_true", help="also run `opa check --strict` (a problem counts as a failure)")
    policy_test.add_argument("dir", nargs="?", default="rego", help="policy bundle directory (default rego)")
    policy_test.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    policy_test.add_argument(
        "--trace", action="store_true",
        help="under a failing test, OPA's whole trace (`opa test --explain fails`) instead of the expression that failed",
    )
    policy_test.set_defaults(run=cmd_policy_test)
    policy_replay = policy_commands.add_parser(
        "replay",
        help="re-decide recorded decisions with a candidate bundle and show what would change",
        description="Re-decide every recorded decision (evidence records with `input`) with OPA on a "
        "candidate bundle. Exit status: 0 done, 1 a decision changed to a --fail-on outcome (or the "
        "candidate could not decide one), 2 bad usage (e.g. --evidence or --policy is not a directory) or the "
        "candidate is refused (opa check/test/build), "
        "3 nothing to replay, 4 the evidence log fails verification.",
    )
    policy_replay.add_argument("--evidence", required=True, metavar="DIR", help="the evidence directory (an export of evidence.dir)")
    policy_replay.add_argument("--policy", required=True, metavar="DIR", help="the candidate bundle directory")
    policy_replay.add_argument("--since", metavar="TIME", help="RFC 3339 time or a duration back from now (15m, 2h, 7d)")
    policy_replay.add_argument("--until", metavar="TIME", help="RFC 3339 time or a duration back from now")
    policy_replay.add_argument("--tool", metavar="NAME", help="only this tool's decisions")
    policy_replay.add_argument("--subject", metavar="SPIFFE_ID", help="this SPIFFE ID or the IDs under it")
    policy_replay.add_argument("--json", action="store_true", help="one JSON object per changed decision on stdout")
    policy_replay.add_argument(
        "--fail-on", action="append", choices=["allow", "deny", "escalate"], metavar="OUTCOME",
        help="exit 1 when any decision changes to this outcome (allow, deny, escalate; repeatable)",
    )
    policy_replay.add_argument("--no-verify", action="store_true", help="replay a log that `evidence verify` rejects")
    policy_replay.add_argument("--config", metavar="FILE", help="YAML config: only policy.opa.binary (OPA) is read from it")
    policy_replay.set_defaults(run=cmd_policy_replay)

    evidence = commands.add_parser("evidence", help="check and read the hash-chained evidence log")
    evidence_commands = evidence.add_subparsers(dest="evidence_command", metavar="SUBCOMMAND", required=True)
    verify = evidence_commands.add_parser(
        "verify",
        help="check chain, hashes, sequence, checkpoints and signatures against your trust anchors",
        description="Check an evidence directory (docs/evidence.md). With --key or --bundle every record must be "
        "covered by a checkpoint a trusted signer signed (INTACT, exit 0); records after the last one are NOT YET "
        "COVERED (exit 3). Without anchors only internal consistency is checked (CONSISTENT, exit 0). "
        "BROKEN (exit 1) names the first broken seq and what is wrong. Exit 2: bad usage, e.g. DIR is not a "
        "directory or a --key or --bundle file holds no key.",
    )
    verify.add_argument("dir", help="the evidence directory (evidence.dir)")
    verify.add_argument(
        "--key",
        action="append",
        metavar="PEM",
        help="public key (or certificate) that must have signed the checkpoints; may repeat",
    )
    verify.add_argument("--bundle", metavar="PEM", help="trust bundle: checkpoint signers' SVIDs must chain to it")
    verify.add_argument(
        "--signer",
        action="append",
        metavar="SPIFFE_ID",
        help="with --bundle: the SVID that signs must have this SPIFFE ID (* matches any run); may repeat",
    )
    verify.add_argument("--mirror", metavar="FILE", help="checkpoint mirror (default DIR-checkpoints.jsonl beside DIR)")
    verify.add_argument(
        "--log-id", type=log_id, metavar="ID",
        help="the log_id the log must have (its startup records and checkpoints name it; `verify` prints it as "
        "'log id:'): another log put in its place, even one signed with the same key, is BROKEN",
    )
    verify.set_defaults(run=cmd_evidence_verify)
    show = evidence_commands.add_parser(
        "show",
        help="print matching records as a table, or as JSON lines with --json",
        description="Print the records of an evidence directory that match every filter given. "
        "Exit 0 (also when nothing matches), 2 when DIR holds no evidence log.",
    )
    show.add_argument("dir", help="the evidence directory (evidence.dir)")
    show.add_argument("--tool", metavar="NAME", help="only records of this tool")
    show.add_argument("--subject", metavar="SPIFFE_ID", help="this SPIFFE ID or the IDs under it")
    show.add_argument("--outcome", choices=OUTCOMES, metavar="OUTCOME",
                      help=f"only records with this outcome: {', '.join(OUTCOMES)}")
    show.add_argument("--since", metavar="TIME", help="RFC 3339 time or a duration back from now (15m, 2h, 7d)")
    show.add_argument("--decision-id", metavar="ID", help="only the records of this decision_id")
    show.add_argument("--kind", choices=KINDS, metavar="KIND", help=f"only records of this kind: {', '.join(KINDS)}")
    show.add_argument("--limit", type=count, default=0, metavar="N", help="stop after N records (default 0: all)")
    show.add_argument("--json", action="store_true", help="one canonical JSON record per line")
    show.set_defaults(run=cmd_evidence_show)

    from sidecar.escalation.cli import add_commands as add_escalation_commands

    add_escalation_commands(commands)  # approvals list|show|approve|deny, console
    from sidecar.invoke.rollback import add_commands as add_rollback_command

    add_rollback_command(commands)  # rollback DECISION_ID (docs/mcp.md#rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = LOG_LEVELS[args.log_level]
    # Libraries' INFO (httpx2's "HTTP Request: ...", aiohttp's access lines) is not ours to print among a
    # command's output: they speak from WARNING up, unless DEBUG asks for everything.
    logging.basicConfig(
        level=level if level == logging.DEBUG else max(level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("sidecar").setLevel(level)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return status
    except ConfigError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `agent-sidecar approvals list | head`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's final flush cannot raise again (Python's signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
