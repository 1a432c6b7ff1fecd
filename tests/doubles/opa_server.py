"""TEST DOUBLE — an OPA-REST-compatible server for the tests. It is not OPA.

No OPA binary can be installed on the development machines (no Go
toolchain, not in Debian, PyPI or npm; see shared/FIELD-NOTES.md), so the OPA
engine's tests run against this server instead. It implements the part of
OPA's REST API the sidecar's OPA engine uses, with OPA's shapes:

- `POST /v1/data/{path}` with `{"input": ...}`: 200 `{"result": <value>}`,
  or 200 `{}` with no `result` when the document is undefined (e.g. a bundle
  without the rule); `decision_id` when decision logging is on (as OPA does
  with `decision_logs` configured); `?provenance=true` adds `provenance`
  (`version`, `build_*`, `bundles.<name>.revision` from the bundle's
  `.manifest`); `?strict-builtin-errors=true` makes a built-in error fail
  the query (500) instead of leaving the expression undefined, as OPA does;
  a body that is not a JSON object is 400
  `{"code": "invalid_parameter", "message": ...}`; an evaluation error is
  500 `{"code": "internal_error", "message": ...}`;
- `GET /health` and `GET /health?bundles=true`: 200 `{}`, or 500
  `{"error": "one or more bundles are not activated"}`.

Decisions come from the project's embedded Rego compilation of the same
bundle (`sidecar.policy.bundle.load_bundle` + `sidecar.policy.compiler`), so
for the sidecar's bundle the results are what OPA computes from the same Rego
(the policy tests pin those semantics). Every regopy object stays on one
worker thread. Test files (*_test.rego) are not compiled in (see _compile).

Fault injection, for the engine's failure-mode tests: `delay` (slow answers),
`fail_next` / `status` (5xx or any status with OPA's error body, or with a
plain-text body when `plain_errors`, as a proxy or a crash would answer),
`drop_next` / `drop` (close the connection without an answer),
`result` (answer a wrong-shape result), `undefined` (answer `{}`),
`healthy` (what `/health?bundles` says), and `stop()` / `start()` on the same
port. It listens on loopback only, on a random port unless given one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.policy.bundle import PolicyBundle, load_bundle
from sidecar.policy.compiler import EvaluationError, new_interpreter, query

_UNSET = object()


def _bool_param(request: web.Request, name: str) -> bool:
    """OPA's reading of a boolean query parameter: present and empty, or "true" (any case)."""
    if name not in request.query:
        return False
    values = request.query.getall(name)
    return any(v == "" or v.lower() == "true" for v in values)


class OpaTestServer:
    """TEST DOUBLE of OPA's REST API (see the module docstring). Use `async with OpaTestServer(dir) as opa:`."""

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        decision_logs: bool = True,
        bundle_name: str | None = None,
        revision: str | None = None,
    ):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the OPA test double listens on loopback only")
        self.host = host
        self.port = port
        self.decision_logs = decision_logs
        self.bundle_name = bundle_name
        self.revision_override = revision
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opa-double")
        self._compiled: dict[str, Any] = {}  # path -> compiled entrypoint (worker thread only)
        self._interpreter: Any = None
        self._compiled_bundle: PolicyBundle | None = None
        self._runner: web.AppRunner | None = None
        self.bundle: PolicyBundle = load_bundle(bundle_dir)
        self.bundle_dir = Path(bundle_dir)
        self.reset_faults()
        # What it saw, for assertions.
        self.data_requests = 0
        self.health_requests = 0
        self.inputs: list[Any] = []
        self.queries: list[dict[str, str]] = []  # each data request's query parameters
        self.client_ports: set[int] = set()  # distinct client connections (source ports)

    # --- faults --------------------------------------------------------------

    def reset_faults(self) -> None:
        self.delay = 0.0  # seconds before answering a data request
        self.health_delay = 0.0
        self.status: int | None = None  # answer every data request with this status (OPA error body)
        self.plain_errors = False  # injected errors carry a plain-text body (a proxy's 503, a crash), not OPA's
        self.error_message: str | None = None  # the message of injected errors
        self.fail_next = 0  # answer the next N data requests with 500
        self.drop = False  # close every data request's connection without an answer
        self.drop_next = 0
        self.result: Any = _UNSET  # answer this value as `result`
        self.undefined = False  # answer {} (no result)
        self.healthy = True  # /health?bundles: bundles activated

    # --- lifecycle -----------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> "OpaTestServer":
        app = web.Application()
        app.router.add_post("/v1/data", self._data)
        app.router.add_post("/v1/data/{path:.*}", self._data)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            sockets = site._server.sockets  # type: ignore[union-attr]
            self.port = sockets[0].getsockname()[1]
        await self.warm()
        return self

    async def warm(self, path: str = "sidecar/decision") -> None:
        """Compile `path` now, so the first request is not slowed by compilation (OPA compiles at load too)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._compile, path)

    async def stop(self) -> None:
        """Stop listening and close every open connection (the port can be started again)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> "OpaTestServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def set_bundle(self, bundle_dir: str | Path) -> None:
        """Serve another bundle from the next request on (as OPA activating a new bundle)."""
        bundle = load_bundle(bundle_dir)
        self._executor.submit(self._reset_compiled).result()
        self.bundle, self.bundle_dir = bundle, Path(bundle_dir)
        self._executor.submit(self._compile, "sidecar/decision").result()

    # --- evaluation (worker thread) ------------------------------------------

    def _reset_compiled(self) -> None:
        self._compiled.clear()
        self._interpreter = None
        self._compiled_bundle = None

    def _compile(self, path: str) -> None:
        """Compile the bundle (once per bundle and set of paths).

        OPA loads a bundle's *_test.rego files too; they are left out here
        because no sidecar path reads them and regopy compiles the bundle with
        them 60 times slower (2.7 s instead of 0.04 s, measured on rego/).
        """
        bundle = self.bundle
        if self._compiled_bundle is not bundle or path not in self._compiled:
            paths = sorted({*self._compiled, path}) if self._compiled_bundle is bundle else [path]
            interpreter = new_interpreter(bundle, with_tests=False)
            built = interpreter.build(None, paths)
            self._interpreter, self._compiled_bundle = interpreter, bundle
            self._compiled = {p: built for p in paths}

    def _evaluate(self, path: str, input_document: Any, has_input: bool, strict: bool) -> Any:
        self._compile(path)
        # OPA's default: a built-in error makes the expression undefined; strict-builtin-errors fails the query.
        self._interpreter.strict_built_in_errors = strict
        self._interpreter.set_input(input_document if has_input else None)
        return query(self._interpreter, self._compiled[path], path)

    # --- handlers ------------------------------------------------------------

    def _note_connection(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.client_ports.add(peer[1])

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"code": code, "message": message}, status=status)

    def _injected(self, status: int, code: str, message: str) -> web.Response:
        message = self.error_message if self.error_message is not None else message
        if self.plain_errors:
            return web.Response(status=status, text=f"upstream unavailable: {message}")
        return self._error(status, code, message)

    async def _data(self, request: web.Request) -> web.StreamResponse:
        self.data_requests += 1
        self.queries.append(dict(request.query))
        self._note_connection(request)
        raw = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.drop or self.drop_next > 0:
            self.drop_next = max(0, self.drop_next - 1)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError()
        if self.fail_next > 0:
            self.fail_next -= 1
            return self._injected(500, "internal_error", "injected failure (test double)")
        if self.status is not None:
            code = "internal_error" if self.status >= 500 else "invalid_parameter"
            return self._injected(self.status, code, f"injected status {self.status} (test double)")

        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            return self._error(400, "invalid_parameter", f"body contains malformed input document: {exc}")
        if not isinstance(body, dict):
            return self._error(400, "invalid_parameter", "body contains malformed input document: not an object")
        has_input = "input" in body
        self.inputs.append(body.get("input"))
        path = request.match_info.get("path", "").strip("/")

        answer: dict[str, Any] = {}
        if self.result is not _UNSET:
            answer["result"] = self.result
        elif not self.undefined:
            loop = asyncio.get_running_loop()
            try:
                strict = _bool_param(request, "strict-builtin-errors")
                value = await loop.run_in_executor(
                    self._executor, self._evaluate, path, body.get("input"), has_input, strict
                )
            except EvaluationError as exc:
                return self._error(500, "internal_error", str(exc))
            except Exception as exc:  # the interpreter failed in some other way: OPA's 500 shape too
                return self._error(500, "internal_error", f"{type(exc).__name__}: {exc}")
            if value is not None:
                answer["result"] = value
        if self.decision_logs:
            answer["decision_id"] = str(uuid.uuid4())
        if _bool_param(request, "provenance"):
            answer["provenance"] = self._provenance()
        return web.json_response(answer)

    def _provenance(self) -> dict:
        revision = self.revision_override
        if revision is None:
            revision = str(self.bundle.manifest.get("revision", ""))
        name = self.bundle_name if self.bundle_name is not None else str(self.bundle_dir)
        return {
            "version": "0.0.0-test-double",
            "build_commit": "",
            "build_timestamp": "",
            "build_hostname": "",
            "bundles": {name: {"revision": revision}},
        }

    async def _health(self, request: web.Request) -> web.Response:
        self.health_requests += 1
        if self.health_delay:
            await asyncio.sleep(self.health_delay)
        if _bool_param(request, "bundles") and not self.healthy:
            return web.json_response({"error": "one or more bundles are not activated"}, status=500)
        return web.json_response({})
