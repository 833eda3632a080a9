"""LocalCache: idempotent apply, resync by diff, updates racing a resync."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dftx.cache import LocalCache, row_topic
from dftx.update import CREATE, DELETE, SET, DbUpdate


def u(action, key, value=None, topic=None, table="lport"):
    return DbUpdate(table, key, action, value, topic)


def test_apply_is_idempotent_and_reports_changes():
    c = LocalCache(["lport"])
    assert c.apply(u(CREATE, "p1", "a")) == u(CREATE, "p1", "a")
    assert c.apply(u(CREATE, "p1", "a")) is None
    assert c.apply(u(SET, "p1", "b")) == u(SET, "p1", "b")
    assert c.apply(u(CREATE, "p1", "c")).action == SET
    assert c.apply(u(SET, "p2", "x")).action == CREATE  # a set that finds no row
    assert c.apply(u(DELETE, "p1")) == u(DELETE, "p1")
    assert c.apply(u(DELETE, "p1")) is None
    assert c.values("lport") == {"p2": "x"} and len(c) == 1


def test_other_tables_and_control_events_are_ignored():
    c = LocalCache(["lport"])
    assert c.apply(u(CREATE, "k", "v", table="other")) is None
    assert c.apply(DbUpdate.control("sync", "t1")) is None
    assert len(c) == 0 and c.values("other") is None


def test_topics_keep_rows_apart_and_d_means_no_topic():
    c = LocalCache(["lport"])
    c.apply(u(CREATE, "k", "t1v", topic="t1"))
    c.apply(u(CREATE, "k", "none"))
    c.apply(u(CREATE, "k", "still none", topic="D"))
    assert c.rows("lport") == {("t1", "k"): "t1v", (None, "k"): "still none"}
    assert c.get("lport", "k", "t1") == "t1v" and c.get("lport", "k") == "still none"
    assert row_topic("D") is row_topic("") is row_topic(None) is None


def test_reconcile_reports_only_real_differences_in_scope():
    c = LocalCache(["lport", "lswitch"])
    for update in [u(CREATE, "same", "1"), u(CREATE, "changed", "old"),
                   u(CREATE, "gone", "x"), u(CREATE, "other", "t2", topic="t2")]:
        c.apply(update)
    snap = c.snapshot([None])
    changes = c.reconcile(snap, {
        "lport": [(None, "same", "1"), (None, "changed", "new"), (None, "new", "n"),
                  ("t2", "other", "changed in t2"), ("t9", "not mine", "z")],
        "lswitch": [(None, "s", "1")],
        "unknown": [(None, "u", "1")],
    })
    assert sorted(changes, key=lambda c: (c.table, c.key)) == [
        u(SET, "changed", "new"), u(DELETE, "gone"), u(CREATE, "new", "n"),
        u(CREATE, "s", "1", table="lswitch")]
    # t2 was out of scope: untouched.
    assert c.get("lport", "other", "t2") == "t2"
    assert c.reconcile(c.snapshot(["D", "t2"]), {"lport": [
        (None, "same", "1"), (None, "changed", "new"), (None, "new", "n"),
        ("t2", "other", "t2")]}) == []


def test_rows_updated_during_the_read_keep_the_update():
    c = LocalCache(["lport"])
    c.apply(u(CREATE, "a", "1"))
    c.apply(u(CREATE, "b", "1"))
    snap = c.snapshot([None])
    # While the DB is read: a is deleted, b changed, c created (the read
    # saw none of it, or an older state).
    c.apply(u(DELETE, "a"))
    c.apply(u(SET, "b", "2"))
    c.apply(u(CREATE, "c", "1"))
    changes = c.reconcile(snap, {"lport": [(None, "a", "1"), (None, "b", "1")]})
    assert changes == []
    assert c.values("lport") == {"b": "2", "c": "1"}
    # The next resync, with no race, repairs anything left.
    assert c.reconcile(c.snapshot([None]), {"lport": [(None, "b", "2")]}) == [u(DELETE, "c")]


def test_abandon_ends_a_snapshot():
    c = LocalCache(["lport"])
    snap = c.snapshot([None])
    c.abandon(snap)
    c.apply(u(CREATE, "a", "1"))
    assert c.reconcile(c.snapshot([None]), {"lport": []}) == [u(DELETE, "a")]


keys = st.sampled_from(["a", "b", "c", "d"])
ops = st.lists(st.tuples(st.sampled_from([CREATE, SET, DELETE]), keys,
                         st.sampled_from(["1", "2", "3"])), max_size=30)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 30), st.integers(0, 30))
def test_db_writes_and_updates_racing_a_resync_converge(writes, read_at, in_flight):
    """
    The NB DB takes C{writes} in order and publishes each.  The controller
    missed every update before the resync began; the DB read sees the
    state after C{read_at} writes; the updates of the last C{in_flight}
    writes before the read, and of every write after it, arrive after the
    snapshot began (in order).  Then the cache equals the DB, and the
    next resync finds nothing to change.
    """
    db: dict[str, str] = {}
    states = [{}]
    log = []
    for action, key, value in writes:
        if action == DELETE:
            if db.pop(key, None) is None:
                continue
            log.append(u(DELETE, key))
        elif action == SET and key not in db:
            continue
        else:
            db[key] = value
            log.append(u(action, key, value))
        states.append(dict(db))
    read_at = min(read_at, len(log))
    delivered_from = max(0, read_at - in_flight)
    c = LocalCache(["lport"])
    snap = c.snapshot([None])
    for update in log[delivered_from:]:
        c.apply(update)
    c.reconcile(snap, {"lport": [(None, k, v) for k, v in states[read_at].items()]})
    assert c.values("lport") == db
    assert c.reconcile(c.snapshot([None]), {"lport": [(None, k, v) for k, v in db.items()]}) == []


# --- Mirror: the cache, its database and its observers --------------------------------

import pytest_twisted  # noqa: E402
from twisted.internet import defer  # noqa: E402

from dftx.cache import Mirror  # noqa: E402
from dftx.db.memory import MemoryDbDriver  # noqa: E402
from dftx.db.redis import RedisDbDriver  # noqa: E402
from dftx.harness import poll  # noqa: E402

aio = pytest_twisted.ensureDeferred


@aio
async def test_mirror_loads_applies_and_tells_observers():
    db = MemoryDbDriver()
    await db.create_key("lport", "a", "1")
    await db.create_key("lport", "t", "in t1", topic="t1")
    await db.create_key("lport", "x", "in t2", topic="t2")
    m = Mirror(db, ["lport"], topics=["t1"])
    seen = []
    m.add_observer(seen.append)
    m.add_observer(lambda u: 1 / 0)  # a failing observer does not stop the others
    await m.resync()
    assert m.cache.rows("lport") == {(None, "a"): "1", ("t1", "t"): "in t1"}
    assert len(seen) == 2 and m.counters["observer_errors"] == 2
    m.received(u(SET, "a", "2"))
    m.received(u(CREATE, "y", "not kept", topic="t2"))  # a topic it does not keep
    assert m.cache.values("lport") == {"a": "2", "t": "in t1"} and seen[-1] == u(SET, "a", "2")
    await m.add_topic("t2")
    assert m.cache.get("lport", "x", "t2") == "in t2"
    m.remove_topic("t2")
    assert seen[-1] == u(DELETE, "x", topic="t2") and m.cache.get("lport", "x", "t2") is None
    await m.close()


@aio
async def test_mirror_sync_of_one_topic_reads_only_that_topic():
    db = MemoryDbDriver()
    m = Mirror(db, ["lport"], topics=["t1"])
    await m.resync()
    await db.create_key("lport", "a", "1")
    await db.create_key("lport", "b", "1", topic="t1")
    reads = []
    real = db.get_topic_rows
    db.get_topic_rows = lambda table, topic: reads.append(topic) or real(table, topic)
    m.received(DbUpdate.control("sync", "t1"))
    await poll(lambda: m.cache.get("lport", "b", "t1") == "1", 5, "t1 resynced")
    assert reads == ["t1"] and m.cache.get("lport", "a") is None
    m.received(DbUpdate.control("dbrestart"))
    await poll(lambda: m.cache.get("lport", "a") == "1", 5, "everything resynced")
    await m.close()


@aio
async def test_mirror_requests_during_a_resync_merge_into_one_more(redis_single, unique):
    db = RedisDbDriver([redis_single.address])
    await db.initialize()
    m = Mirror(db, [unique], topics=["t1", "t2"])
    try:
        first = m.resync(["t1"])
        more = [m.resync(["t2"]) for _ in range(10)] + [m.resync()]
        await defer.gatherResults([first, *more])
        assert m.counters["resyncs"] == 2
    finally:
        await m.close()
        await db.close()


@aio
async def test_mirror_resync_retries_while_the_database_is_unreachable(redis_single, unique):
    db = RedisDbDriver([redis_single.address], retries=1, timeout=0.3)
    await db.initialize()
    m = Mirror(db, [unique], max_delay=0.3)
    try:
        await db.create_key(unique, "k", "v")
        redis_single.pause()
        try:
            done = m.resync()
            await poll(lambda: m.counters["resync_errors"] >= 2, 10, "failed resyncs")
            assert not done.called
        finally:
            redis_single.resume()
        await done
        assert m.cache.values(unique) == {"k": "v"}
    finally:
        await m.close()
        await db.close()
