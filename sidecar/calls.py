"""One tool call as the sidecar sees it, and the checks made before policy runs.

A call that fails these checks is still decided (deny, with reasons a person
understands) and still recorded; it just never reaches the policy engine.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterator

from sidecar.canonical import NotCanonicalizable, canonical_json, plain_form, sha256_digest
from sidecar.jsonvalues import normalize, number_problems, spelled
from sidecar.reasons import (
    INPUT_TOO_DEEP,
    INPUT_TOO_LARGE,
    INVALID_ARGUMENTS,
    INVALID_CALL_ID,
    INVALID_ESCALATION_ID,
    INVALID_INTENT,
    INVALID_SERVER,
    INVALID_SIGNALS,
    INVALID_TASK_ID,
    INVALID_TOOL,
    Reason,
)

MAX_TOOL_NAME_BYTES = 256
MAX_ID_BYTES = 256
MAX_INTENT_BYTES = 4096


@dataclass(frozen=True)
class ToolCall:
    tool: str
    arguments: Any
    call_id: str = ""
    task_id: str = ""
    intent: str = ""
    signals: Any = None
    escalation_id: str = ""
    server: str = ""


def normalized(call: ToolCall) -> ToolCall:
    """The call with the numbers rule applied to arguments and signals (1.0 → 1), as every door must see it."""
    return replace(call, arguments=normalize(call.arguments), signals=normalize(call.signals))


def depth_of(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting stops once past `limit`."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _key_text(key: Any) -> str:
    """A key escaped (ASCII, JSON escapes), at most 64 characters."""
    text = json.dumps(str(key), ensure_ascii=True)[1:-1]
    return text if len(text) <= 64 else text[:63] + "…"


def _key_path(parent: str, key: Any) -> str:
    """`arguments` + "path" → `arguments.path`; other keys quoted and escaped (_key_text)."""
    text = _key_text(key)
    return f"{parent}.{text}" if isinstance(key, str) and key.isascii() and key.isidentifier() else f'{parent}["{text}"]'


def find_nul(value: Any, label: str) -> str | None:
    """Where the first string holding U+0000 is in `value` ("arguments.files[2]", "a key in arguments.meta"), or None.

    Keys are strings too. Walks iteratively, so depth is no limit here (depth_of caps it separately).
    """
    stack: list[tuple[Any, Any]] = [(value, label)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return spelled(where, _key_path)
        elif isinstance(node, dict):
            for key, child in reversed(list(node.items())):
                if isinstance(key, str) and "\x00" in key:
                    return f"a key in {spelled(where, _key_path)}"
                if not isinstance(child, _NO_TEXT):
                    stack.append((child, (where, key)))
        elif isinstance(node, (list, tuple)):
            stack.extend((child, (where, i, None)) for i, child in reversed(list(enumerate(node))))
    return None


_NO_TEXT = (int, float, type(None))  # bool is an int
# Bytes of canonical JSON text without which no two distinct keys fold to one name: ASCII letters in
# upper case, and any non-ASCII character (NFKC and case folding leave lower-case ASCII as it is).
_FOLDABLE = re.compile(rb"[A-Z\x80-\xff]")


def folded_name(key: str) -> str:
    """`key` as tools that read names without case, some after Unicode compatibility folding, read it
    (ASP.NET's binding, System.Text.Json or Jackson set case-insensitive): `LIMIT`, a fullwidth
    `ｌｉｍｉｔ` and `limit` are one name."""
    return key.casefold() if key.isascii() else unicodedata.normalize("NFKC", key).casefold()


def find_key_collision(value: Any, label: str) -> str | None:
    """Where the first object in `value` (keys in sorted order, so not the order a Struct's map
    arrived in) has two keys that are one name to a tool reading names without case
    (`arguments.options has the keys "FORCE" and "force"`), or None. Iterative."""
    if not _any_collision(value):
        return None
    for node, where in _objects(value, label):
        seen: dict[str, str] = {}
        for key in sorted(k for k in node if isinstance(k, str)):
            other = seen.setdefault(folded_name(key), key)
            if other != key:
                return f'{spelled(where, _key_path)} has the keys "{_key_text(other)}" and "{_key_text(key)}"'
    return None


def _any_collision(value: Any) -> bool:
    """Whether any object in `value` has two keys of one folded name: the quick walk (no positions)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if len(node) > 1:
                keys = [key for key in node if isinstance(key, str)]  # other keys are not JSON: refused as such
                if len({key.lower() if key.isascii() else folded_name(key) for key in keys}) < len(keys):
                    return True
            stack.extend(child for child in node.values() if isinstance(child, (dict, list)))
        elif isinstance(node, list):
            stack.extend(child for child in node if isinstance(child, (dict, list)))
    return False


def _objects(value: Any, label: str) -> Iterator[tuple[dict, Any]]:
    """Every object in `value` with its position, depth first, by sorted keys."""
    stack: list[tuple[Any, Any]] = [(value, label)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            yield node, where
            keys = sorted((k for k in node if isinstance(k, str)), reverse=True)
            stack.extend((node[key], (where, key)) for key in keys if isinstance(node[key], (dict, list)))
        elif isinstance(node, list):
            stack.extend((child, (where, i, None)) for i, child in reversed(list(enumerate(node)))
                         if isinstance(child, (dict, list)))


def check_call(call: ToolCall, *, max_bytes: int, max_depth: int) -> tuple[list[str], str]:
    """Return (problems, arguments_digest). No problems means policy may see the call.

    A string holding U+0000 anywhere (a name, an id, the intent, argument and signal values
    and keys at any depth) is refused with a reason naming where: C-string code cuts text
    there, so the tool, an approver or a log could read less than policy decided on. So are
    arguments with an object whose keys are one name but for case or compatibility forms
    (`force` and `FORCE`): a tool reading names without case could run with the one policy
    did not take for that name.

    Arguments and signals that are plain (canonical.plain_form: no number to refuse, orjson's
    bytes are canonical) and hold no `\\u0000` escape are checked from that one walk; any other
    value takes the walks that name its problem.
    """
    problems: list[str] = []
    forms = {"arguments": _clean_form(call.arguments, max_depth), "signals": _clean_form(call.signals, max_depth)}
    for label, code, value in (
        ("tool", INVALID_TOOL, call.tool),
        ("server", INVALID_SERVER, call.server),
        ("call_id", INVALID_CALL_ID, call.call_id),
        ("task_id", INVALID_TASK_ID, call.task_id),
        ("escalation_id", INVALID_ESCALATION_ID, call.escalation_id),
        ("intent", INVALID_INTENT, call.intent),
        ("arguments", INVALID_ARGUMENTS, call.arguments),
        ("signals", INVALID_SIGNALS, call.signals),
    ):
        where = find_nul(value, label) if forms.get(label) is None else None
        if where is not None:
            problems.append(str(Reason(code, f"{where} holds U+0000 (NUL), which is refused anywhere in a call")))
    form = forms["arguments"]
    if form is None or _FOLDABLE.search(form):
        collision = find_key_collision(call.arguments, "arguments")
        if collision is not None:
            problems.append(str(Reason(INVALID_ARGUMENTS, (
                f"{collision}, one name to tools that read names without case or after Unicode "
                "compatibility folding: the tool could read either, policy decided on both"
            ))))
    tool_bytes = len(call.tool.encode("utf-8", "surrogatepass"))
    if tool_bytes == 0:
        problems.append(str(Reason(INVALID_TOOL, "the tool name is empty")))
    elif tool_bytes > MAX_TOOL_NAME_BYTES:
        problems.append(str(Reason(
            INVALID_TOOL, f"the tool name is {tool_bytes} bytes, over the {MAX_TOOL_NAME_BYTES}-byte limit"
        )))
    elif not call.tool.isprintable():
        problems.append(str(Reason(INVALID_TOOL, "the tool name holds control characters")))
    for label, code, value, limit in (
        ("call_id", INVALID_CALL_ID, call.call_id, MAX_ID_BYTES),
        ("task_id", INVALID_TASK_ID, call.task_id, MAX_ID_BYTES),
        ("server", INVALID_SERVER, call.server, MAX_ID_BYTES),
        ("escalation_id", INVALID_ESCALATION_ID, call.escalation_id, MAX_ID_BYTES),
        ("intent", INVALID_INTENT, call.intent, MAX_INTENT_BYTES),
    ):
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            problems.append(str(Reason(code, f"{label} is over the {limit}-byte limit")))
        elif not _is_text(value):
            # evidence records only what a reader gets back byte for byte (sidecar/canonical.py)
            problems.append(str(Reason(code, f"{label} is not valid Unicode text (a lone surrogate)")))

    if not isinstance(call.arguments, dict):
        problems.append(str(Reason(
            INVALID_ARGUMENTS, f"arguments must be a JSON object, not {_json_kind(call.arguments)}"
        )))
    if call.signals is not None and not isinstance(call.signals, dict):
        problems.append(str(Reason(INVALID_SIGNALS, f"signals must be a JSON object, not {_json_kind(call.signals)}")))

    too_deep = set()
    for label, code, value in (
        ("arguments", INVALID_ARGUMENTS, call.arguments),
        ("signals", INVALID_SIGNALS, call.signals),
    ):
        if forms[label] is not None:
            continue
        if depth_of(value, max_depth) > max_depth:
            too_deep.add(label)
            problems.append(str(Reason(INPUT_TOO_DEEP, f"{label} nest deeper than the limit of {max_depth} levels")))
        else:
            problems += [str(Reason(code, problem)) for problem in number_problems(value, label)]

    # Too deep: digest what lies within the limit, so nothing below recurses past Python's limit.
    arguments = cut_depth(call.arguments, max_depth) if "arguments" in too_deep else call.arguments
    try:
        encoded = forms["arguments"] or canonical_json(arguments)
        digest = sha256_digest(encoded)
        if len(encoded) > max_bytes:
            problems.append(str(Reason(
                INPUT_TOO_LARGE, f"arguments are {len(encoded)} bytes, over the limit of {max_bytes}"
            )))
    except NotCanonicalizable as exc:
        digest = sha256_digest(repr(arguments).encode("utf-8", "surrogatepass"))
        if not any(problem.startswith(f"{INVALID_ARGUMENTS}:") for problem in problems):
            problems.append(str(Reason(INVALID_ARGUMENTS, f"arguments are not valid JSON ({exc})")))
    if call.signals is not None and not problems:
        try:
            if len(forms["signals"] or canonical_json(call.signals)) > max_bytes:
                problems.append(str(Reason(INPUT_TOO_LARGE, f"signals are over the limit of {max_bytes} bytes")))
        except NotCanonicalizable as exc:
            problems.append(str(Reason(INVALID_SIGNALS, f"signals are not valid JSON ({exc})")))
    return problems, digest


def _clean_form(value: Any, max_depth: int) -> bytes | None:
    """The canonical bytes of a plain `value` nested at most `max_depth` deep with no U+0000 in
    any key or string (orjson writes U+0000 as `\\u0000`; a false alarm such as a backslash
    followed by `u0000` just takes the naming walks); None otherwise."""
    form = plain_form(value)
    if form is None or form[1] > max_depth or b"\\u0000" in form[0]:
        return None
    return form[0]


TOO_DEEP = "…[too deep]"


def cut_depth(value: Any, limit: int) -> Any:
    """A copy of a JSON value with every object or array below `limit` levels replaced by TOO_DEEP (iterative)."""
    root = [value]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 1)]
    while stack:
        holder, key, depth = stack.pop()
        node = holder[key]
        if isinstance(node, (dict, list)) and depth > limit:
            holder[key] = TOO_DEEP
        elif isinstance(node, dict):
            holder[key] = node = dict(node)
            stack.extend((node, k, depth + 1) for k in node)
        elif isinstance(node, list):
            holder[key] = node = list(node)
            stack.extend((node, i, depth + 1) for i in range(len(node)))
    return root[0]


def usable_id(value: str) -> bool:
    """Whether `value` passes check_call's rules for an id (call_id, task_id, escalation_id): no
    U+0000, at most MAX_ID_BYTES, valid Unicode text. For a front door that takes an id alone
    (ToolGate.EndTask), so that every id a call may use is one it accepts, and no other."""
    return "\x00" not in value and len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES and _is_text(value)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


class CallIdRegistry:
    """Remembers recent call ids with the digest of what they carried.

    A call id reused for a different tool, server, other arguments, another
    task or by another caller (subject and delegation chain) is refused: it
    would let one approval or one evidence entry stand for two calls.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._seen: OrderedDict[str, str] = OrderedDict()

    def claim(self, call_id: str, fingerprint: str) -> bool:
        """True if the id is new or was used for the same call before."""
        previous = self._seen.get(call_id)
        if previous is not None:
            self._seen.move_to_end(call_id)
            return previous == fingerprint
        self._seen[call_id] = fingerprint
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True
