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


def test_reconcile_of_some_pairs_leaves_the_others_alone():
    c = LocalCache(["lport", "lswitch"])
    for table in ("lport", "lswitch"):
        c.apply(u(CREATE, "a", "1", table=table))
        c.apply(u(CREATE, "b", "1", topic="t1", table=table))
    snap = c.snapshot([None, "t1"])
    # Only (lport, D) and (lswitch, t1) were read; both found empty.
    changes = c.reconcile(snap, {"lport": [], "lswitch": []},
                          read=[("lport", "D"), ("lswitch", "t1")])
    assert sorted(changes, key=lambda c: c.table) == [
        u(DELETE, "a"), u(DELETE, "b", topic="t1", table="lswitch")]
    assert c.rows("lport") == {("t1", "b"): "1"} and c.rows("lswitch") == {(None, "a"): "1"}


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


class Reads:
    """Counts a memory driver's topic reads and version checks."""

    def __init__(self, db):
        self.rows, self.checks = [], 0
        real_rows, real_versions = db.get_topic_rows, db.get_topic_versions

        def rows(table, topic):
            self.rows.append((table, topic))
            return real_rows(table, topic)

        def versions(pairs):
            pairs = list(pairs)
            self.checks += len(pairs)
            return real_versions(pairs)

        db.get_topic_rows, db.get_topic_versions = rows, versions

    def take(self):
        rows, checks, self.rows, self.checks = sorted(self.rows, key=str), self.checks, [], 0
        return rows, checks


@aio
async def test_the_periodic_resync_reads_only_the_pairs_that_changed():
    db = MemoryDbDriver()
    await db.create_key("lport", "a", "1")
    await db.create_key("lport", "b", "1", topic="t1")
    await db.create_key("lport", "c", "1", topic="t9")  # not kept
    m = Mirror(db, ["lport", "lswitch"], topics=["t1", "t2"])
    reads = Reads(db)
    await m.resync()
    pairs = [(t, p) for t in ("lport", "lswitch") for p in (None, "t1", "t2")]
    assert reads.take() == (sorted(pairs, key=str), 6)
    assert m.cache.values("lport") == {"a": "1", "b": "1"}

    await m.resync_changed()
    assert reads.take() == ([], 6)
    assert (m.counters["pairs_read"], m.counters["pairs_skipped"]) == (6, 6)

    # Written, but its update lost: only that pair is read.
    await db.create_key("lport", "x", "1", topic="t1")
    await db.create_key("lport", "y", "1", topic="t9")
    await m.resync_changed()
    assert reads.take() == ([("lport", "t1")], 6)
    assert m.cache.get("lport", "x", "t1") == "1" and m.counters["pairs_skipped"] == 11

    # An explicit resync reads its topics even when nothing changed, and
    # a periodic one asked for meanwhile merges into the next run.
    checked, gate = db.get_topic_versions, defer.Deferred()

    def held(pairs):  # the first run waits until the others are asked for
        db.get_topic_versions = checked
        return gate.addCallback(lambda _: checked(pairs))

    db.get_topic_versions = held
    first = m.resync(["t2"])
    merged = [m.resync(["D"]), m.resync_changed()]
    gate.callback(None)
    await defer.gatherResults([first, *merged])
    assert reads.take() == (sorted([("lport", "t2"), ("lswitch", "t2"), ("lport", None),
                                    ("lswitch", None)], key=str), 2 + 6)
    assert m.counters["resyncs"] == 5

    # A topic dropped and kept again is read again.
    m.remove_topic("t2")
    await db.create_key("lswitch", "s", "1", topic="t2")
    await m.add_topic("t2")
    assert reads.take()[0] == [("lport", "t2"), ("lswitch", "t2")]
    await m.resync_changed()
    assert reads.take() == ([], 6)
    await m.close()


@aio
async def test_a_failed_periodic_read_is_read_again():
    db = MemoryDbDriver()
    m = Mirror(db, ["lport"], max_delay=0.01)
    await m.resync()
    await db.create_key("lport", "a", "1")
    real = db.get_topic_rows
    failures = [1]

    def flaky(table, topic):
        if failures:
            failures.pop()
            return defer.fail(ConnectionError("down"))
        return real(table, topic)

    db.get_topic_rows = flaky
    await m.resync_changed()
    assert m.counters["resync_errors"] == 1 and m.cache.get("lport", "a") == "1"
    await m.close()
