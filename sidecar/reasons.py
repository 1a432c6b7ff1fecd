"""The reason codes the sidecar itself gives, and the one value that carries a reason.

Every reason on the wire (gRPC `reasons`, Approvals and EndTask status
messages, MCP errors, `InvocationResult.error`, evidence records, spans) is
the text `"<code>: <text>"`: the code is stable and low-cardinality (metrics,
span attributes and people filter on it), the text says why for a person.
Producers write `str(Reason(CODE, text))` with a constant below, so a code is
spelled once; readers split a reason with `parse`. Policy's own codes (rego/)
are the policy's and stay plain strings. docs/api.md has the table for users.

    call checks (calls.py, servicer.py, mcp/gateway.py), before policy:
    invalid_tool            the tool name is empty, too long, or holds control characters or NUL
    invalid_server          the server is too long, not text, or holds NUL
    invalid_call_id         the call id is too long, not text, or holds NUL
    invalid_task_id         the task id is too long, not text, or holds NUL
    invalid_escalation_id   the escalation id is too long, not text, or holds NUL
    invalid_intent          the intent is too long, not text, or holds NUL
    invalid_arguments       arguments are not a JSON object, hold NUL, an inexact number or two spellings of one key
                            name (also invoke/http.py: the URL needs an argument the call lacks; invoke/schemas.py:
                            the tool's input schema would read them as another value)
    invalid_signals         signals are not a JSON object, hold NUL or an inexact number
    input_too_large         arguments or signals over policy.max_input_bytes
    input_too_deep          arguments or signals nested past policy.max_depth
    malformed_request       a gRPC or MCP message that could not be parsed at all (also Approvals, EndTask)

    admission (gate.py, overload.py, policy/opa/client.py, usage/):
    unverified_caller       the caller's identity could not be verified (also Approvals, MCP tools/list)
    call_id_reused          the call id was used for a different tool call
    overloaded              too many decisions waiting for OPA, or the event loop runs too late
    usage_unavailable       the usage store could not count the call for input.usage

    policy (policy/opa/client.py, policy/opa/service.py, policy/shadow.py, gate.py), fail closed:
    policy_error            OPA failed on the query, or could not be asked
    policy_malformed        OPA answered no decision or a malformed one, or obligations with inexact numbers
    policy_timeout          OPA did not answer within the budget
    policy_unavailable      OPA cannot be reached, the breaker is open, or no policy is serving

    evidence (gate.py, tasks.py, invoke/executor.py, escalation/evidence.py, servicer.py):
    evidence_unavailable    the decision, invocation or task_end could not be recorded durably

    a call repeated with an escalation id (escalation/service.py, escalation/evidence.py, gate.py):
    escalation_unknown      no such escalation in this sidecar's store (also Approvals: NOT_FOUND)
    escalation_mismatch     the escalation was made for another call
    escalation_denied       a person denied the escalation
    escalation_expired      nobody decided in time (also Approvals: deciding too late)
    escalation_pending      nobody has decided yet
    escalation_unavailable  the escalation store failed (also Approvals: UNAVAILABLE)
    approval_unused         the approval was not used within escalation.use_window_seconds
    approval_used           the approval was already used by an earlier call (also Approvals)
    approval_unusable       the escalation is in a state no call can use
    approval_insufficient   policy still escalates the call with this approval

    Approvals and AwaitDecision refusals (escalation/grpc_api.py, service.py, approvers.py):
    already_decided         someone decided the escalation first
    self_approval           the approver is the call's own subject
    delegation_approval     the approver is in the call's delegation chain
    not_an_approver         the caller is not among escalation.approvers
    approver_not_verified   the approver field was given by a caller not allowed to name one, or the
                            caller is the pod identity (the sidecar's own ID), which the agent shares
    approver_not_a_person   a console relayed a workload (spiffe://) as the approver
    delegated_approval      an Approvals call (an approval or a read) sent through a delegation chain
    invalid_approver        the approver field is not an identity
    invalid_note            the note is too long or holds control characters
    invalid_timeout         AwaitDecision's timeout_seconds is not a finite number >= 0
    not_your_escalation     AwaitDecision on another subject's escalation
    arguments_not_kept      why an escalation's unredacted arguments are withheld (arguments_withheld)

    tasks (tasks.py, servicer.py EndTask):
    task_ended              the call's task was ended (EndTask or idle timeout)
    not_task_owner          a call under, or EndTask of, a task another agent owns
    invalid_task            EndTask with an empty or over-long task id
    task_state_unavailable  the task store (tasks.db in evidence.dir) could not be read or written

    invocation (invoke/, servicer.py Invoke, mcp/gateway.py), in InvocationResult.error or as a deny:
    unknown_tool            no upstream or HTTP tool serves this tool
    upstream_unavailable    connection refused or reset, TLS failure, upstream process gone (also a deny: the
                            gateway could not read the tool's input schema)
    upstream_timeout        no answer within the upstream's timeout
    upstream_malformed      an answer that is not the protocol's, or cannot reach the agent exactly
    upstream_too_large      a result over the configured size cap
    upstream_error          the upstream answered a protocol error (JSON-RPC error, HTTP 5xx)
    credential_unavailable  the upstream's credential could not be had: no call
    obligation_unknown      policy asked for an obligation this sidecar cannot apply: no call
    obligation_inapplicable a known obligation that does not fit the arguments: no call
    invoker_error           the invoker raised instead of answering (a bug); recorded as a failed call
"""

from __future__ import annotations

from dataclasses import dataclass

INVALID_TOOL = "invalid_tool"
INVALID_SERVER = "invalid_server"
INVALID_CALL_ID = "invalid_call_id"
INVALID_TASK_ID = "invalid_task_id"
INVALID_ESCALATION_ID = "invalid_escalation_id"
INVALID_INTENT = "invalid_intent"
INVALID_ARGUMENTS = "invalid_arguments"
INVALID_SIGNALS = "invalid_signals"
INPUT_TOO_LARGE = "input_too_large"
INPUT_TOO_DEEP = "input_too_deep"
MALFORMED_REQUEST = "malformed_request"

UNVERIFIED_CALLER = "unverified_caller"
CALL_ID_REUSED = "call_id_reused"
OVERLOADED = "overloaded"
USAGE_UNAVAILABLE = "usage_unavailable"

POLICY_ERROR = "policy_error"
POLICY_MALFORMED = "policy_malformed"
POLICY_TIMEOUT = "policy_timeout"
POLICY_UNAVAILABLE = "policy_unavailable"

EVIDENCE_UNAVAILABLE = "evidence_unavailable"

ESCALATION_UNKNOWN = "escalation_unknown"
ESCALATION_MISMATCH = "escalation_mismatch"
ESCALATION_DENIED = "escalation_denied"
ESCALATION_EXPIRED = "escalation_expired"
ESCALATION_PENDING = "escalation_pending"
ESCALATION_UNAVAILABLE = "escalation_unavailable"
APPROVAL_UNUSED = "approval_unused"
APPROVAL_USED = "approval_used"
APPROVAL_UNUSABLE = "approval_unusable"
APPROVAL_INSUFFICIENT = "approval_insufficient"

ALREADY_DECIDED = "already_decided"
SELF_APPROVAL = "self_approval"
DELEGATION_APPROVAL = "delegation_approval"
NOT_AN_APPROVER = "not_an_approver"
APPROVER_NOT_VERIFIED = "approver_not_verified"
APPROVER_NOT_A_PERSON = "approver_not_a_person"
DELEGATED_APPROVAL = "delegated_approval"
INVALID_APPROVER = "invalid_approver"
INVALID_NOTE = "invalid_note"
INVALID_TIMEOUT = "invalid_timeout"
NOT_YOUR_ESCALATION = "not_your_escalation"
ARGUMENTS_NOT_KEPT = "arguments_not_kept"
TOO_LARGE_TO_LIST = "too_large_to_list"

TASK_ENDED = "task_ended"
NOT_TASK_OWNER = "not_task_owner"
INVALID_TASK = "invalid_task"
TASK_STATE_UNAVAILABLE = "task_state_unavailable"

UNKNOWN_TOOL = "unknown_tool"
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
UPSTREAM_TIMEOUT = "upstream_timeout"
UPSTREAM_MALFORMED = "upstream_malformed"
UPSTREAM_TOO_LARGE = "upstream_too_large"
UPSTREAM_ERROR = "upstream_error"
CREDENTIAL_UNAVAILABLE = "credential_unavailable"
OBLIGATION_UNKNOWN = "obligation_unknown"
OBLIGATION_INAPPLICABLE = "obligation_inapplicable"
INVOKER_ERROR = "invoker_error"

# Longest code `parse` accepts: past it, the text before ": " is prose, not a code.
_MAX_CODE_CHARS = 64

# Every code above: the sidecar's own, which the evidence redactor never reads as a secret key
# (`credential_unavailable: no JWT-SVID …` is a reason, not a credential).
SIDECAR_CODES = frozenset(
    value for name, value in list(globals().items()) if name.isupper() and isinstance(value, str) and name[0] != "_"
)


@dataclass(frozen=True)
class Reason:
    """One reason; `str()` is its wire form `"<code>: <text>"` (an empty text still keeps ": ")."""

    code: str
    text: str

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"


def parse(reason: str) -> Reason | None:
    """`reason` split at its first ": " into code and text; None when it carries no code.

    Policy may give reasons without one ("no rule allows this call"): no ": ", or what
    precedes it is empty, holds a space or is over 64 characters. The code is stripped.
    """
    code, sep, text = reason.partition(": ")
    code = code.strip()
    if not sep or not code or len(code) > _MAX_CODE_CHARS or " " in code:
        return None
    return Reason(code, text)
