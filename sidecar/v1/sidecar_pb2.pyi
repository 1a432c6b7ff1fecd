import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ALLOW: _ClassVar[Outcome]
    OUTCOME_DENY: _ClassVar[Outcome]
    OUTCOME_ESCALATE: _ClassVar[Outcome]

class EscalationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESCALATION_STATE_UNSPECIFIED: _ClassVar[EscalationState]
    ESCALATION_STATE_PENDING: _ClassVar[EscalationState]
    ESCALATION_STATE_APPROVED: _ClassVar[EscalationState]
    ESCALATION_STATE_DENIED: _ClassVar[EscalationState]
    ESCALATION_STATE_EXPIRED: _ClassVar[EscalationState]
    ESCALATION_STATE_USED: _ClassVar[EscalationState]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ALLOW: Outcome
OUTCOME_DENY: Outcome
OUTCOME_ESCALATE: Outcome
ESCALATION_STATE_UNSPECIFIED: EscalationState
ESCALATION_STATE_PENDING: EscalationState
ESCALATION_STATE_APPROVED: EscalationState
ESCALATION_STATE_DENIED: EscalationState
ESCALATION_STATE_EXPIRED: EscalationState
ESCALATION_STATE_USED: EscalationState

class AuthorizeRequest(_message.Message):
    __slots__ = ("tool", "arguments", "call_id", "task_id", "intent", "signals", "escalation_id", "server")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    tool: str
    arguments: _struct_pb2.Struct
    call_id: str
    task_id: str
    intent: str
    signals: _struct_pb2.Struct
    escalation_id: str
    server: str
    def __init__(self, tool: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., call_id: _Optional[str] = ..., task_id: _Optional[str] = ..., intent: _Optional[str] = ..., signals: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., escalation_id: _Optional[str] = ..., server: _Optional[str] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("outcome", "reasons", "decision_id", "escalation_id", "policy_revision", "trace_id", "obligations", "arguments_digest")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    OBLIGATIONS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    reasons: _containers.RepeatedScalarFieldContainer[str]
    decision_id: str
    escalation_id: str
    policy_revision: str
    trace_id: str
    obligations: _struct_pb2.Struct
    arguments_digest: str
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., decision_id: _Optional[str] = ..., escalation_id: _Optional[str] = ..., policy_revision: _Optional[str] = ..., trace_id: _Optional[str] = ..., obligations: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., arguments_digest: _Optional[str] = ...) -> None: ...

class AwaitDecisionRequest(_message.Message):
    __slots__ = ("escalation_id", "timeout_seconds")
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    escalation_id: str
    timeout_seconds: float
    def __init__(self, escalation_id: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class Escalation(_message.Message):
    __slots__ = ("escalation_id", "state", "subject", "delegation", "tool", "server", "arguments_digest", "arguments_preview", "task_id", "reasons", "policy_revision", "trace_id", "created_at", "expires_at", "approver", "decided_at", "note", "intent", "signals", "tool_catalog", "arguments", "arguments_withheld", "agent_waiting", "agent_seen_at", "subject_source")
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CATALOG_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_WITHHELD_FIELD_NUMBER: _ClassVar[int]
    AGENT_WAITING_FIELD_NUMBER: _ClassVar[int]
    AGENT_SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    escalation_id: str
    state: EscalationState
    subject: str
    delegation: _containers.RepeatedScalarFieldContainer[str]
    tool: str
    server: str
    arguments_digest: str
    arguments_preview: _struct_pb2.Struct
    task_id: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    policy_revision: str
    trace_id: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    approver: str
    decided_at: _timestamp_pb2.Timestamp
    note: str
    intent: str
    signals: _struct_pb2.Struct
    tool_catalog: _struct_pb2.Struct
    arguments: _struct_pb2.Struct
    arguments_withheld: str
    agent_waiting: bool
    agent_seen_at: _timestamp_pb2.Timestamp
    subject_source: str
    def __init__(self, escalation_id: _Optional[str] = ..., state: _Optional[_Union[EscalationState, str]] = ..., subject: _Optional[str] = ..., delegation: _Optional[_Iterable[str]] = ..., tool: _Optional[str] = ..., server: _Optional[str] = ..., arguments_digest: _Optional[str] = ..., arguments_preview: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., task_id: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., policy_revision: _Optional[str] = ..., trace_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., approver: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., note: _Optional[str] = ..., intent: _Optional[str] = ..., signals: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tool_catalog: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., arguments_withheld: _Optional[str] = ..., agent_waiting: _Optional[bool] = ..., agent_seen_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., subject_source: _Optional[str] = ...) -> None: ...

class AwaitDecisionResponse(_message.Message):
    __slots__ = ("escalation", "timed_out")
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    escalation: Escalation
    timed_out: bool
    def __init__(self, escalation: _Optional[_Union[Escalation, _Mapping]] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("call",)
    CALL_FIELD_NUMBER: _ClassVar[int]
    call: AuthorizeRequest
    def __init__(self, call: _Optional[_Union[AuthorizeRequest, _Mapping]] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("decision", "result", "error", "status", "upstream_status")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    decision: AuthorizeResponse
    result: _struct_pb2.Struct
    error: str
    status: str
    upstream_status: int
    def __init__(self, decision: _Optional[_Union[AuthorizeResponse, _Mapping]] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[str] = ..., status: _Optional[str] = ..., upstream_status: _Optional[int] = ...) -> None: ...

class EndTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class EndTaskResponse(_message.Message):
    __slots__ = ("task_id", "ended_at", "already_ended", "evidence_seq", "evidence_hash", "trace_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ENDED_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_HASH_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    ended_at: str
    already_ended: bool
    evidence_seq: int
    evidence_hash: str
    trace_id: str
    def __init__(self, task_id: _Optional[str] = ..., ended_at: _Optional[str] = ..., already_ended: _Optional[bool] = ..., evidence_seq: _Optional[int] = ..., evidence_hash: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class ListEscalationsRequest(_message.Message):
    __slots__ = ("state", "subject", "tool", "limit", "approver")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    state: EscalationState
    subject: str
    tool: str
    limit: int
    approver: str
    def __init__(self, state: _Optional[_Union[EscalationState, str]] = ..., subject: _Optional[str] = ..., tool: _Optional[str] = ..., limit: _Optional[int] = ..., approver: _Optional[str] = ...) -> None: ...

class ListEscalationsResponse(_message.Message):
    __slots__ = ("escalations",)
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    escalations: _containers.RepeatedCompositeFieldContainer[Escalation]
    def __init__(self, escalations: _Optional[_Iterable[_Union[Escalation, _Mapping]]] = ...) -> None: ...

class GetEscalationRequest(_message.Message):
    __slots__ = ("escalation_id", "approver")
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    escalation_id: str
    approver: str
    def __init__(self, escalation_id: _Optional[str] = ..., approver: _Optional[str] = ...) -> None: ...

class DecideEscalationRequest(_message.Message):
    __slots__ = ("escalation_id", "note", "approver")
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    escalation_id: str
    note: str
    approver: str
    def __init__(self, escalation_id: _Optional[str] = ..., note: _Optional[str] = ..., approver: _Optional[str] = ...) -> None: ...

class WatchEscalationsRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: EscalationState
    def __init__(self, state: _Optional[_Union[EscalationState, str]] = ...) -> None: ...
