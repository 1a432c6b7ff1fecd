"""The policy in force: decisions from OPA, the catalog of the same revision, hot reload.

Two ways to reach OPA, one decision path (`OpaClient`):

- managed (no `url`): the policy directory is copied to a private snapshot,
  must pass `opa check --strict` and `opa test`, is built with `opa build
  --revision <revision>` (sidecar/policy/catalog.py computes the revision from
  the files), and served by an `OpaRunner` (`opa run --server` on a private
  unix socket). A changed directory goes through the same steps with a *new*
  OPA; once that one is healthy, calls switch to it in one step, and the old
  OPA is stopped when its last call has returned (blue/green). A directory
  that fails any step never serves: the reason is logged and kept in the
  health detail, and the previous revision keeps serving. Going back to the
  serving revision is logged too.
- external (`url`): OPA is run by someone else (the OPA container in the
  pod) and loads its own bundle. The sidecar reads only the catalog from the
  directory (reloaded when it changes); `policy_revision` is what OPA reports.

`decide` never raises (sidecar/policy/decision.py DecisionClient). Errors at
start: `OpaNotFound` (no binary; the message names the fix), `PolicyRejected`
(the first policy fails a step; `problems` name file and line), `OpaStartError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.policy.catalog import Catalog, CatalogError, bundle_files, read_data
from sidecar.policy.decision import Decision
from sidecar.policy.opa import tools
from sidecar.policy.opa.client import OpaClient, OpaClientOptions
from sidecar.policy.opa.runner import OpaRunner, OpaRunOptions, OpaStartError, find_opa
from sidecar.reasons import POLICY_UNAVAILABLE, Reason

log = logging.getLogger(__name__)


WORKDIR_PREFIX = "sidecar-opa-"  # + owner pid + "-" + random: one per managed PolicyService
_WORKDIR = re.compile(re.escape(WORKDIR_PREFIX) + r"(\d+)-[^/]+")


def remove_stale_workdirs(parent: str | Path | None = None) -> list[Path]:
    """Remove the managed-OPA work directories (snapshots, bundles, sockets) left by dead owners.

    A sidecar killed with SIGKILL cannot remove its `sidecar-opa-<pid>-*` directory in `parent`
    (default: `tempfile.gettempdir()`, i.e. $TMPDIR or /tmp); the next one to start does. Only
    directories owned by this user, named by a pid that no longer exists, are removed; a live pid
    (even another user's, or a pid reused since) keeps its directory. Directories of owners in
    another pid namespace sharing this temp dir cannot be told apart: give each its own $TMPDIR.
    Returns the directories removed; errors are logged, never raised.
    """
    removed: list[Path] = []
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    try:
        entries = list(parent.iterdir())
    except OSError as exc:
        log.warning("cannot list %s for stale OPA work directories: %s", parent, exc)
        return removed
    for entry in entries:
        match = _WORKDIR.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            status = entry.lstat()
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
                continue
            os.kill(int(match.group(1)), 0)
            continue  # the owner is alive
        except PermissionError:
            continue  # alive, another user's
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log.info("removed %s, left by a sidecar (pid %s) that is gone", entry, match.group(1))
    return removed


class PolicyRejected(ValueError):
    """A policy directory may not serve; `problems` are one line each ("file:row: ...")."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ManagedOpaOptions:
    """How the managed OPA is run (policy.opa.* in docs/configuration.md)."""

    binary: str = "opa"
    log_level: str = "error"
    ready_timeout_seconds: float = 15.0
    restart_backoff_max_seconds: float = 5.0
    liveness_timeout_seconds: float = 0.0  # 0: a hung OPA is not killed
    gogc: int = 0  # 0: Go's default
    batch_scheduling: bool = False  # SCHED_BATCH (OpaRunOptions.batch_scheduling)


@dataclass
class _Generation:
    number: int
    catalog: Catalog
    client: OpaClient
    runner: OpaRunner | None  # None for an external OPA
    bundle: Path | None  # the built tarball the runner serves


# A rejected reload's log line and health detail name this many problems, each cut to MAX_PROBLEM_CHARS;
# the rest is counted (14 failing tests made a line of several KB). DEBUG logs them all.
SHOWN_PROBLEMS = 3
MAX_PROBLEM_CHARS = 300


def first_problems(problems: list[str], where_all: str) -> list[str]:
    """The first SHOWN_PROBLEMS problems (each at most MAX_PROBLEM_CHARS), then `and N more (<where_all>)`."""
    shown = [p if len(p) <= MAX_PROBLEM_CHARS else p[: MAX_PROBLEM_CHARS - 1] + "…" for p in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        shown.append(f"and {len(problems) - SHOWN_PROBLEMS} more ({where_all})")
    return shown


class _ServingCatalog:
    """The catalog of the revision serving now (the Gate's `Catalog`)."""

    def __init__(self, service: "PolicyService"):
        self._service = service

    def entry(self, tool: str) -> dict | None:
        return self._service._current_generation().catalog.entry(tool)

    @property
    def revision(self) -> str:
        return self._service._current_generation().catalog.revision


class PolicyService:
    def __init__(
        self,
        directory: str | Path,
        client_options: OpaClientOptions = OpaClientOptions(),
        *,
        url: str = "",
        managed: ManagedOpaOptions = ManagedOpaOptions(),
        reload: bool = True,
        role: str = "policy",
    ):
        """`role` names this service in its log lines: "policy", or "shadow policy" for policy.shadow_dir,
        so an operator reading `... reload of DIR rejected` knows which bundle did not change."""
        self.role = role
        self.directory = Path(directory)
        self._client_options = client_options
        self._url = url
        self._managed = managed
        self._watch_directory = reload
        self._binary = ""
        self._workdir: Path | None = None
        self._current: _Generation | None = None
        self._numbers = 0
        self._watcher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self.last_reload_error: str | None = None
        self._rejected_revision = ""
        self.catalog = _ServingCatalog(self)

    @property
    def runner(self) -> OpaRunner | None:
        """The managed OPA serving now (its pid, health, restarts); None with an external OPA or before start."""
        return self._current.runner if self._current is not None else None

    @property
    def managed(self) -> bool:
        return not self._url

    async def __aenter__(self) -> "PolicyService":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self.managed:
            self._binary = find_opa(self._managed.binary)
            await asyncio.to_thread(remove_stale_workdirs)
            # Short (unix socket paths are limited) and named by its owner's pid (remove_stale_workdirs).
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        try:
            self._current = await self._new_generation()
        except BaseException:
            self._remove_workdir()
            raise
        log.info("%s %s serving revision %s (%s)", self.role, self.directory, self.revision, self._describe())
        if self._watch_directory:
            self._watcher = asyncio.create_task(self._watch(), name="policy-reload")

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await asyncio.gather(*self._retiring, return_exceptions=True)  # bounded: see _retire
        if self._current is not None:
            current, self._current = self._current, None
            await self._stop_generation(current)
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _describe(self) -> str:
        generation = self._current
        if generation is None or generation.runner is None:
            return f"OPA at {self._url}"
        return f"managed OPA pid {generation.runner.pid} on {generation.runner.url}"

    # --- the DecisionClient --------------------------------------------------------

    def _current_generation(self) -> _Generation:
        if self._current is None:
            raise RuntimeError("the policy service is not started")
        return self._current

    async def decide(self, input_document: dict) -> Decision:
        generation = self._current
        if generation is None:
            return Decision.failed(str(Reason(POLICY_UNAVAILABLE, "no policy is serving")), engine="opa")
        return await generation.client.decide(input_document)

    @property
    def revision(self) -> str:
        """The revision serving now: OPA's own report once it has answered, else that of the files it was built from."""
        generation = self._current
        if generation is None:
            return ""
        return generation.client.revision or generation.catalog.revision

    def ready(self) -> tuple[bool, str]:
        generation = self._current
        if generation is None:
            return False, "no policy is serving"
        ok, detail = generation.client.ready()
        if generation.runner is not None:
            alive, why = generation.runner.health()
            if not alive:
                ok, detail = False, f"{why}; {detail}"
        detail = f"serving revision {self.revision}; {detail}"
        if self.last_reload_error:
            detail += f"; last reload rejected: {self.last_reload_error}"
        return ok, detail

    # --- generations -------------------------------------------------------------

    async def _new_generation(self) -> _Generation:
        self._numbers += 1
        number = self._numbers
        if not self.managed:
            catalog = await asyncio.to_thread(_read_catalog, self.directory)
            client = OpaClient(self._url, self._client_options)
            await client.start()
            return _Generation(number, catalog, client, None, None)
        catalog, bundle = await self._prepare(number)
        assert self._workdir is not None
        runner = OpaRunner(
            OpaRunOptions(
                binary=self._binary,
                bundle=bundle,
                socket=self._workdir / f"opa-{number}.sock",
                log_level=self._managed.log_level,
                ready_timeout_seconds=self._managed.ready_timeout_seconds,
                restart_backoff_max_seconds=self._managed.restart_backoff_max_seconds,
                liveness_timeout_seconds=self._managed.liveness_timeout_seconds,
                gogc=self._managed.gogc,
                batch_scheduling=self._managed.batch_scheduling,
            )
        )
        try:
            await runner.start()
        except OpaStartError as exc:
            bundle.unlink(missing_ok=True)
            raise PolicyRejected([f"OPA would not serve revision {catalog.revision}: {exc}"]) from None
        # Built with `opa build --revision <catalog.revision>`: a decision that fails before OPA has answered once
        # (a policy_error on the first call) still names the revision that failed.
        generation = _Generation(
            number, catalog, OpaClient(runner.url, self._client_options, revision=catalog.revision), runner, bundle
        )
        try:
            await generation.client.start()
        except BaseException:  # failed or cancelled (a signal during the start): no OPA is left running
            await asyncio.shield(self._stop_generation(generation))
            raise
        return generation

    async def _prepare(self, number: int) -> tuple[Catalog, Path]:
        """Snapshot the directory, lint, test and build it; PolicyRejected naming every problem."""
        assert self._workdir is not None
        snapshot = self._workdir / f"policy-{number}"
        try:
            await asyncio.to_thread(_snapshot, self.directory, snapshot)
            catalog = await asyncio.to_thread(_read_catalog, snapshot)
            problems = await tools.check(self._binary, snapshot)
            if problems:
                raise PolicyRejected([f"opa check --strict: {p}" for p in problems])
            report = await tools.run_tests(self._binary, snapshot)
            if report.problems:
                raise PolicyRejected([f"opa test: {p}" for p in report.problems])
            if not report.results:
                log.warning("%s %s has no test_* rules", self.role, self.directory)
            if report.failed:
                # In file order: a rejected reload's log line shows only the first few (first_problems).
                raise PolicyRejected(
                    [f"opa test: {r.file}:{r.row}: {r.rule} {'errored: ' + r.error if r.error else 'failed'}"
                     for r in sorted(report.failed, key=lambda r: (r.file, r.row))]
                    + [f"{len(report.failed)} of {len(report.results)} tests failed"]
                )
            bundle = self._workdir / f"bundle-{number}.tar.gz"
            try:
                await tools.build(self._binary, snapshot, bundle, catalog.revision)
            except tools.PolicyToolError as exc:
                raise PolicyRejected([f"opa build: {p}" for p in exc.problems]) from None
            return catalog, bundle
        except tools.PolicyToolError as exc:
            raise PolicyRejected(exc.problems) from None
        finally:
            await asyncio.to_thread(shutil.rmtree, snapshot, True)

    async def _stop_generation(self, generation: _Generation) -> None:
        await generation.client.aclose()
        if generation.runner is not None:
            await generation.runner.aclose()
        if generation.bundle is not None:
            generation.bundle.unlink(missing_ok=True)

    async def _retire(self, generation: _Generation) -> None:
        """Stop a replaced generation once its calls in flight have returned (at most twice the budget)."""
        try:
            await generation.client.drained(timeout=max(1.0, 2 * self._client_options.timeout_ms / 1000))
        finally:
            await self._stop_generation(generation)

    # --- reload --------------------------------------------------------------------

    async def reload(self) -> bool:
        """Serve the directory's current contents if they pass every step; True if they now serve."""
        async with self._lock:
            return await self._reload_once()

    async def _reload_once(self) -> bool:
        current = self._current_generation()
        started = time.monotonic()
        try:
            _, revision = await asyncio.to_thread(read_data, self.directory)
        except CatalogError as exc:
            return self._rejected(exc.problems)
        if revision == current.catalog.revision:
            if self.last_reload_error is not None:
                log.info("%s %s is back to the serving revision %s; nothing to reload", self.role, self.directory, revision)
                self.last_reload_error = None
                self._rejected_revision = ""
            return True
        if revision == self._rejected_revision:
            return False  # already tried, rejected and logged
        self._rejected_revision = revision
        if not self.managed:
            try:
                catalog = await asyncio.to_thread(_read_catalog, self.directory)
            except PolicyRejected as exc:
                return self._rejected(exc.problems)
            current.catalog = catalog
            self.last_reload_error = None
            self._rejected_revision = ""
            log.info("%s catalog reloaded from %s: revision %s", self.role, self.directory, catalog.revision)
            return True
        try:
            generation = await self._new_generation()
        except PolicyRejected as exc:
            return self._rejected(exc.problems)
        previous, self._current = current, generation
        self.last_reload_error = None
        self._rejected_revision = ""
        log.info(
            "%s reloaded in %.2f s: now serving revision %s (was %s; %s)",
            self.role, time.monotonic() - started, generation.catalog.revision, previous.catalog.revision, self._describe(),
        )
        task = asyncio.create_task(self._retire(previous), name=f"policy-retire-{previous.number}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    def _rejected(self, problems: list[str]) -> bool:
        shown = first_problems(problems, f"`agent-sidecar policy test {self.directory}` lists them")
        self.last_reload_error = "; ".join(shown)
        log.error(
            "%s reload of %s rejected, revision %s keeps serving:\n  %s",
            self.role, self.directory, self.revision, "\n  ".join(shown),
        )
        if len(shown) < len(problems) or any(len(p) > MAX_PROBLEM_CHARS for p in problems):
            log.debug("%s reload of %s rejected: every problem:\n  %s", self.role, self.directory, "\n  ".join(problems))
        return False

    async def _watch(self) -> None:
        """Reload on every change, and every 2 s regardless (a change made before the watch began, or one
        inotify misses, e.g. a Kubernetes ConfigMap's symlink swap); an unchanged revision costs one digest."""
        from watchfiles import awatch

        async for _changes in awatch(self.directory, debounce=200, step=50, rust_timeout=2000, yield_on_timeout=True):
            try:
                await self.reload()
            except Exception:  # never let the watcher die
                log.exception("%s reload failed unexpectedly", self.role)


def _read_catalog(directory: Path) -> Catalog:
    try:
        return Catalog.read(directory)
    except CatalogError as exc:
        raise PolicyRejected(exc.problems) from None


def _snapshot(source: Path, target: Path) -> None:
    """Copy the files OPA loads, so the directory may change while this revision is checked and built."""
    if not source.is_dir():
        raise PolicyRejected([f"{source}: policy directory does not exist"])
    for path in bundle_files(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    target.mkdir(parents=True, exist_ok=True)
