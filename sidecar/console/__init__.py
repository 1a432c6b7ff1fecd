"""The approvers' web console (`agent-sidecar console`): see app.py and docs/escalation.md."""
