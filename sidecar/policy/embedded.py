"""The embedded engine: Rego evaluated in-process by regopy, reloaded atomically.

A policy is compiled and its own *_test.rego run before it serves; a bundle
that fails either is reported (log + health detail) and the previous one
keeps serving. Each worker thread owns its interpreter and compiled copy —
regopy objects are never shared between threads — rebuilt lazily when a new
policy generation is swapped in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.policy.bundle import BundleError, PolicyBundle, load_bundle
from sidecar.policy.compiler import DECISION_ENTRYPOINT, EvaluationError, compile_decision, new_interpreter, query
from sidecar.policy.decision import Decision, MalformedDecision, parse_decision
from sidecar.policy.validate import validate_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Generation:
    number: int
    bundle: PolicyBundle


def prepare(directory: str | Path, *, run_bundle_tests: bool = True) -> PolicyBundle:
    """Validate a bundle in a child process, then load it; raise BundleError if it must not serve."""
    if not run_bundle_tests:
        bundle = load_bundle(directory)
        compile_decision(bundle)
        return bundle
    report = validate_bundle(directory)
    if report.problems:
        raise BundleError(report.problems)
    if report.failed:
        raise BundleError([f"{t.file}:{t.line}: {t.rule} failed ({t.detail})" for t in report.failed])
    bundle = load_bundle(directory)
    if bundle.revision != report.revision:
        raise BundleError([f"{directory}: policy files changed while they were being validated"])
    return bundle


class EmbeddedEngine:
    name = "embedded"

    def __init__(
        self,
        directory: str | Path,
        *,
        timeout_ms: int = 100,
        workers: int = 2,
        reload: bool = True,
        run_bundle_tests: bool = True,
    ):
        """`run_bundle_tests=False` skips the bundle's own tests (for one-off `check`s), never its compile."""
        self._directory = Path(directory)
        self._run_bundle_tests = run_bundle_tests
        self._timeout = timeout_ms / 1000
        self._workers = workers
        self._reload = reload
        self._generation: _Generation | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rego")
        self._local = threading.local()
        self._watcher: asyncio.Task | None = None
        self.last_reload_error: str | None = None

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Load the policy (raising BundleError if the first one is bad) and start watching."""
        bundle = await asyncio.to_thread(prepare, self._directory, run_bundle_tests=self._run_bundle_tests)
        self._swap(bundle)
        await self._warm_workers()
        if self._reload:
            self._watcher = asyncio.create_task(self._watch(), name="policy-reload")

    async def close(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def reload(self) -> bool:
        """Try the directory's current contents; True if they now serve."""
        try:
            bundle = await asyncio.to_thread(prepare, self._directory, run_bundle_tests=self._run_bundle_tests)
        except BundleError as exc:
            self.last_reload_error = str(exc)
            log.error("policy reload rejected, previous policy %s keeps serving: %s", self.revision, exc)
            return False
        if self._generation and bundle.revision == self._generation.bundle.revision:
            self.last_reload_error = None
            return True
        self._swap(bundle)
        self.last_reload_error = None
        log.info("policy reloaded: now serving %s", bundle.revision)
        await self._warm_workers()
        return True

    async def _watch(self) -> None:
        from watchfiles import awatch

        async for _changes in awatch(self._directory, debounce=200, step=50):
            await self.reload()

    def _swap(self, bundle: PolicyBundle) -> None:
        number = self._generation.number + 1 if self._generation else 1
        self._generation = _Generation(number, bundle)

    async def _warm_workers(self) -> None:
        """Compile the serving generation in every worker thread before calls need it."""
        barrier = threading.Barrier(self._workers)

        def warm() -> None:
            try:
                barrier.wait(timeout=5)
            except threading.BrokenBarrierError:
                pass
            self._compiled_for_thread()

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, warm) for _ in range(self._workers)))

    # --- evaluation ----------------------------------------------------------

    @property
    def revision(self) -> str:
        return self._generation.bundle.revision if self._generation else ""

    def catalog_entry(self, tool: str) -> dict | None:
        return self._generation.bundle.catalog_entry(tool) if self._generation else None

    def health(self) -> tuple[bool, str]:
        if self._generation is None:
            return False, "no policy loaded"
        detail = f"serving policy {self.revision}"
        if self.last_reload_error:
            detail += f"; last reload rejected: {self.last_reload_error}"
        return True, detail

    async def evaluate(self, input_document: dict) -> Decision:
        revision = self.revision
        if self._generation is None:
            return Decision.failed("policy_unavailable: no policy is loaded", engine=self.name)
        loop = asyncio.get_running_loop()
        try:
            result, revision = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._evaluate_in_thread, input_document),
                timeout=self._timeout,
            )
        except asyncio.TimeoutError:
            return Decision.failed(
                f"policy_timeout: the embedded policy engine did not decide within {self._timeout * 1000:.0f} ms",
                engine=self.name,
                policy_revision=revision,
            )
        except EvaluationError as exc:
            return Decision.failed(
                f"policy_error: the embedded policy engine failed: {str(exc)[:500]}",
                engine=self.name,
                policy_revision=revision,
            )
        except Exception as exc:  # fail closed on anything the interpreter throws
            return Decision.failed(
                f"policy_error: the embedded policy engine failed: {type(exc).__name__}: {str(exc)[:500]}",
                engine=self.name,
                policy_revision=revision,
            )
        try:
            return parse_decision(result, engine=self.name, policy_revision=revision)
        except MalformedDecision as exc:
            return Decision.failed(f"policy_malformed: {exc}", engine=self.name, policy_revision=revision)

    def _compiled_for_thread(self) -> tuple[Any, Any, _Generation]:
        generation = self._generation
        cached = getattr(self._local, "compiled", None)
        if cached is None or cached[2] is not generation:
            interpreter = new_interpreter(generation.bundle, with_tests=False)
            compiled = interpreter.build(None, [DECISION_ENTRYPOINT])
            cached = (interpreter, compiled, generation)
            self._local.compiled = cached
        return cached

    def _evaluate_in_thread(self, input_document: dict) -> tuple[Any, str]:
        interpreter, compiled, generation = self._compiled_for_thread()
        interpreter.set_input(input_document)
        return query(interpreter, compiled, DECISION_ENTRYPOINT), generation.bundle.revision
