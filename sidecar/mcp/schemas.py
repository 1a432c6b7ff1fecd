"""A tools/call's arguments judged against the upstream tool's own input schema, before policy.

Policy, the approver and the evidence see the arguments as JSON values; an upstream tool
reads them through its own validation, and the MCP SDK's tools (MCPServer, FastMCP) validate
with pydantic in lax mode: `"true"`, `"yes"` and `1` run as the boolean true, `"5000"`,
`" 5000 "` and `"5_000"` as the integer 5000, `"inf"` as Infinity, `true` as the integer 1,
and a string holding JSON text (`"[1, 2]"`, `'{"path": "/etc"}'`) as the array or object it
spells. A policy that denies `recursive == true` would let `"recursive": "true"` through, and
the tool would run recursive.

So a call is decided only on arguments the tool reads as they are:
- they must validate, without coercion, against the input schema the upstream declared for
  the tool in its listing (JSON Schema as its `$schema` names it, 2020-12 by default, the
  MCP default); a string is not a boolean or a number there, nor a boolean an integer;
- a top-level string argument whose text is a JSON array, object or `null` is refused when
  the schema would also accept that value in its place: the SDK's tools parse such a string
  before validating it (`"null"` runs as None where the tool takes `str | None`).

`problem` returns why not ("arguments.recursive: …", naming the field, never the value), or
None. The gateway denies the call with `invalid_arguments` and records it (docs/mcp.md).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from sidecar.jsonvalues import child_path

_DEFAULT = jsonschema.Draft202012Validator


def problem(schema: Any, arguments: dict[str, Any]) -> str | None:
    """Why the tool would not read `arguments` as they are (module docstring), or None."""
    if not isinstance(schema, dict):
        return "the tool's input schema is not a JSON Schema object, so its arguments cannot be checked"
    validator_class = jsonschema.validators.validator_for(schema, default=_DEFAULT)
    try:
        validator_class.check_schema(schema)
    except SchemaError:
        return "the tool's input schema is not valid JSON Schema, so its arguments cannot be checked"
    validator = validator_class(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is not None:
        where = "arguments"
        for step in error.absolute_path:
            where = child_path(where, step)
        return (f"{where} does not match the tool's input schema ({error.validator}: "
                f"{_shown(error.validator_value)}); the tool would read it as another value or refuse it")
    for name, value in sorted(arguments.items()):
        parsed = _json_text(value)
        if parsed is not _NOT_PARSED and validator.is_valid({**arguments, name: parsed}):
            return (f"{child_path('arguments', name)} is a string holding JSON text (an array, object or null), which the tool's input schema "
                    "also accepts parsed; tools built with the MCP SDK read such a string parsed, as another value "
                    "than the one decided: send the value itself")
    return None


_NOT_PARSED = object()


def _json_text(value: Any) -> Any:
    """The array, object or null a string spells as JSON (what the SDK's tools parse it to; they
    leave strings that spell a string, number or boolean alone), else _NOT_PARSED."""
    if not isinstance(value, str):
        return _NOT_PARSED
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return _NOT_PARSED
    return parsed if parsed is None or isinstance(parsed, (dict, list)) else _NOT_PARSED


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:119] + "…"
