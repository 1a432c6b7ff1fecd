"""`agent-sidecar`: serve the sidecar, try one decision, test policies.

Each subcommand is a small function over the same stages the server uses.
Exit status: 0 success, 1 a check failed (e.g. policy tests), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any, Sequence

from sidecar.config import ConfigError, load_config

DESCRIPTION = """\
agent-sidecar puts every AI-agent tool call through a verified SPIFFE
identity and Rego policy (allow / deny / escalate) before it runs.

  agent-sidecar serve --config examples/dev.yaml     run the sidecar
  agent-sidecar check --subject spiffe://dev.local/agent --tool read_file \\
      --args '{"path": "/workspace/notes.txt"}'       one decision, as JSON
  agent-sidecar policy test rego/                    run the *_test.rego tests
"""


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


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.policy.bundle import BundleError
    from sidecar.server import serve

    config = load_config(args.config, _config_overrides(args))
    try:
        asyncio.run(serve(config))
    except BundleError as exc:
        print(f"agent-sidecar: the policy in {config.policy.dir} cannot be served:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    return 0


def _json_object(text: str | None, option: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option}: not valid JSON: {exc}") from None


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.calls import ToolCall
    from sidecar.identity import CallerIdentity, Subject
    from sidecar.identity.spiffe_id import SpiffeIdError, validate_spiffe_id
    from sidecar.policy.bundle import BundleError
    from sidecar.server import build_engine, build_gate

    config = load_config(args.config, {**_config_overrides(args), "policy.reload": False})
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
        engine = build_engine(config)
        await engine.start()
        try:
            verdict = await build_gate(config, engine, recorder=None).authorize(call, CallerIdentity(subject))
        finally:
            await engine.close()
        decision = verdict.decision
        return {
            "outcome": decision.outcome,
            "reasons": list(decision.reasons),
            "decision_id": verdict.decision_id,
            "policy_revision": decision.policy_revision,
            "obligations": decision.obligations,
            "engine": decision.engine,
        }

    try:
        result = asyncio.run(decide())
    except BundleError as exc:
        print(f"agent-sidecar: the policy in {config.policy.dir} cannot be served:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=None if args.compact else 2, sort_keys=True))
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from sidecar.policy.bundle import BundleError, load_bundle
    from sidecar.policy.compiler import compile_decision, run_tests

    try:
        bundle = load_bundle(args.dir)
        compile_decision(bundle)
        results = run_tests(bundle)
    except BundleError as exc:
        for problem in exc.problems:
            print(f"ERROR {problem}")
        print("0 passed, 1 failed")
        return 1
    for result in results:
        if not result.passed:
            print(f"FAIL {result.file}:{result.line}: {result.rule}: {result.detail}")
        elif args.verbose:
            print(f"PASS {result.file}:{result.line}: {result.rule}")
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    if not results:
        print(f"no test_* rules found in {args.dir}/**/*_test.rego")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and results else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-sidecar", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the sidecar's gRPC server")
    serve.add_argument("--config", metavar="FILE", help="YAML config (docs/configuration.md); defaults apply without it")
    serve.add_argument("--listen", metavar="ADDR", help="host:port or unix:/path, overriding listen.* in the config")
    serve.add_argument("--policy", metavar="DIR", help="policy bundle directory, overriding policy.dir")
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser(
        "check",
        help="decide one call with the configured engine and print it as JSON (records no evidence)",
        description="Decide one tool call as if SUBJECT made it, and print "
        '{"outcome", "reasons", "decision_id", "policy_revision", ...} as JSON.',
    )
    check.add_argument("--config", metavar="FILE", help="YAML config; its policy section chooses the engine")
    check.add_argument("--policy", metavar="DIR", help="policy bundle directory, overriding policy.dir")
    check.add_argument("--subject", required=True, metavar="SPIFFE_ID", help="the caller, e.g. spiffe://dev.local/agent")
    check.add_argument(
        "--source",
        default="dev",
        choices=["workload_api", "mtls", "jwt_svid", "dev"],
        help="input.subject.source to pretend (default dev)",
    )
    check.add_argument("--tool", required=True, metavar="NAME", help="tool name from the catalog")
    check.add_argument("--args", metavar="JSON", help="tool arguments as a JSON object")
    check.add_argument("--server", metavar="NAME", help="tool server the tool belongs to")
    check.add_argument("--task", metavar="ID", help="task id")
    check.add_argument("--intent", metavar="TEXT", help="what the agent is trying to do")
    check.add_argument("--signals", metavar="JSON", help='model signals as a JSON object, e.g. {"risk_score": 0.9}')
    check.add_argument("--compact", action="store_true", help="print the JSON on one line")
    check.set_defaults(run=cmd_check)

    policy = commands.add_parser("policy", help="work with the policy bundle")
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    policy_test = policy_commands.add_parser(
        "test",
        help="run every test_* rule in *_test.rego; ends with 'N passed, M failed'",
    )
    policy_test.add_argument("dir", nargs="?", default="rego", help="policy bundle directory (default rego)")
    policy_test.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    policy_test.set_defaults(run=cmd_policy_test)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2
