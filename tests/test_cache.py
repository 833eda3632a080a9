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
