"""input.usage counters: the in-memory one and the PostgreSQL one, against the same contract.

PostgreSQL is Debian's server package started in a temp dir on a unix socket
(tests/doubles/postgres.py); each test gets a fresh database. "Two sidecars"
are two counter objects on one database, each with its own connection pool.
Time is an injected clock, so the window slides without sleeping.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.usage import UsageUnavailable
from sidecar.usage.memory import MemoryCounter
from sidecar.usage.postgres import PostgresCounter
from tests.doubles.postgres import PostgresServer

SUBJECT = "spiffe://example.org/ns/agents/sa/research"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def postgres(dsn: str, clock: Clock, **options) -> PostgresCounter:
    settings = {"window_seconds": 60, "task_idle_seconds": 3600.0, "timeout_ms": 2000, "pool_size": 4, "clock": clock}
    settings.update(options)
    return PostgresCounter(dsn, **settings)


@pytest.fixture
def database() -> str:
    return PostgresServer.shared().new_database()


@pytest.fixture(params=["memory", "postgres"])
async def make_counter(request, database):
    """make(clock) -> an opened counter; every one made is closed at the end."""
    made = []

    async def make(clock: Clock, **options):
        if request.param == "memory":
            counter = MemoryCounter(window_seconds=60, max_tracked=options.get("max_tracked", 1000), clock=clock)
        else:
            counter = postgres(database, clock)
        await counter.open()
        made.append(counter)
        return counter

    yield make
    for counter in made:
        await counter.aclose()


async def test_the_window_slides_per_subject_and_tool_and_tasks_count(make_counter):
    clock = Clock()
    usage = await make_counter(clock)
    first = await usage.count(SUBJECT, "send_email", "task-1")
    assert (first.calls_in_window, first.window_seconds, first.calls_in_task) == (1, 60, 1)
    clock.now += 30
    second = await usage.count(SUBJECT, "send_email", "task-1")
    assert (second.calls_in_window, second.calls_in_task) == (2, 2)
    clock.now += 30  # the first call is exactly window_seconds old: it has left the window
    third = await usage.count(SUBJECT, "send_email", "")
    assert (third.calls_in_window, third.calls_in_task) == (2, 0)
    assert (await usage.count(SUBJECT, "read_file", "task-1")).calls_in_window == 1  # another tool
    assert (await usage.count(SUBJECT + "x", "send_email", "")).calls_in_window == 1  # another subject
    clock.now += 61
    later = await usage.count(SUBJECT, "send_email", "task-1")
    assert (later.calls_in_window, later.calls_in_task) == (1, 4)  # the task counts on past the window


async def test_peek_sees_the_window_a_call_would_see_and_counts_nothing(make_counter):
    """The MCP gateway's tools/list phase reads the window without counting a call."""
    clock = Clock()
    usage = await make_counter(clock)
    assert (await usage.peek(SUBJECT, "send_email")).calls_in_window == 1
    await usage.count(SUBJECT, "send_email", "task-1")
    await usage.count(SUBJECT, "send_email", "task-1")
    for _ in range(3):  # peeking repeatedly changes nothing
        seen = await usage.peek(SUBJECT, "send_email")
        assert (seen.calls_in_window, seen.window_seconds, seen.calls_in_task) == (3, 60, 0)
    assert (await usage.count(SUBJECT, "send_email", "task-1")).calls_in_window == 3
    clock.now += 61
    assert (await usage.peek(SUBJECT, "send_email")).calls_in_window == 1


@pytest.mark.parametrize(
    "subject, tool, task",
    [
        ("spiffe://example.org/a", "t\x00b", "task\x00"),  # NUL: not storable as PostgreSQL text
        ("spiffe://example.org/a", "t\udc80", "\ud800"),  # lone surrogates
        ("spiffe://example.org/" + "a" * 2000, "t" * 256, "é" * 128),  # longest ids
        ("spiffe://example.org/a\nb", "t", "t'); DROP TABLE sidecar_usage_calls; --"),
    ],
)
async def test_any_string_is_a_key_and_keys_do_not_run_together(make_counter, subject, tool, task):
    usage = await make_counter(Clock())
    assert (await usage.count(subject, tool, task)).calls_in_task == 1
    again = await usage.count(subject, tool, task)
    assert (again.calls_in_window, again.calls_in_task) == (2, 2)
    # The parts of a key are kept apart: (a, bc) is not (ab, c).
    assert (await usage.count(subject + tool[:1], tool[1:], task + "-other")).calls_in_window == 1


async def test_memory_forgets_least_recently_used_keys_past_the_bound():
    usage = MemoryCounter(window_seconds=60, max_tracked=2, clock=Clock())
    for subject in ("a", "b", "c"):
        await usage.count(subject, "t", "")
    assert (await usage.count("a", "t", "")).calls_in_window == 1  # "a" was forgotten


async def test_two_sidecars_share_one_window_and_one_task_count(database):
    clock = Clock()
    first, second = postgres(database, clock), postgres(database, clock)
    await first.open()
    await second.open()
    try:
        seen = []
        for i in range(6):
            counter = first if i % 2 == 0 else second
            seen.append(await counter.count(SUBJECT, "send_email", "task-1"))
        assert [u.calls_in_window for u in seen] == [1, 2, 3, 4, 5, 6]
        assert [u.calls_in_task for u in seen] == [1, 2, 3, 4, 5, 6]
    finally:
        await first.aclose()
        await second.aclose()


async def test_concurrent_calls_on_two_sidecars_each_see_every_earlier_one(database):
    clock = Clock()
    sidecars = [postgres(database, clock, pool_size=8), postgres(database, clock, pool_size=8)]
    for counter in sidecars:
        await counter.open()
    try:
        calls = [sidecars[i % 2].count(SUBJECT, "send_email", "task-9") for i in range(40)]
        seen = await asyncio.gather(*calls)
    finally:
        for counter in sidecars:
            await counter.aclose()
    # No two calls were told the same count: each was counted after every earlier one.
    assert sorted(u.calls_in_window for u in seen) == list(range(1, 41))
    assert sorted(u.calls_in_task for u in seen) == list(range(1, 41))


async def test_counts_survive_a_restart_and_purge_forgets_old_rows(database):
    clock = Clock()
    before = postgres(database, clock)
    await before.open()
    for _ in range(3):
        await before.count(SUBJECT, "send_email", "task-1")
    await before.aclose()

    after = postgres(database, clock)  # a new sidecar process on the same database
    await after.open()
    try:
        usage = await after.count(SUBJECT, "send_email", "task-1")
        assert (usage.calls_in_window, usage.calls_in_task) == (4, 4)
        clock.now += 3601  # past the window and the task idle time
        await after.count("spiffe://example.org/other", "t", "")
        await after.purge()  # what the background task does once per window
        import psycopg

        async with await psycopg.AsyncConnection.connect(database) as conn:
            calls = await (await conn.execute("SELECT count(*) FROM sidecar_usage_calls")).fetchone()
            tasks = await (await conn.execute("SELECT count(*) FROM sidecar_usage_tasks")).fetchone()
        assert (calls[0], tasks[0]) == (1, 0)
        fresh = await after.count(SUBJECT, "send_email", "task-1")
        assert (fresh.calls_in_window, fresh.calls_in_task) == (1, 1)
    finally:
        await after.aclose()


async def test_a_database_that_lost_its_tables_gets_them_again(database):
    import psycopg

    counter = postgres(database, Clock())
    await counter.open()
    try:
        assert (await counter.count(SUBJECT, "t", "k")).calls_in_task == 1
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute("DROP TABLE sidecar_usage_calls, sidecar_usage_tasks")  # e.g. restored from an old backup
        usage = await counter.count(SUBJECT, "t", "k")
        assert (usage.calls_in_window, usage.calls_in_task) == (1, 1)
        assert counter.health()[0]
    finally:
        await counter.aclose()


async def test_an_unreachable_database_raises_and_health_says_why():
    counter = postgres("host=/tmp/no-such-postgres-dir port=1 user=x dbname=x", Clock(), timeout_ms=300)
    await counter.open()  # not fatal: counted (and refused) per call
    try:
        assert counter.health()[0]  # nothing has failed yet
        with pytest.raises(UsageUnavailable) as info:
            await counter.count(SUBJECT, "send_email", "")
        assert "postgres /tmp/no-such-postgres-dir:1/x" in str(info.value)
        ok, detail = counter.health()
        assert not ok and "calls are denied" in detail
    finally:
        await counter.aclose()


async def test_the_message_names_the_server_the_pg_variables_pick(monkeypatch):
    """dsn "" (the example's: PG* variables only): the refusal and the health detail name the server libpq
    was sent to, as the config's plaintext rule read it, never a default libpq did not use."""
    monkeypatch.setenv("PGHOST", "/tmp/no-such-postgres-dir")
    monkeypatch.setenv("PGPORT", "2")
    monkeypatch.setenv("PGDATABASE", "usage")
    monkeypatch.setenv("PGPASSWORD", "s3cret-pw")
    counter = postgres("", Clock(), timeout_ms=300)
    await counter.open()
    try:
        with pytest.raises(UsageUnavailable) as info:
            await counter.count(SUBJECT, "send_email", "")
        assert "postgres /tmp/no-such-postgres-dir:2/usage" in str(info.value)
        ok, detail = counter.health()
        assert not ok and "/tmp/no-such-postgres-dir:2/usage" in detail
        assert "s3cret-pw" not in str(info.value) + detail
    finally:
        await counter.aclose()


async def test_memory_fallback_counts_while_the_database_is_down():
    fallback = MemoryCounter(window_seconds=60, max_tracked=100, clock=Clock())
    counter = postgres("host=/tmp/no-such-postgres-dir port=1 user=x dbname=x", Clock(), timeout_ms=300,
                       fallback=fallback)
    await counter.open()
    try:
        assert (await counter.count(SUBJECT, "t", "k")).calls_in_window == 1
        assert (await counter.count(SUBJECT, "t", "k")).calls_in_task == 2
        ok, detail = counter.health()
        assert not ok and "memory meanwhile" in detail
    finally:
        await counter.aclose()


async def test_the_database_going_away_and_coming_back():
    server = PostgresServer().start()  # its own server: this test stops it
    try:
        clock = Clock()
        counter = postgres(server.new_database(), clock, timeout_ms=500)
        await counter.open()
        try:
            assert (await counter.count(SUBJECT, "t", "")).calls_in_window == 1
            server.pause()
            with pytest.raises(UsageUnavailable):
                await counter.count(SUBJECT, "t", "")
            assert not counter.health()[0]
            server.resume()
            usage = None
            deadline = time.monotonic() + 60  # the pool reconnects in the background: a deadline, not 50 tries
            while usage is None and time.monotonic() < deadline:
                try:
                    usage = await counter.count(SUBJECT, "t", "")
                except UsageUnavailable:
                    await asyncio.sleep(0.2)
            assert usage is not None and usage.calls_in_window == 2  # the count from before the outage is kept
            assert counter.health()[0]
        finally:
            await counter.aclose()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"usage.store": "redis"}, "usage.store: must be memory or postgres"),
        ({"usage.on_store_error": "allow"}, "usage.on_store_error: must be deny or memory"),
        ({"usage.timeout_ms": 0}, "usage.timeout_ms: must be positive"),
        ({"usage.max_tracked": -1}, "usage.max_tracked: must be positive"),
        ({"usage.task_idle_seconds": 0}, "usage.task_idle_seconds: must be positive"),
        ({"usage.store": "postgres", "usage.dsn": "host=db password=hunter2 dbname"}, "usage.dsn: not a libpq"),
    ],
)
def test_usage_config_is_checked_and_never_echoes_the_dsn(overrides, message):
    from sidecar.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "hunter2" not in str(info.value)
