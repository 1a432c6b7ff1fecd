"""`agent-sidecar approvals list | show ID | approve ID | deny ID` and `agent-sidecar console`.

The approvals commands are clients of a running sidecar's Approvals API
(`--address`, default $AGENT_SIDECAR_ADDRESS or 127.0.0.1:50051). Who
approves is whoever the sidecar verifies the caller to be; in dev mode
`--approver` names the person (e.g. email:alice@example.org).

Exit status: 0 done, 1 refused by the sidecar (the message says why),
2 bad usage or the sidecar could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import datetime, timezone
from typing import Any, Callable

from sidecar.argtypes import count, seconds
from sidecar.display import FLAG, NOTICE, cell, exact_json, flagged, needs_flag, json_text, value_needs_flag, visible
from sidecar.reasons import parse

DEFAULT_ADDRESS = "127.0.0.1:50051"
STATE_CHOICES = ["pending", "approved", "denied", "expired", "used", "all"]


def _client(args: argparse.Namespace):
    from sidecar.config import check_grpc_target, refuse_token_in_clear
    from sidecar.escalation.client import ApprovalsClient, token_file_metadata

    check_grpc_target(args.address, "--address (or $AGENT_SIDECAR_ADDRESS)")
    if args.token_file:
        refuse_token_in_clear(args.address, "--token-file")
    metadata = token_file_metadata(args.token_file) if args.token_file else None
    return ApprovalsClient(args.address, metadata=metadata, timeout=args.timeout)


def _run(args: argparse.Namespace, work: Callable[[Any], Any]) -> int:
    from sidecar.escalation.client import ApprovalsError

    async def go() -> Any:
        async with _client(args) as client:
            return await work(client)

    try:
        asyncio.run(go())
    except ApprovalsError as exc:
        if exc.unreachable:
            print(f"agent-sidecar: cannot reach the sidecar at {visible(args.address)}: {visible(exc.message)}",
                  file=sys.stderr)
            return 2
        print(f"agent-sidecar: refused: {visible(exc.message)}", file=sys.stderr)
        if exc.code == "self_approval" and not getattr(args, "approver", None):
            # The refusal a dev-mode newcomer meets first: name the fix, not only the rule.
            print("  (in dev mode every caller is the dev identity, the agent's own: name the person deciding "
                  "with --approver, e.g. --approver email:alice@example.org)", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # stdout's reader went away: sidecar.cli.main ends quietly
    except OSError as exc:  # e.g. --token-file unreadable
        print(f"agent-sidecar: {visible(exc)}", file=sys.stderr)
        return 2
    return 0


def _age(stamp: str, now: datetime) -> str:
    from sidecar.escalation.client import parse_time

    moment = parse_time(stamp)
    if moment is None:
        return "-"
    return human_duration((now - moment).total_seconds())


def human_duration(seconds: float) -> str:
    """3s, 4m, 2h05m, 3d: short and readable, negative as 'overdue'."""
    if seconds < 0:
        return "overdue"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def _until(stamp: str, now: datetime) -> str:
    from sidecar.escalation.client import parse_time

    moment = parse_time(stamp)
    if moment is None:
        return "-"
    return human_duration((moment - now).total_seconds())


def _reason_codes(reasons: list[str]) -> str:
    codes = []
    for reason in reasons:
        parsed = parse(reason)
        codes.append(parsed.code if parsed is not None else reason[:40])
    return ",".join(codes)


def format_table(rows: list[dict]) -> str:
    """One line per escalation; a cell that held control or invisible characters is escaped and starts with [!]."""
    if not rows:
        return "no escalations"
    now = datetime.now(timezone.utc)
    header = ["ID", "STATE", "AGE", "EXPIRES", "AGENT", "SUBJECT", "TOOL", "APPROVER", "REASONS"]
    table = [header]
    for e in rows:
        pending = e["state"] == "pending"
        expires = _until(e["expires_at"], now) if pending else "-"
        agent = ("waiting" if e.get("agent_waiting") else f"idle {_age(e.get('agent_seen_at', ''), now)}") if pending else "-"
        tool = cell(e["tool"]) + (f" ({cell(e['server'])})" if e["server"] else "")
        table.append([cell(e["escalation_id"]), cell(e["state"]), _age(e["created_at"], now), expires, agent,
                      cell(e["subject"]), tool, cell(e["approver"]) if e["approver"] else "-",
                      cell(_reason_codes(e["reasons"]))])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        cells = [str(c).ljust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    if any(flagged(row) for row in rows):
        lines.append(f"{FLAG} a value {NOTICE}; `approvals show ID` says which")
    return "\n".join(lines)


def _line(label: str, value: Any, suffix: str = "") -> str:
    """`label        value`; a value with hidden characters is escaped and the line ends with the flag."""
    text = "" if value is None else str(value)
    flag = f"   {FLAG} {NOTICE}" if needs_flag(text) else ""
    return f"{label:<12} {visible(text)}{suffix}{flag}"


def _item(value: str) -> str:
    return f"  - {visible(value)}" + (f"   {FLAG} {NOTICE}" if needs_flag(value) else "")


def agent_presence(e: dict, now: datetime) -> str:
    """Whether the agent still waits for this decision, in words (CLI and console)."""
    seen = _age(e.get("agent_seen_at", ""), now)
    last = f"last asked {seen} ago" if seen != "-" else "never asked since"
    if e["state"] != "pending":
        return last
    if e.get("agent_waiting"):
        return f"waiting now (AwaitDecision open; {last})"
    return f"not waiting ({last}): it may have given up; an approval still lets it repeat the call once"


def catalog_facts(e: dict) -> list[tuple[str, Any]]:
    """(label, value) of the tool's catalog entry as policy saw it: description, owner, risk, reversible."""
    entry = e.get("tool_catalog")
    if not isinstance(entry, dict):
        return [("catalog", "the tool is not in the catalog")]
    facts = []
    for key, label in (("description", "description"), ("owner", "owner"), ("risk", "risk")):
        facts.append((label, entry[key] if key in entry else "-"))
    reversible = entry.get("reversible")
    facts.append(("reversible", {True: "yes", False: "no (cannot be undone)"}.get(reversible, "-")
                  if isinstance(reversible, bool) or reversible is None else reversible))
    return facts


def kept_out_of_the_log(arguments: Any, preview: Any) -> list[str]:
    """Paths (`a.b[2]`) of the full arguments that the redacted preview (and so the evidence log) hides."""
    from sidecar.evidence.redaction import REDACTED

    paths: list[str] = []
    stack = [(arguments, preview, "")]
    while stack:
        full, shown, where = stack.pop()
        if isinstance(full, dict) and isinstance(shown, dict):
            for key in sorted(full):
                here = f"{where}.{key}" if where else key
                if key in shown:
                    if shown[key] == REDACTED and full[key] != REDACTED:
                        paths.append(here)
                    else:
                        stack.append((full[key], shown[key], here))
        elif isinstance(full, list) and isinstance(shown, list):
            stack.extend((f, p, f"{where}[{i}]") for i, (f, p) in enumerate(zip(full, shown)))
    return sorted(paths)


def _block(value: Any, what: str) -> list[str]:
    lines = []
    if value_needs_flag(value):
        lines.append(f"  {FLAG} {what} {NOTICE} as JSON escapes")
    return lines + ["  " + line for line in json_text(value).splitlines()]


def format_detail(e: dict) -> str:
    """`approvals show`: every value from outside shown escaped when it holds hidden characters, and flagged."""
    now = datetime.now(timezone.utc)
    lines = []
    suspicious = flagged(e)
    if suspicious:
        lines.append(f"WARNING {FLAG} {', '.join(suspicious)} {NOTICE} (\\x1b, \\u202e, ...): "
                     "what you read below is what the agent sent, made visible")
    lines += [
        _line("escalation", e["escalation_id"]),
        _line("state", e["state"]),
        _line("agent", agent_presence(e, now)),
        _line("subject", e["subject"], f" ({visible(e['subject_source'])})" if e.get("subject_source") else ""),
    ]
    if e["delegation"]:
        hops = " -> ".join(visible(d) for d in e["delegation"])
        lines.append(f"delegation   {hops}" + (f"   {FLAG} {NOTICE}" if value_needs_flag(e["delegation"]) else ""))
    lines += [
        _line("tool", e["tool"]),
    ]
    if e["server"]:
        lines.append(_line("server", e["server"]))
    lines += [_line(label, value) for label, value in catalog_facts(e)]
    lines += [
        _line("task", e["task_id"] or "-"),
        _line("intent", e.get("intent") or "-"),
        _line("created", e["created_at"], f" ({_age(e['created_at'], now)} ago)"),
        _line("expires", e["expires_at"], f" (in {_until(e['expires_at'], now)})" if e["state"] == "pending" else ""),
    ]
    if e["approver"]:
        lines.append(_line("decided by", e["approver"], f" at {visible(e['decided_at'])}"))
    if e["note"]:
        lines.append(_line("note", e["note"]))
    lines.append(_line("trace", e["trace_id"] or "-"))
    lines.append(_line("policy", e["policy_revision"] or "-"))
    lines.append("reasons")
    lines += [_item(reason) for reason in e["reasons"]]
    if e.get("signals"):
        lines.append("signals      what the agent's model said")
        lines += _block(e["signals"], "the signals")
    else:
        lines.append("signals      -")
    lines.append(_line("arguments", e["arguments_digest"]))
    if e.get("arguments") is not None:
        lines.append("  in full, exactly as the tool will receive them:")
        lines += _block(e["arguments"], "the arguments")
        hidden_from_log = kept_out_of_the_log(e["arguments"], e["arguments_preview"])
        if hidden_from_log:
            lines.append(_line("  kept out of the evidence log:", ", ".join(hidden_from_log)))
    elif e["arguments_preview"] is not None:
        lines.append("  redacted preview; in full only to an approver who may decide it")
        if e.get("arguments_withheld"):
            lines.append(_line("  withheld", e["arguments_withheld"]))
        lines += _block(e["arguments_preview"], "the arguments")
    else:
        lines.append(_line("  not kept", e.get("arguments_withheld") or "-"))
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    async def work(client: Any) -> None:
        state = "" if args.state == "all" else args.state
        rows = await client.list(state=state, subject=args.subject or "", tool=args.tool or "", limit=args.limit,
                                 approver=args.approver or "")
        if args.json:
            for row in rows:
                print(exact_json(row, sort_keys=True))
        else:
            print(format_table(rows))

    return _run(args, work)


def cmd_show(args: argparse.Namespace) -> int:
    async def work(client: Any) -> None:
        row = await client.get(args.id, approver=args.approver or "")
        print(exact_json(row, sort_keys=True, indent=2) if args.json else format_detail(row))

    return _run(args, work)


def _decide(args: argparse.Namespace, approve: bool) -> int:
    async def work(client: Any) -> None:
        method = client.approve if approve else client.deny
        row = await method(args.id, note=args.note or "", approver=args.approver or "")
        if args.json:
            print(exact_json(row, sort_keys=True, indent=2))
        else:
            verb = "approved" if approve else "denied"
            print(f"{verb} {cell(row['escalation_id'])} ({cell(row['tool'])} for {cell(row['subject'])}) "
                  f"as {cell(row['approver'])}")
            if approve:
                # An MCP agent sends no id: the gateway matches the repeated call to its escalation.
                print("the agent may now repeat the call once, with this escalation id "
                      "(through the MCP gateway: the same call, which the gateway matches to it)")

    return _run(args, work)


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, True)


def cmd_deny(args: argparse.Namespace) -> int:
    return _decide(args, False)


def cmd_console(args: argparse.Namespace) -> int:
    from sidecar.config import ConfigError, load_command_config, outside_dev_mode
    from sidecar.console.app import ConsoleError, run_console

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["console.listen"] = args.listen
    if args.sidecar:
        overrides["console.sidecar"] = args.sidecar
    # The console serves no agent: its own settings are checked at start (validate_console).
    config = load_command_config("console", args.config, overrides)
    try:
        asyncio.run(run_console(config))
    except ConsoleError as exc:
        raise ConfigError(str(exc)) from None
    except ConfigError as exc:
        raise outside_dev_mode(exc, "console", args.config, config) from None
    return 0


def _common(parser: argparse.ArgumentParser, *, json_help: str = "print JSON") -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("AGENT_SIDECAR_ADDRESS", DEFAULT_ADDRESS),
        metavar="ADDR",
        help=f"the sidecar: host:port or unix:/path (default $AGENT_SIDECAR_ADDRESS, else {DEFAULT_ADDRESS}); "
        "spoken in plaintext gRPC, so a sidecar off this pod is reached through a TLS relay on loopback",
    )
    parser.add_argument("--token-file", metavar="FILE", help="a JWT-SVID to present (authorization: Bearer); "
                        "refused with an --address that is neither unix: nor loopback (it would go in clear)")
    parser.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS", help="per-call deadline in seconds (default %(default)s)")
    parser.add_argument("--json", action="store_true", help=json_help)


def _approver(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--approver",
        metavar="IDENTITY",
        help="dev mode only: who you are (e.g. email:alice@example.org); without it you are the dev identity, "
        "the agent's own, which may not decide its calls (self_approval). Outside dev mode your verified "
        "identity counts",
    )


def add_commands(commands: Any) -> None:
    """Register `approvals ...` and `console` on the main parser's subcommands."""
    approvals = commands.add_parser(
        "approvals",
        help="list, show, approve and deny escalated calls on a running sidecar",
        description="Work with escalations through a sidecar's Approvals API (docs/escalation.md). "
        "Exit 0 done, 1 refused (the message says why), 2 unreachable or bad usage.",
    )
    sub = approvals.add_subparsers(dest="approvals_command", metavar="SUBCOMMAND", required=True)

    listing = sub.add_parser(
        "list",
        help="a table of escalations (pending by default)",
        description="The sidecar's escalations, newest first, as a table (--json: one object per line): the "
        "pending ones unless --state says otherwise; AGENT says `waiting` while the agent waits for the "
        "decision. Exit 0 listed (none too), 1 refused (the message says why: not_an_approver, ...), 2 the "
        "sidecar unreachable or bad usage.",
    )
    _common(listing, json_help="one JSON object per line")
    listing.add_argument("--state", choices=STATE_CHOICES, default="pending", help="default pending; all for every state")
    listing.add_argument("--subject", metavar="SPIFFE_ID", help="only this caller's")
    listing.add_argument("--tool", metavar="NAME", help="only calls of this tool")
    listing.add_argument("--limit", type=count, default=100, metavar="N", help="at most N, newest first")
    _approver(listing)
    listing.set_defaults(run=cmd_list)

    show = sub.add_parser(
        "show",
        help="one escalation: who, what, why, the tool, the agent's intent and the arguments (in full when you "
        "may decide it)",
        description="One escalation whole: who asked, for which tool, why policy escalated it, the agent's "
        "intent and signals, and the arguments (in full only to someone who may decide it, else why not). "
        "Exit 0 shown, 1 refused (the message says why: escalation_unknown, ...), 2 the sidecar unreachable "
        "or bad usage.",
    )
    _common(show)
    show.add_argument("id", metavar="ID", help="escalation id (esc-...)")
    _approver(show)
    show.set_defaults(run=cmd_show)

    for name, run, verb in (("approve", cmd_approve, "approve"), ("deny", cmd_deny, "deny")):
        decide = sub.add_parser(
            name,
            help=f"{verb} a pending escalation" + (" (the agent may repeat the call once)" if name == "approve" else ""),
            description=(
                "Approve a pending escalation: the agent may repeat the same call once, within "
                "escalation.use_window_seconds. " if name == "approve" else
                "Deny a pending escalation, for good: the agent's repeated call is denied (escalation_denied, "
                "with your note). "
            ) + "Exit 0 done, 1 refused (the message says why: already_decided, self_approval, not_an_approver, "
            "...), 2 the sidecar unreachable or bad usage.",
        )
        _common(decide)
        decide.add_argument("id", metavar="ID", help="escalation id (esc-...)")
        decide.add_argument("--note", metavar="TEXT", help="why; kept with the decision and in the evidence log")
        _approver(decide)
        decide.set_defaults(run=run)

    console = commands.add_parser(
        "console",
        help="serve the approvers' web page (behind an auth proxy; docs/escalation.md)",
        description="Serve the approvers' web console: pending escalations with Approve/Deny and a history. "
        "It talks to the sidecar's Approvals API; configure it under `console:` (docs/configuration.md). "
        "Serves until SIGINT/SIGTERM (exit 0); exit 2 when it cannot start: the config is refused (outside "
        "dev mode it needs console.trusted_header and console.token_file) or console.listen is in use.",
    )
    console.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config; its console section is used. Outside dev mode (identity.sources other than [dev], "
        "the default) console.trusted_header and console.token_file are required; to try it locally: "
        "--config examples/dev.yaml",
    )
    console.add_argument("--listen", metavar="HOST:PORT", help="overrides console.listen")
    console.add_argument("--sidecar", metavar="ADDR", help="the sidecar's address, overrides console.sidecar")
    console.set_defaults(run=cmd_console)
