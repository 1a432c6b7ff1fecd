"""The escalation store on SQLite and on a real PostgreSQL server: atomic transitions, once.

PostgreSQL is Debian's server package, started once per test run in a temp
dir on a unix socket (tests/doubles/postgres.py); each test gets a fresh
database. "Two sidecars" are two store objects on the same file / database,
each with its own connections.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from sidecar.escalation import APPROVED, DENIED, EXPIRED, PENDING, USED, EscalationRecord
from sidecar.escalation.feed import ChangeFeed
from sidecar.escalation.service import new_escalation_id
from sidecar.escalation.store import PostgresStore, SqliteStore
from tests.doubles.escalation import STORES, decide

NOW = 1_800_000_000.0


def record(fingerprint: str = "sha256:aa", *, now: float = NOW, ttl: float = 900, tool: str = "send_email",
           subject: str = "spiffe://example.org/agent") -> EscalationRecord:
    return EscalationRecord(
        id=new_escalation_id(), fingerprint=fingerprint, subject=subject, subject_source="dev",
        delegation=("spiffe://example.org/orchestrator",), tool=tool, server="mail",
        arguments_digest="sha256:" + "1" * 64, arguments_preview={"to": "cfo@example.com", "n": 1.5},
        task_id="t-1", intent="send the report", call_id="c-1", decision_id="d-1",
        reasons=("high_risk_tool: x",), policy_revision="sha256:rev", trace_id="a" * 32, span_id="b" * 16,
        created_at=now, expires_at=now + ttl, state=PENDING, updated_at=now, sidecar="s1",
        signals={"risk_score": 0.5, "model": "m-1"}, catalog={"risk": "high", "reversible": False},
        arguments={"to": "cfo@example.com", "n": 1.5, "password": "pw"}, agent_seen_at=now,
    )


@pytest.fixture(params=[*STORES, "sqlite-unsynced"])
async def stores(request, tmp_path):
    """Two store objects over the same data: two sidecars sharing it. `sqlite-unsynced` commits new
    escalations without their own sync, as the served sidecar does (store.py, Durability)."""
    if request.param == "sqlite":
        make = lambda: SqliteStore(tmp_path / "esc.db")  # noqa: E731
    elif request.param == "sqlite-unsynced":
        make = lambda: SqliteStore(tmp_path / "esc.db", sync_new_escalations=False)  # noqa: E731
    else:
        from tests.doubles.postgres import PostgresServer

        dsn = PostgresServer.shared().new_database()
        make = lambda: PostgresStore(dsn, pool_size=4)  # noqa: E731
    first, second = make(), make()
    await first.open()
    await second.open()
    yield first, second, make
    await first.aclose()
    await second.aclose()


async def test_round_trip_keeps_every_field(stores):
    store, _, _ = stores
    original = record()
    stored, created, expired = await store.create(original, NOW)
    assert created and expired == [] and stored == original
    assert await store.get(original.id) == original
    assert await store.get("esc-" + "0" * 32) is None


async def test_same_call_while_active_gets_the_same_escalation(stores):
    store, other, _ = stores
    first, created, _ = await store.create(record("sha256:same"), NOW)
    again, created_again, _ = await other.create(record("sha256:same"), NOW + 1)
    assert created and not created_again and again.id == first.id
    different, created_other, _ = await store.create(record("sha256:other"), NOW + 1)
    assert created_other and different.id != first.id
    # approved but unused: still the same escalation for the same call
    await decide(store, first.id, APPROVED, approver="email:a@x", via="", note="", now=NOW + 2, use_by=NOW + 300)
    reused, created3, _ = await store.create(record("sha256:same"), NOW + 3)
    assert not created3 and reused.id == first.id and reused.state == APPROVED


async def test_an_overdue_pending_one_is_expired_and_replaced(stores):
    store, _, _ = stores
    old, _, _ = await store.create(record("sha256:fp", ttl=10), NOW)
    new, created, expired = await store.create(record("sha256:fp", now=NOW + 11), NOW + 11)
    assert created and new.id != old.id
    assert [e.id for e in expired] == [old.id] and expired[0].state == EXPIRED


async def test_two_sidecars_creating_the_same_call_at_once_make_one_escalation(stores):
    store, other, _ = stores
    results = await asyncio.gather(
        *(s.create(record("sha256:race"), NOW) for s in (store, other, store, other, store, other))
    )
    assert len({r[0].id for r in results}) == 1
    assert sum(1 for r in results if r[1]) == 1
    assert len(await store.list(state=PENDING)) == 1


async def test_racing_approvers_exactly_one_decision_wins(stores):
    store, other, _ = stores
    escalation, _, _ = await store.create(record(), NOW)
    attempts = []
    for i in range(10):
        target = store if i % 2 else other
        state = APPROVED if i % 3 else DENIED
        attempts.append(decide(target, escalation.id, state, approver=f"email:approver{i}@x", via="", note=f"n{i}",
                                      now=NOW + 1, use_by=NOW + 301 if state == APPROVED else None))
    results = await asyncio.gather(*attempts)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    final = await other.get(escalation.id)
    assert final.state == winners[0].state and final.approver == winners[0].approver and final.note == winners[0].note


async def test_a_claimed_escalation_stays_pending_and_unusable_until_decided_under_its_claim(stores):
    """The approval's record is written between the claim and the decision (service._decide): meanwhile the
    row is pending to every reader, no retry can use it and no one else can decide it; a dropped claim
    leaves it as it was, and an expiry meanwhile wins over the late decision."""
    store, other, _ = stores
    escalation, _, _ = await store.create(record("sha256:claimed"), NOW)
    claimed = await store.claim(escalation.id, "token-1", NOW + 1)
    assert claimed == escalation
    assert await other.claim(escalation.id, "token-2", NOW + 1) is None  # one claim at a time, across sidecars
    assert (await other.get(escalation.id)) == escalation  # pending, arguments kept, no change to watch
    assert await other.consume(escalation.id, "sha256:claimed", NOW + 2, "d-retry") is None
    again, created, _ = await other.create(record("sha256:claimed"), NOW + 2)
    assert (again.id, again.state, created) == (escalation.id, PENDING, False)  # the repeat gets the same one
    assert await other.decide(escalation.id, "token-2", APPROVED, approver="a:c", via="", note="", now=NOW + 2,
                              use_by=NOW + 60) is None  # not its claim
    await store.unclaim(escalation.id, "token-2")  # not its claim either: the claim stays
    assert await other.claim(escalation.id, "token-3", NOW + 2) is None
    await store.unclaim(escalation.id, "token-1")
    assert (await other.get(escalation.id)).state == PENDING
    assert await decide(other, escalation.id, DENIED, note="no", now=NOW + 3) is not None  # decidable again

    late, _, _ = await store.create(record("sha256:late-claim", ttl=10), NOW)
    await store.claim(late.id, "token-4", NOW + 9)
    assert [e.id for e in await other.expire(NOW + 11)] == [late.id]
    assert await store.decide(late.id, "token-4", APPROVED, approver="a:b", via="", note="", now=NOW + 9,
                              use_by=NOW + 60) is None
    assert (await store.get(late.id)).state == EXPIRED


async def test_decide_refuses_what_is_not_pending_or_is_overdue(stores):
    store, _, _ = stores
    late, _, _ = await store.create(record("sha256:late", ttl=5), NOW)
    assert await decide(store, late.id, APPROVED, approver="a:b", via="", note="", now=NOW + 5, use_by=NOW + 9) is None
    assert (await store.get(late.id)).state == PENDING  # nothing changed
    done, _, _ = await store.create(record("sha256:done"), NOW)
    assert await decide(store, done.id, DENIED, approver="a:b", via="", note="no", now=NOW + 1, use_by=None)
    assert await decide(store, done.id, APPROVED, approver="a:c", via="", note="", now=NOW + 2, use_by=NOW + 9) is None
    assert (await store.get(done.id)).approver == "a:b"
    assert await decide(store, "esc-" + "f" * 32, APPROVED, approver="a:b", via="", note="", now=NOW, use_by=NOW) is None


async def test_an_approval_is_consumed_once_for_its_fingerprint_inside_the_window(stores):
    store, other, _ = stores
    escalation, _, _ = await store.create(record("sha256:fp"), NOW)
    assert await store.consume(escalation.id, "sha256:fp", NOW + 1, "d-x") is None  # pending: nothing to use
    await decide(store, escalation.id, APPROVED, approver="a:b", via="", note="", now=NOW + 1, use_by=NOW + 100)
    assert await store.consume(escalation.id, "sha256:other", NOW + 2, "d-x") is None  # another call
    results = await asyncio.gather(*(s.consume(escalation.id, "sha256:fp", NOW + 3, f"d-{i}")
                                     for i, s in enumerate((store, other, store, other))))
    used = [r for r in results if r is not None]
    assert len(used) == 1 and used[0].state == USED and used[0].used_by_decision.startswith("d-")
    assert await store.consume(escalation.id, "sha256:fp", NOW + 4, "d-again") is None


async def test_unused_approval_and_undecided_escalation_expire_exactly_once(stores):
    store, other, _ = stores
    pending, _, _ = await store.create(record("sha256:p", ttl=10), NOW)
    approved, _, _ = await store.create(record("sha256:a", ttl=10), NOW)
    await decide(store, approved.id, APPROVED, approver="a:b", via="", note="", now=NOW + 1, use_by=NOW + 20)
    assert await store.expire(NOW + 5) == []
    first, second = await asyncio.gather(store.expire(NOW + 30), other.expire(NOW + 30))
    expired = first + second
    assert sorted(e.id for e in expired) == sorted([pending.id, approved.id])
    assert all(e.state == EXPIRED for e in expired)
    assert await store.consume(approved.id, "sha256:a", NOW + 31, "d") is None
    assert await store.expire(NOW + 60) == []


async def test_withdraw_only_touches_pending(stores):
    store, _, _ = stores
    escalation, _, _ = await store.create(record(), NOW)
    withdrawn = await store.withdraw(escalation.id, NOW + 1)
    assert withdrawn.state == EXPIRED
    assert await store.withdraw(escalation.id, NOW + 2) is None


async def test_withdraw_voids_an_approval_given_before_it_and_nothing_after_use_or_denial(stores):
    """An escalation is listed from its insert: an approver can approve it before the gate withdraws
    it (its decision could not be recorded). The approval must not outlive the withdraw."""
    store, other, _ = stores
    approved, _, _ = await store.create(record("sha256:ap"), NOW)
    await decide(other, approved.id, APPROVED, approver="a:b", via="", note="", now=NOW + 1, use_by=NOW + 60)
    withdrawn = await store.withdraw(approved.id, NOW + 2)
    assert withdrawn.state == EXPIRED and withdrawn.arguments is None
    assert await store.consume(approved.id, "sha256:ap", NOW + 3, "d-retry") is None
    used, _, _ = await store.create(record("sha256:us"), NOW)
    await decide(store, used.id, APPROVED, approver="a:b", via="", note="", now=NOW + 1, use_by=NOW + 60)
    assert (await store.consume(used.id, "sha256:us", NOW + 2, "d-retry")).state == USED
    denied, _, _ = await store.create(record("sha256:de"), NOW)
    await decide(store, denied.id, DENIED, approver="a:b", via="", note="", now=NOW + 1, use_by=None)
    for done in (used, denied):
        assert await store.withdraw(done.id, NOW + 3) is None
    assert (await store.get(used.id)).state == USED and (await store.get(denied.id)).state == DENIED


async def test_list_filters_and_changes_since(stores):
    store, _, _ = stores
    a, _, _ = await store.create(record("sha256:1", tool="send_email"), NOW)
    b, _, _ = await store.create(record("sha256:2", tool="delete_repo", now=NOW + 1), NOW + 1)
    c, _, _ = await store.create(record("sha256:3", tool="delete_repo", subject="spiffe://example.org/other",
                                        now=NOW + 2), NOW + 2)
    await decide(store, a.id, DENIED, approver="a:b", via="", note="", now=NOW + 3, use_by=None)
    assert [e.id for e in await store.list()] == [c.id, b.id, a.id]  # newest first
    assert [e.id for e in await store.list(state=PENDING)] == [c.id, b.id]
    assert [e.id for e in await store.list(tool="delete_repo", subject="spiffe://example.org/other")] == [c.id]
    assert [e.id for e in await store.list(limit=1)] == [c.id]
    assert [e.id for e in await store.changed_since(NOW + 2.5)] == [a.id]


async def test_pending_escalations_survive_a_restart(stores):
    store, other, make = stores
    escalation, _, _ = await store.create(record(), NOW)
    await store.aclose()
    await other.aclose()
    reopened = make()
    await reopened.open()
    try:
        assert (await reopened.get(escalation.id)) == escalation
        assert await decide(reopened, escalation.id, APPROVED, approver="a:b", via="", note="", now=NOW + 1,
                                     use_by=NOW + 10)
    finally:
        await reopened.aclose()
    await store.open()  # the fixture closes both again
    await other.open()


async def test_sqlite_runs_in_wal_mode(tmp_path):
    store = SqliteStore(tmp_path / "wal.db")
    await store.open()
    await store.aclose()
    with sqlite3.connect(tmp_path / "wal.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_unreachable_stores_say_so():
    bad = SqliteStore("/proc/no/such/dir/esc.db")
    with pytest.raises(Exception) as info:
        await bad.open()
    assert "cannot open the escalation store" in str(info.value)
    pg = PostgresStore("host=/tmp/no-such-postgres-dir port=1 user=x dbname=x connect_timeout=1", timeout_ms=500)
    await pg.open()  # not fatal: reported by health, retried on use
    try:
        ok, detail = pg.health()
        assert not ok and "postgres" in detail
        from sidecar.escalation import StoreError

        with pytest.raises(StoreError):
            await pg.get("esc-" + "0" * 32)
    finally:
        await pg.aclose()


# The table as sidecars before the approvers' view created it (no signals, catalog, arguments, agent columns).
OLD_TABLE = """CREATE TABLE sidecar_escalations (
    id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, subject TEXT NOT NULL, subject_source TEXT NOT NULL DEFAULT '',
    delegation TEXT NOT NULL DEFAULT '[]', tool TEXT NOT NULL, server TEXT NOT NULL DEFAULT '',
    arguments_digest TEXT NOT NULL, arguments_preview TEXT, task_id TEXT NOT NULL DEFAULT '',
    intent TEXT NOT NULL DEFAULT '', call_id TEXT NOT NULL DEFAULT '', decision_id TEXT NOT NULL DEFAULT '',
    reasons TEXT NOT NULL DEFAULT '[]', policy_revision TEXT NOT NULL DEFAULT '', trace_id TEXT NOT NULL DEFAULT '',
    span_id TEXT NOT NULL DEFAULT '', created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL, approver TEXT NOT NULL DEFAULT '', approver_via TEXT NOT NULL DEFAULT '',
    decided_at DOUBLE PRECISION, note TEXT NOT NULL DEFAULT '', use_by DOUBLE PRECISION, used_at DOUBLE PRECISION,
    used_by_decision TEXT NOT NULL DEFAULT '', updated_at DOUBLE PRECISION NOT NULL, sidecar TEXT NOT NULL DEFAULT ''
)"""
OLD_ROW = ("INSERT INTO sidecar_escalations (id, fingerprint, subject, tool, arguments_digest, created_at, expires_at, "
           "state, updated_at) VALUES ('esc-" + "1" * 32 + "', 'sha256:old', 'spiffe://example.org/agent', "
           "'send_email', 'sha256:d', 1, 9999999999, 'pending', 1)")


@pytest.mark.parametrize("kind", STORES)
async def test_a_store_made_by_an_older_sidecar_gains_the_new_columns(kind, tmp_path):
    if kind == "sqlite":
        with sqlite3.connect(tmp_path / "old.db") as conn:
            conn.execute(OLD_TABLE)
            conn.execute(OLD_ROW)
        store = SqliteStore(tmp_path / "old.db")
    else:
        import psycopg

        from tests.doubles.postgres import PostgresServer

        dsn = PostgresServer.shared().new_database()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(OLD_TABLE)
            conn.execute(OLD_ROW)
        store = PostgresStore(dsn)
    await store.open()
    try:
        old = await store.get("esc-" + "1" * 32)
        assert old is not None and old.state == PENDING
        assert (old.signals, old.catalog, old.arguments, old.agent_seen_at) == (None, None, None, None)
        new = record()
        assert (await store.create(new, NOW))[0] == new
        await store.agent_wait(new.id, NOW + 1, opened_until=NOW + 30)
        assert (await store.get(new.id)).agent_waiting(NOW + 2)
    finally:
        await store.aclose()


async def test_leaving_pending_drops_the_unredacted_arguments(stores):
    store, other, _ = stores
    kept = [record("sha256:a"), record("sha256:b"), record("sha256:c", ttl=10), record("sha256:d")]
    for one in kept:
        await store.create(one, NOW)
    approved = await decide(store, kept[0].id, APPROVED, approver="a:b", via="", note="", now=NOW + 1, use_by=NOW + 100)
    denied = await decide(other, kept[1].id, DENIED, approver="a:b", via="", note="", now=NOW + 1, use_by=None)
    expired = await store.expire(NOW + 11)
    withdrawn = await store.withdraw(kept[3].id, NOW + 12)
    assert [approved.arguments, denied.arguments, withdrawn.arguments] == [None, None, None]
    assert [r.id for r in expired] == [kept[2].id] and expired[0].arguments is None
    for one in kept:
        assert (await other.get(one.id)).arguments is None


async def test_the_agents_waits_are_tracked_across_sidecars(stores):
    store, other, _ = stores
    one = record()
    await store.create(one, NOW)
    assert not (await store.get(one.id)).agent_waiting(NOW)
    await store.agent_wait(one.id, NOW + 1, opened_until=NOW + 60)
    await other.agent_wait(one.id, NOW + 2, opened_until=NOW + 30)  # a shorter wait does not cut a longer one
    seen = await other.get(one.id)
    assert seen.agent_waiting(NOW + 45) and seen.agent_seen_at == NOW + 2
    await other.agent_wait(one.id, NOW + 3, closed_until=NOW + 30, then_until=NOW + 3)  # not the latest: kept
    assert (await store.get(one.id)).agent_waiting(NOW + 45)
    await store.agent_wait(one.id, NOW + 4, closed_until=NOW + 60, then_until=NOW + 4)
    gone = await other.get(one.id)
    assert not gone.agent_waiting(NOW + 5) and gone.agent_seen_at == NOW + 4
    again, created, _ = await store.create(record(), NOW + 9)  # the agent asks again: seen, in the same transaction
    assert (again.id, created, again.agent_seen_at) == (one.id, False, NOW + 9)
    assert (await other.get(one.id)).agent_seen_at == NOW + 9


async def test_watch_never_steps_an_escalation_back_to_an_older_version(tmp_path):
    """A change can reach the feed after a newer one (an approval published before the escalation's
    own announcement, which carries the state at its insert): watchers never see pending again."""
    store = SqliteStore(tmp_path / "esc.db")
    await store.open()
    try:
        pending, _, _ = await store.create(record(), NOW)

        async def unused(_):
            raise AssertionError("watch neither reads nor settles")

        feed = ChangeFeed(store, read=unused, settle=unused, poll_interval=30, await_max=60, clock=lambda: NOW)
        seen: list[tuple[str, float]] = []
        watch = feed.watch()
        first = await anext(watch)
        seen.append((first.state, first.updated_at))
        approved = await decide(store, pending.id, APPROVED, approver="a:b", via="", note="", now=NOW + 1,
                                      use_by=NOW + 60)
        used = await store.consume(pending.id, "sha256:aa", NOW + 2, "d-retry")
        for version in (approved, pending, used, approved):  # the announcement's pending arrives late
            feed.publish(version)
        for _ in range(2):
            change = await asyncio.wait_for(anext(watch), 5)
            seen.append((change.state, change.updated_at))
        assert seen == [(PENDING, NOW), (APPROVED, NOW + 1), (USED, NOW + 2)]
        feed.publish(pending)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(watch), 0.3)
        await watch.aclose()
    finally:
        await store.aclose()
