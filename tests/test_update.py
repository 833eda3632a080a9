"""DbUpdate: defaults, control events, ordering, to_dict, repr."""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dftx.update import DBRESTART, SEND_ALL_TOPIC, SYNC, DbUpdate


def test_row_update_topic_defaults_to_send_all():
    u = DbUpdate("lport", "k", "create", "{}")
    assert u.topic == SEND_ALL_TOPIC == "D"
    assert DbUpdate("lport", "k", "create", "{}", topic="t1").topic == "t1"
    assert not u.is_control


def test_control_events_keep_topic_none():
    r = DbUpdate.control(DBRESTART)
    assert (r.table, r.key, r.action, r.topic) == (None, None, "dbrestart", None)
    assert r.is_control
    assert DbUpdate.control(SYNC, "t1").topic == "t1"
    with pytest.raises(ValueError):
        DbUpdate.control("create")


def test_to_dict_is_the_dragonflow_map():
    u = DbUpdate("lswitch", "id1", "set", '{"a": 1}', "tenant", publisher="p", seq=3)
    assert u.to_dict() == {
        "table": "lswitch", "key": "id1", "action": "set",
        "value": '{"a": 1}', "topic": "tenant",
    }


def test_ordering_by_timestamp_then_key():
    a = DbUpdate("t", "b", "set", "1", timestamp=1.0)
    b = DbUpdate("t", "a", "set", "1", timestamp=2.0)
    c = DbUpdate("t", "c", "set", "1", timestamp=2.0)
    ctl = DbUpdate(None, None, "sync", None, timestamp=2.0)
    assert sorted([c, b, a, ctl]) == [a, ctl, b, c]
    assert a < b < c and c > a and a <= a


def test_equality_ignores_timestamp():
    a = DbUpdate("t", "k", "set", "v", timestamp=1.0)
    assert a == DbUpdate("t", "k", "set", "v", timestamp=5.0)
    assert a != DbUpdate("t", "k", "set", "v2")
    assert a != DbUpdate("t", "k", "set", "v", publisher="p", seq=1)
    assert a != "not an update"


def test_repr_is_readable_and_bounded():
    u = DbUpdate("lport", "k1", "create", "x" * 1000, "t1")
    text = repr(u)
    assert text.startswith("DbUpdate(table='lport', key='k1', action='create', topic='t1'")
    assert "(1000 chars)" in text and len(text) < 200
    assert "seq=4" in repr(DbUpdate("a", "b", "set", "v", publisher="p", seq=4))


_fields = dict(
    table=st.sampled_from([None, "t", "u"]),
    key=st.sampled_from([None, "", "a", "b"]),
    action=st.sampled_from(["create", "set", "sync"]),
    value=st.sampled_from([None, "1", "2"]),
    topic=st.sampled_from([None, "D", "t1"]),
    timestamp=st.one_of(st.sampled_from([1.0, 2.0]),
                        st.floats(allow_nan=False, allow_infinity=False)),
    publisher=st.sampled_from([None, "p", "q"]),
    seq=st.sampled_from([None, 1, 2]),
)
updates = st.builds(DbUpdate, **_fields)


@given(updates, updates)
def test_exactly_one_of_less_equal_greater(a, b):
    assert [a < b, a == b, a > b].count(True) == 1
    assert (a < b) == (b > a) and (a > b) == (b < a)
    assert (a <= b) == (a < b or a == b) and (a >= b) == (a > b or a == b)


@given(updates, updates, updates)
def test_order_of_distinct_updates_is_transitive(a, b, c):
    assume(a != b and b != c and a != c)
    if a < b and b < c:
        assert a < c
