"""A stand-in agent for the example pod: it asks its sidecar about a few tool calls, forever.

It uses the sidecar's client library (the image is the sidecar's own) over
the unix socket the two containers share, and prints one JSON line per
decision, so `kubectl -n agents logs research-agent-0 -c agent` shows what policy
said and each call appears as a trace in Jaeger.

    SIDECAR_ADDRESS   unix:/run/agent-sidecar/sidecar.sock (default)
    DEMO_INTERVAL     seconds between rounds (default 15)
    python demo_agent.py --once      one round, then exit (0 if every call was answered)
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import grpc

from sidecar.client import Client

CALLS = [
    ("search_docs", {"query": "rollout checklist"}, {"risk_score": 0.1}),
    ("read_file", {"path": "/workspace/notes/plan.md"}, {"risk_score": 0.1}),
    ("http_get", {"url": "https://example.org/status"}, {"risk_score": 0.2}),
    # Granted, but the model's risk score is over the policy's threshold: a person
    # decides in the approvers' console (docs/deploy.md "Approve an escalation").
    ("create_ticket", {"title": "Rotate the staging database password"}, {"risk_score": 0.85}),
    # Not granted to this agent: denied.
    ("send_email", {"to": ["ops@example.org"], "subject": "done", "body": "all green"}, {"risk_score": 0.4}),
    ("delete_records", {"table": "orders", "ids": [1]}, {"risk_score": 0.9}),
]


def one_round(client: Client, task_id: str) -> bool:
    answered = True
    for tool, arguments, signals in CALLS:
        try:
            result = client.authorize(tool, arguments, task_id=task_id, intent="demo round", signals=signals)
        except grpc.RpcError as exc:
            answered = False
            print(json.dumps({"tool": tool, "error": f"{exc.code().name}: {exc.details()}"}), flush=True)
            continue
        print(
            json.dumps(
                {
                    "tool": tool,
                    "outcome": result.outcome,
                    "reasons": list(result.reasons),
                    "decision_id": result.decision_id,
                    "escalation_id": result.escalation_id,
                    "trace_id": result.trace_id,
                    "policy_revision": result.policy_revision,
                }
            ),
            flush=True,
        )
    return answered


def main(argv: list[str]) -> int:
    address = os.environ.get("SIDECAR_ADDRESS", "unix:/run/agent-sidecar/sidecar.sock")
    interval = float(os.environ.get("DEMO_INTERVAL", "15"))
    with Client(address) as client:
        while True:
            answered = one_round(client, f"demo-{uuid.uuid4().hex[:8]}")
            if "--once" in argv:
                return 0 if answered else 1
            time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
