"""Shared fixtures: real sidecars on loopback / unix sockets, with real policy bundles."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.client import AsyncClient
from sidecar.config import Config, load_config
from sidecar.server import RunningSidecar, start_sidecar
from tests.infra.volume import TinyVolume

REPO = Path(__file__).resolve().parent.parent
REGO = REPO / "rego"

# The pinned OPA `make install` builds (tools/build.sh), first on PATH as in the Makefile:
# the managed OPA, `policy test` and the differential test all run it.
os.environ["PATH"] = f"{REPO / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"


# The test files that take 15 s or more of a run (per-file totals of `pytest --durations`, 2026-11-30),
# longest first. Under pytest-xdist (`make test`: -n 2 --dist loadfile --no-loadscope-reorder) each
# worker takes whole files in collection order, so these start first and the short files fill in at
# the end, instead of one worker finishing the run alone on a long file that came up last.
LONG_FILES = (
    "test_reliability_fuzz.py", "test_spire_upstream_credentials.py", "test_mcp_malformed.py",
    "test_mcp_gateway.py", "test_docs_examples.py", "test_mcp_elicitation.py", "test_replay_policy.py",
    "test_mcp_mtls.py", "test_evidence_canonical.py", "test_spire_rotation.py", "test_policy_facts_sql.py",
    "test_policy_docs.py", "test_escalation_flow.py",
)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker, LONG_FILES first (each file's tests keep their order); one process: unchanged."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def write_policy(directory: Path, rego: str, tests: str | None = None, data: str | None = None) -> Path:
    """A one-file policy bundle for engine-mechanics tests (package sidecar)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.rego").write_text(textwrap.dedent(rego))
    if tests is not None:
        (directory / "policy_test.rego").write_text(textwrap.dedent(tests))
    if data is not None:
        (directory / "data.yaml").write_text(textwrap.dedent(data))
    return directory


# Every test sidecar gets these unless the test is about them: room for a loaded 2-core CI
# machine, where a decision's 100 ms default budget can pass while OPA waits for a core (a
# policy_timeout deny where the test needs an allow or an escalate), and no load shedding: a test's
# own work on the shared event loop is not the sidecar's load (tests/test_core_overload.py and the
# budget tests set their own). sidecar_config here and tests/doubles/escalation.make_config use it.
LOADED_MACHINE = {"policy.timeout_ms": 1000, "sidecar.overload_lag_ms": 0}

# On top of LOADED_MACHINE for a sidecar that decides calls near policy.max_input_bytes (800 KB of
# arguments, a list of 382,000 numbers): on a busy 2-core machine OPA takes 40-250 ms to read and decide
# one (an ordinary call 1-2 ms), so a load spike can pass the 1 s budget and turn the escalation or allow
# the test needs into a policy_timeout deny. Not for tests about the budget.
BIG_CALLS = {"policy.timeout_ms": 10_000}


SIMPLE_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: listed"], "obligations": {}} if {
        some name in ["echo", "search_docs"]
        name == input.tool.name
    }
"""


@pytest.fixture
def shipped_bundle(tmp_path: Path) -> Path:
    """A private copy of rego/, so a test may edit it."""
    target = tmp_path / "rego"
    shutil.copytree(REGO, target)
    return target


@pytest.fixture
def sidecar_config(tmp_path: Path) -> Callable[..., Config]:
    def make(**overrides) -> Config:
        settings = {
            "listen.tcp": "127.0.0.1:0",
            "listen.unix": str(tmp_path / "sock" / "sidecar.sock"),
            "policy.dir": str(REGO),
            "policy.reload": False,
            **LOADED_MACHINE,
            "sidecar.instance_id": "test-sidecar",
            "evidence.dir": str(tmp_path / "evidence"),
            "telemetry.exporter": "none",
            "identity.sources": ["dev"],  # dev mode on purpose: the default is workload_api
        }
        settings.update(overrides)
        return load_config(None, settings)

    return make


@pytest.fixture
def gateway_config(tmp_path: Path, sidecar_config) -> Callable[..., Config]:
    """`sidecar_config` for a sidecar reached through its MCP gateway: `policy` (Rego text) as its bundle,
    `upstreams` as mcp.upstreams, the gateway on a free loopback port and no unix socket."""
    def make(policy: str, upstreams: dict, **overrides) -> Config:
        return sidecar_config(**{
            "policy.dir": str(write_policy(tmp_path / "policy", policy)),
            "listen.unix": "",
            "mcp.listen": "127.0.0.1:0",
            "mcp.upstreams": upstreams,
            **overrides,
        })

    return make


@pytest.fixture
def tiny_volume(tmp_path: Path):
    """A real 256 KiB tmpfs at tmp_path/tiny that the test can fill (tests/infra/volume.py; needs root)."""
    with TinyVolume(tmp_path / "tiny", size_kib=256) as volume:
        yield volume


@pytest.fixture
async def running_sidecar() -> AsyncIterator[Callable[[Config], Awaitable[RunningSidecar]]]:
    """Start real sidecars; all are stopped at the end of the test."""
    started: list[RunningSidecar] = []

    async def start(config: Config) -> RunningSidecar:
        sidecar = await start_sidecar(config)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop(grace=0)


@pytest.fixture
async def sidecar(running_sidecar, sidecar_config) -> RunningSidecar:
    return await running_sidecar(sidecar_config())


@pytest.fixture
async def client(sidecar: RunningSidecar) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sidecar.addresses[0]) as client:
        yield client


@pytest.fixture(scope="module")
def spire():
    """A real SPIRE server in trust domain sidecar.test, one per test module that asks for it
    (test_deploy_loop.py has its own, in another trust domain)."""
    from tests.test_spire_sidecar import start_spire

    server = start_spire()
    yield server
    server.close()
