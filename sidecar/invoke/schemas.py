"""A call's arguments as the tool will read them, judged before policy against its input schema.

Policy, the approver and the evidence see the arguments as JSON values; a tool reads them
through its own validation, which often coerces. The MCP SDK's tools (MCPServer, FastMCP)
validate with pydantic in lax mode: `"true"`, `"yes"` and `1` run as the boolean true,
`"5000"`, `" 5000 "` and `"5_000"` as the integer 5000, `"inf"` as Infinity, `true` as the
integer 1, and a string holding JSON text (`"[1, 2]"`, `'{"path": "/etc"}'`, `"null"`) as the
value it spells; HTTP frameworks read query text the same way (FastAPI: `?force=yes` is
true). A policy that denies `recursive == true` would let `"recursive": "true"` through, and
the tool would run recursive. And a tool runs an argument the call leaves out with its own
default: a policy that denies `recursive == true` saw no `recursive`, and a tool whose
`recursive` defaults to true ran recursive.

So where the tool's input schema is known (an MCP upstream's listing; `invoke.tools.<name>.
input_schema` for an HTTP tool) a call is decided only on arguments the tool reads as they are:
- every property the schema gives a `default` for (at any depth the schema describes, through
  `$ref`) that the call leaves out is filled in with that default, so policy, the approver and
  the evidence see it, and the tool is sent it and needs no default of its own; a `null`
  default is the tool's "not given" and stays left out (obligations skip an absent argument);
- they must validate, without coercion, against the schema (JSON Schema as its `$schema`
  names it, 2020-12 by default, the MCP default); a string is not a boolean or a number
  there, nor a boolean an integer;
- a top-level string argument whose text is a JSON array, object or `null` is refused when
  the schema would also accept that value in its place: the SDK's tools parse such a string
  before validating it (`"null"` runs as None where the tool takes `str | None`).

`InputSchema(schema).read(arguments)` returns the arguments with the defaults filled in, and why
the tool would not read them as they are ("arguments.recursive …", naming the field, never the
value) or None. An `InputSchema` is made once per schema (checked against its meta-schema, its
validators built: about 3 ms of CPU), and `read` judges each call with it (tens of µs).
The front doors (the MCP gateway, ToolGate.Invoke) decide on those arguments, or deny the call
with `invalid_arguments` and record it (docs/mcp.md). `schema_problem` is the load-time check
of a configured schema.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from referencing import Registry

from sidecar.jsonvalues import child_path

_DEFAULT = jsonschema.Draft202012Validator
_LOCAL: Registry = Registry()


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a JSON Schema object arguments can be judged by, or None."""
    if not isinstance(schema, dict):
        return "the tool's input schema is not a JSON Schema object, so its arguments cannot be checked"
    try:
        jsonschema.validators.validator_for(schema, default=_DEFAULT).check_schema(schema)
    except SchemaError as exc:
        return (f"the tool's input schema is not valid JSON Schema ({exc.message[:200]}), "
                "so its arguments cannot be checked")
    return None


class InputSchema:
    """One tool's input schema, made ready to judge calls by (module docstring): checked against its
    meta-schema and its validators built once, here, so that each call pays only for its validation.
    A schema that cannot be applied is kept with its `problem`, and every call is refused with it."""

    def __init__(self, schema: Any):
        self.problem = schema_problem(schema)
        if self.problem is None:
            usable = _without_regex(schema)
            validator_class = jsonschema.validators.validator_for(usable, default=_DEFAULT)
            # An empty registry: a `$ref` resolves within the schema or nowhere. jsonschema's default would
            # fetch any other (http://, file://) from the sidecar, at the schema's word.
            self._filling = _filling(validator_class)(usable, registry=_LOCAL)
            self._plain = validator_class(usable, registry=_LOCAL)

    def read(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """(`arguments` with the schema's defaults filled in, why the tool would not read them as they
        are or None). `arguments` is not changed."""
        if self.problem is not None:
            return arguments, self.problem
        try:
            return self._judged(arguments)
        except RecursionError:  # a recursive schema ($ref to itself) walked down deeply nested arguments
            return arguments, "arguments nest too deep to be checked against the tool's input schema"
        except Exception as exc:  # a $ref that resolves nowhere in the schema (others are never fetched), ...
            return arguments, (f"the tool's input schema cannot be applied here ({type(exc).__name__}: "
                               f"{str(exc)[:200]}), so its arguments cannot be checked")

    def _judged(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        filled = copy.deepcopy(arguments)
        error = jsonschema.exceptions.best_match(self._filling.iter_errors(filled))
        if error is not None:
            where = "arguments"
            for step in error.absolute_path:
                where = child_path(where, step)
            return filled, (f"{where} does not match the tool's input schema ({error.validator}: "
                            f"{_shown(error.validator_value)}); the tool would read it as another value or refuse it")
        for name, value in sorted(filled.items()):
            parsed = _json_text(value)
            if parsed is not _NOT_PARSED and self._plain.is_valid({**filled, name: parsed}):
                return filled, (f"{child_path('arguments', name)} is a string holding JSON text (an array, object "
                                "or null), which the tool's input schema also accepts parsed; tools built with the "
                                "MCP SDK read such a string parsed, as another value than the one decided: send "
                                "the value itself")
        return filled, None


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SCHEMA = frozenset({"items", "additionalItems", "not", "if", "then", "else", "additionalProperties", "contains",
                     "propertyNames", "unevaluatedItems", "unevaluatedProperties"})
_SCHEMAS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_NAMED = frozenset({"properties", "$defs", "definitions", "dependentSchemas"})
# Regular expressions run on the agent's strings and keys: one that backtracks catastrophically
# ("(a+)+$") would hold the event loop, and every call with it. What they constrain is no reading
# of a value as another; the tool applies them itself.
_REGEX = frozenset({"pattern", "patternProperties"})


def _without_regex(schema: Any) -> Any:
    """A copy of `schema` without the _REGEX keywords, at every place that holds a schema."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword in _REGEX:
            continue
        if keyword in _NAMED and isinstance(value, dict):
            value = {name: _without_regex(child) for name, child in value.items()}
        elif keyword in _SCHEMAS and isinstance(value, list) or keyword == "items" and isinstance(value, list):
            value = [_without_regex(child) for child in value]
        elif keyword in _SCHEMA:
            value = _without_regex(value)
        out[keyword] = value
    return out


@functools.cache
def _filling(validator_class: Any) -> Any:
    """`validator_class` whose `properties` keyword first fills in each absent property's `default`
    (the instance it validates is changed), wherever validation descends: nested objects, `$ref`."""
    properties = validator_class.VALIDATORS["properties"]

    def fill_then_check(validator: Any, declared: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict) and isinstance(declared, dict):
            for name, subschema in declared.items():
                if name not in instance and isinstance(subschema, dict) and subschema.get("default") is not None:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from properties(validator, declared, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": fill_then_check})


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
