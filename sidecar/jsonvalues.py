"""JSON values carried exactly: the numbers rule, and protobuf Struct in and out.

A protobuf `Struct` holds every number as an IEEE-754 double, so an integer
past 2^53 arrives rounded (9007199254740993 becomes 9007199254740992.0) and
`1` arrives as `1.0`. The rule, the same on every surface (docs/api.md,
"Numbers"):

- an integer-valued number within ±(2^53−1) (RFC 8785 / I-JSON's safe range,
  RFC 7493 §2.2) is an integer everywhere: policy input, approval preview,
  evidence, fingerprint (`1` is `1`, never `1.0`; `-0.0` is `0`);
- any other finite number is kept as the double it is (`0.5`, `1e-7`);
- an integer-valued number beyond ±(2^53−1) and NaN/±Infinity are refused:
  the client raises `NotExact` before sending, the gate denies the call with
  a reason naming the field (`arguments.ids[0]`).

Agent side (`to_json_value`, `to_struct`) is strict and names the path of
the first value that would not arrive as sent: also non-string keys, values
that are not JSON, and strings with lone surrogates. Server side,
`from_struct` decodes a Struct with the rule applied, keeping refused numbers
as they came so that `number_problems` can name them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import orjson
from google.protobuf.struct_pb2 import ListValue, Struct, Value

from sidecar.canonical import plain_depth

SAFE_INTEGER = 2**53 - 1
MAX_NAMED = 3


class NotExact(ValueError):
    """A value that cannot be carried exactly. `path` names it (e.g. `arguments.ids[0]`), `problem` says why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def child_path(path: str, key: str | int) -> str:
    """`arguments.ids` + 0 → `arguments.ids[0]`; odd keys are quoted as JSON strings (ASCII only)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isascii() and key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def spelled(where: Any, key_step: Callable[[str, Any], str]) -> str:
    """A walk position as text, built only when reported: walks keep it as a chain of
    `(parent, key)` and `(parent, index, None)` tuples from a root label (cheap), and
    `key_step(parent_text, key)` spells a key; an index is `[i]`."""
    steps = []
    while isinstance(where, tuple):
        steps.append(where)
        where = where[0]
    text = where
    for step in reversed(steps):
        text = f"{text}[{step[1]}]" if len(step) == 3 else key_step(text, step[1])
    return text


def number_problem(value: int | float) -> str | None:
    """Why this number cannot be carried exactly, or None."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"{value!r} is not a JSON number"
        if value.is_integer() and abs(value) > SAFE_INTEGER:
            return (f"{value!r} is an integer beyond ±(2^53−1), which JSON numbers (doubles) cannot all hold; "
                    "send it as a string")
        return None
    if abs(value) > SAFE_INTEGER:
        return f"{value} is beyond ±(2^53−1), where JSON numbers (doubles) lose integers; send it as a string"
    return None


def normalize_number(value: float) -> int | float:
    """An integer-valued double within the safe range becomes an int; anything else is returned unchanged."""
    if math.isfinite(value) and value.is_integer() and abs(value) <= SAFE_INTEGER:
        return int(value)
    return value


def normalize(value: Any) -> Any:
    """A copy of the value with the numbers rule applied (integral floats → int); nothing is refused here.

    A plain value (canonical.plain_depth: no integral float in it) is copied by orjson, in C.
    Otherwise iterative, so input nested past Python's recursion limit (the gate refuses it
    later) cannot crash it."""
    if plain_depth(value) is not None:
        try:
            return orjson.loads(orjson.dumps(value))
        except (TypeError, ValueError):  # orjson.JSONEncodeError: a lone surrogate; copied below
            pass
    root = [value]
    stack: list[list | dict] = [root]  # copies whose members are still to see (no tuple per member)
    while stack:
        holder = stack.pop()
        for key in list(holder) if isinstance(holder, dict) else range(len(holder)):
            node = holder[key]
            if isinstance(node, float):
                holder[key] = normalize_number(node)
            elif isinstance(node, dict):
                holder[key] = node = dict(node)
                stack.append(node)
            elif isinstance(node, list):
                holder[key] = node = list(node)
                stack.append(node)
    return root[0]


def number_problems(value: Any, path: str) -> list[str]:
    """Server side: "path: why" for each number the rule refuses (the first few by key order, then a count)."""
    found: list[str] = []
    count = 0
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, bool) or node is None or isinstance(node, str):
            continue
        if isinstance(node, (int, float)):
            problem = number_problem(node)
            if problem:
                count += 1
                if len(found) < MAX_NAMED:
                    found.append(f"{where}: {problem}")
        elif isinstance(node, dict):
            # Sorted: the reasons do not depend on the order a Struct's map arrived in.
            stack.extend((node[key], child_path(where, str(key))) for key in sorted(node, key=str, reverse=True))
        elif isinstance(node, list):
            stack.extend((item, child_path(where, i)) for i, item in reversed(list(enumerate(node))))
    if count > len(found):
        found.append(f"and {count - len(found)} more such numbers")
    return found


def to_json_value(value: Any, path: str) -> Any:
    """Agent side: the exact JSON value that will be decided on (tuples become lists), or raise NotExact."""
    try:
        return _exact(value, path)
    except RecursionError:
        raise NotExact(path, "nests too deep to be sent") from None


def _exact(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise NotExact(path, "the string holds a lone surrogate, which is not valid Unicode text") from None
        return str(value)
    if isinstance(value, (int, float)):  # subclasses (IntEnum, numpy.float64) as the plain number they hold
        plain = int(value) if isinstance(value, int) else float(value)
        problem = number_problem(plain)
        if problem:
            raise NotExact(path, problem)
        return plain
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotExact(path, f"the key {key!r} is not a string; JSON object keys are strings")
            out[_exact(key, f"{path} (a key)")] = _exact(item, child_path(path, key))
        return out
    if isinstance(value, (list, tuple)):
        return [_exact(item, child_path(path, i)) for i, item in enumerate(value)]
    raise NotExact(path, f"a value of type {type(value).__name__} is not JSON "
                         "(use dict, list, tuple, str, int, float, bool or None)")


def to_struct(value: dict[str, Any], what: str) -> Struct:
    """A Struct that decodes (`from_struct`) to exactly `value`; NotExact otherwise."""
    if not isinstance(value, dict):
        raise NotExact(what, f"must be a dict of JSON values, not {type(value).__name__}")
    message = Struct()
    message.update(to_json_value(value, what))
    return message


def from_struct(message: Struct) -> dict[str, Any]:
    """A Struct as JSON values, with the numbers rule applied (refused numbers are kept for the gate to name)."""
    return {key: _from_value(item) for key, item in message.fields.items()}


def _from_value(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return normalize_number(value.number_value)
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return _from_list(value.list_value)
    return None  # null_value, or no kind set


def _from_list(message: ListValue) -> list[Any]:
    return [_from_value(item) for item in message.values]
