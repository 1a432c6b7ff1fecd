"""What "the exact call" means: the fingerprint an approval is bound to.

    sha256( canonical_json({subject, delegation, tool, server, arguments_digest, task_id}) )

subject and delegation are verified SPIFFE IDs; arguments_digest is the sha256
of the arguments' RFC 8785 canonical JSON (the same digest as the evidence
record's), so key order and number spelling never matter but any change of a
value does. call_id, intent and signals are not part of it: a repeated call
may carry a new call id and its model may say other things about it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.canonical import canonical_json, sha256_digest


@dataclass(frozen=True)
class CallShape:
    subject: str
    delegation: tuple[str, ...]
    tool: str
    server: str
    arguments_digest: str
    task_id: str

    @property
    def fingerprint(self) -> str:
        return sha256_digest(
            canonical_json(
                {
                    "subject": self.subject,
                    "delegation": list(self.delegation),
                    "tool": self.tool,
                    "server": self.server,
                    "arguments_digest": self.arguments_digest,
                    "task_id": self.task_id,
                }
            )
        )


def differences(approved: CallShape, retry: CallShape) -> list[str]:
    """Human words for how a retry differs from the call that was escalated.

    Another subject's escalation is only said to be another caller's: what that call was (its
    subject, tool, server, task) is not for whoever presents its id to learn."""
    if retry.subject != approved.subject:
        return [f"another subject ({retry.subject}): the escalation is another caller's"]
    out = []
    if retry.delegation != approved.delegation:
        out.append("another delegation chain")
    if retry.tool != approved.tool:
        out.append(f"another tool ({retry.tool!r}, escalated for {approved.tool!r})")
    if retry.server != approved.server:
        out.append(f"another server ({retry.server!r}, escalated for {approved.server!r})")
    if retry.arguments_digest != approved.arguments_digest:
        out.append("different arguments")
    if retry.task_id != approved.task_id:
        out.append(f"another task ({retry.task_id!r}, escalated for {approved.task_id!r})")
    return out
