"""sidecar/invoke/schemas.py on schemas an upstream or a config may hold: what it does not apply.

The check runs on the sidecar's event loop, on the agent's strings and keys: a schema's regular
expression that backtracks catastrophically would hold every call, and a `$ref` resolving nowhere
here (remote references are never fetched) must refuse the call, not crash the handler.
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from sidecar.invoke.schemas import InputSchema

EVIL = "(a+)+$"  # catastrophic backtracking on "aaaa…!"


def test_regular_expressions_are_left_to_the_tool_and_cannot_hold_the_loop():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": EVIL}, "pattern": {"type": "integer"},
                       "keys": {"type": "object", "propertyNames": {"pattern": EVIL}}},
        "patternProperties": {EVIL: {"type": "string"}},
        "additionalProperties": {"type": "boolean"},
    }
    hostile = "a" * 40 + "!"
    started = time.monotonic()
    filled, problem = InputSchema(schema).read({"a": hostile, "keys": {hostile: 1}, hostile: True, "pattern": "5"})
    assert time.monotonic() - started < 2
    # a property named like the keyword is still judged, by its own schema
    assert problem is not None and problem.startswith('arguments.pattern does not match the tool\'s input schema')


def test_defaults_keep_their_data_whatever_their_keys():
    schema = {"type": "object", "properties": {"d": {"type": "object", "default": {"pattern": "kept"}}}}
    assert InputSchema(schema).read({}) == ({"d": {"pattern": "kept"}}, None)


@pytest.mark.parametrize("ref", ["http://127.0.0.1:9/schema.json", "file:///etc/passwd", "#/$defs/missing", "urn:x"])
def test_a_reference_that_resolves_nowhere_refuses_the_call(ref):
    arguments = {"a": 1}
    filled, problem = InputSchema({"type": "object", "properties": {"a": {"$ref": ref}}}).read(arguments)
    assert filled == arguments
    assert problem is not None and problem.startswith("the tool's input schema cannot be applied here"), problem


def test_a_remote_reference_is_never_fetched():
    """jsonschema's default resolver fetched any http:// or file:// `$ref`: a schema could make the
    sidecar send requests (to a metadata service) or read its files."""
    fetched: list[str] = []

    class Schema(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"type": "integer"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Schema)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ref = f"http://127.0.0.1:{server.server_port}/s.json"
        filled, problem = InputSchema({"type": "object", "properties": {"a": {"$ref": ref}}}).read({"a": "x"})
    finally:
        server.shutdown()
        server.server_close()
    assert fetched == []
    assert problem is not None and problem.startswith("the tool's input schema cannot be applied here"), problem
