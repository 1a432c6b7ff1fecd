"""The embedded engine: Rego evaluated by regopy in recycled worker processes.

A policy is compiled and its own *_test.rego run before it serves; a bundle
that fails either is reported (log + health detail) and the previous one
keeps serving. Decisions are evaluated in a pool of worker processes
(sidecar/policy/worker.py): regopy leaks native memory per distinct input
and can crash, so each worker is replaced after `recycle_after` decisions,
and a worker that dies costs the call it was deciding (a deny), not the
sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from sidecar.policy import worker
from sidecar.policy.bundle import BundleError, PolicyBundle, load_bundle
from sidecar.policy.compiler import EvaluationError, compile_decision
from sidecar.policy.decision import Decision, MalformedDecision, parse_decision
from sidecar.policy.validate import validate_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Generation:
    number: int
    bundle: PolicyBundle
    snapshot: Path  # what the workers load (sidecar/policy/worker.py)


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


def _new_pool(workers: int, recycle_after: int) -> ProcessPoolExecutor:
    # forkserver: workers are forked from a clean server process, never from
    # this one with its gRPC threads.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sidecar.policy.worker"])
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        max_tasks_per_child=recycle_after,
        initializer=worker.exit_with,
        initargs=(os.getpid(),),
    )


class EmbeddedEngine:
    name = "embedded"

    def __init__(
        self,
        directory: str | Path,
        *,
        timeout_ms: int = 100,
        workers: int = 2,
        recycle_after: int = 1000,
        reload: bool = True,
        run_bundle_tests: bool = True,
    ):
        """`run_bundle_tests=False` skips the bundle's own tests (for one-off `check`s), never its compile."""
        self._directory = Path(directory)
        self._run_bundle_tests = run_bundle_tests
        self._timeout = timeout_ms / 1000
        self._workers = workers
        self._recycle_after = recycle_after
        self._reload = reload
        self._generation: _Generation | None = None
        self._retired: list[Path] = []  # snapshots in-flight calls may still read
        self._pool = _new_pool(workers, recycle_after)
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
        self._pool.shutdown(wait=False, cancel_futures=True)
        for snapshot in [*self._retired, *([self._generation.snapshot] if self._generation else [])]:
            worker.remove_snapshot(snapshot)

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
        previous = self._generation
        number = previous.number + 1 if previous else 1
        self._generation = _Generation(number, bundle, worker.write_snapshot(bundle))
        if previous is not None:
            self._retired.append(previous.snapshot)
            while len(self._retired) > 1:  # keep one: calls in flight may still load it
                worker.remove_snapshot(self._retired.pop(0))

    async def _warm_workers(self) -> None:
        """Start the workers and compile the serving generation before calls need it."""
        generation = self._generation
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(
                loop.run_in_executor(self._pool, worker.warm, str(generation.snapshot), generation.bundle.revision)
                for _ in range(self._workers)
            ))
        except BrokenProcessPool:
            self._replace_pool()

    def _replace_pool(self) -> None:
        log.error("an embedded policy worker died; starting a new pool")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = _new_pool(self._workers, self._recycle_after)

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
        generation = self._generation
        if generation is None:
            return Decision.failed("policy_unavailable: no policy is loaded", engine=self.name)
        revision = generation.bundle.revision

        def failed(reason: str) -> Decision:
            return Decision.failed(reason, engine=self.name, policy_revision=revision)

        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._pool, worker.evaluate, str(generation.snapshot), revision, input_document),
                timeout=self._timeout,
            )
        except asyncio.TimeoutError:
            return failed(
                f"policy_timeout: the embedded policy engine did not decide within {self._timeout * 1000:.0f} ms"
            )
        except BrokenProcessPool:
            self._replace_pool()
            return failed("policy_error: the embedded Rego interpreter crashed while deciding this call")
        except EvaluationError as exc:
            return failed(f"policy_error: the embedded policy engine failed: {str(exc)[:500]}")
        except Exception as exc:  # fail closed on anything the interpreter throws
            return failed(f"policy_error: the embedded policy engine failed: {type(exc).__name__}: {str(exc)[:500]}")
        try:
            return parse_decision(result, engine=self.name, policy_revision=revision)
        except MalformedDecision as exc:
            return failed(f"policy_malformed: {exc}")
