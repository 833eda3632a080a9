"""dftx.codec: round trips, Dragonflow interoperability, and garbage."""

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dftx.codec import decode, encode
from dftx.errors import ProtocolError
from dftx.update import CONTROL_ACTIONS, DBRESTART, ROW_ACTIONS, SYNC, DbUpdate

text = st.text(max_size=50)
maybe_text = st.none() | text


@given(table=text.filter(bool), key=maybe_text, action=st.sampled_from(sorted(ROW_ACTIONS)),
       value=maybe_text, topic=maybe_text, publisher=maybe_text,
       seq=st.none() | st.integers(min_value=0, max_value=2**63))
def test_round_trip(table, key, action, value, topic, publisher, seq):
    u = DbUpdate(table, key, action, value, topic, publisher=publisher, seq=seq)
    assert decode(encode(u)) == u


@pytest.mark.parametrize("action, topic", [(DBRESTART, None), (SYNC, None), (SYNC, "t1")])
def test_control_events_round_trip(action, topic):
    u = DbUpdate.control(action, topic)
    assert decode(encode(u, publisher="p", seq=3)) == DbUpdate(
        None, None, action, None, topic, publisher="p", seq=3)


@pytest.mark.parametrize("bin_table", [False, True], ids=["str", "bin"])
@pytest.mark.parametrize("table, action, reason", [
    (None, "create", "control event (table None) with a row action 'create'"),
    (None, "delete", "control event (table None) with a row action 'delete'"),
    (None, "frobnicate", "control event (table None) with an unknown action"),
    ("lport", "sync", "row update of 'lport' with a control action 'sync'"),
    ("lport", "dbrestart", "row update of 'lport' with a control action"),
    ("lport", "frobnicate", "row update of 'lport' with an unknown action"),
    ("lport", "", "row update of 'lport' with an unknown action"),
])
def test_unknown_actions_and_control_row_mismatches_are_protocol_errors(
        table, action, reason, bin_table):
    # bin: a table sent as bytes takes the fully checked path.
    wire_table = table.encode() if bin_table and table is not None else table
    data = msgpack.packb({"table": wire_table, "key": "k", "action": action,
                          "value": None, "topic": "D", "seq": 1})
    with pytest.raises(ProtocolError) as info:
        decode(data, peer="tcp://10.0.0.1:8866")
    assert reason in str(info.value)
    assert info.value.peer == "tcp://10.0.0.1:8866"


@settings(max_examples=300)
@given(table=st.none() | text, action=text)
def test_only_row_actions_with_a_table_and_control_actions_without_decode(table, action):
    data = msgpack.packb({"table": table, "key": None, "action": action, "value": None,
                          "topic": None})
    valid = action in (ROW_ACTIONS if table is not None else CONTROL_ACTIONS)
    try:
        update = decode(data)
    except ProtocolError:
        assert not valid
    else:
        assert valid and (update.table, update.action) == (table, action)


def test_stamps_publisher_seq_and_topic_without_changing_the_update():
    u = DbUpdate("lport", "k", "create", "{}")
    d = decode(encode(u, publisher="pub-1", seq=7, topic="t9"))
    assert (d.publisher, d.seq, d.topic) == ("pub-1", 7, "t9")
    assert (u.publisher, u.seq, u.topic) == (None, None, "D")


def test_send_time_is_stamped_optional_and_never_a_reason_to_drop():
    u = DbUpdate("lport", "k", "create", "{}")
    assert decode(encode(u, sent=1700000000.25)).sent == 1700000000.25
    assert decode(encode(u)).sent is None
    fields = {"table": "t", "key": "k", "action": "set", "value": "v", "topic": "D"}
    for sent, expected in ((12, 12.0), ("soon", None), (True, None), (None, None)):
        for table in ("t", b"t"):  # the fast path and the fully checked one
            data = msgpack.packb({**fields, "table": table, "sent": sent})
            assert decode(data).sent == expected and decode(data).value == "v"


def test_decodes_what_dragonflow_sends():
    # Dragonflow's pack_message: msgpack.packb(update.to_dict(), use_bin_type=True)
    sent = {"table": "lport", "key": "port1", "action": "create",
            "value": '{"id": "port1"}', "topic": "tenant1"}
    for use_bin_type in (True, False):  # current and older msgpack defaults
        u = decode(msgpack.packb(sent, use_bin_type=use_bin_type))
        assert u.to_dict() == sent
        assert (u.publisher, u.seq) == (None, None)


def test_dragonflow_reads_what_we_send():
    # Dragonflow's unpack_message: msgpack.unpackb(message, raw=False), then
    # it reads these five keys.
    u = DbUpdate("lswitch", "sw", "delete", None, "t", publisher="p", seq=1)
    entry = msgpack.unpackb(encode(u), raw=False)
    assert {k: entry[k] for k in ("table", "key", "action", "value", "topic")} == u.to_dict()


def test_unknown_keys_are_ignored():
    data = msgpack.packb({"table": "t", "key": "k", "action": "set", "value": "v",
                          "topic": "D", "future": [1, 2]})
    assert decode(data).value == "v"


@pytest.mark.parametrize("data, reason", [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"table": "t"}), "lacks key, action, value, topic"),
    (msgpack.packb({"table": 1, "key": "k", "action": "a", "value": "v", "topic": "D"}), "table"),
    (msgpack.packb({"table": "t", "key": "k", "action": None, "value": "v", "topic": "D"}), "action"),
    (msgpack.packb({"table": "t", "key": "k", "action": "a", "value": b"\xff", "topic": "D"}), "utf-8"),
    (msgpack.packb({"table": "t", "key": "k", "action": "a", "value": "v", "topic": "D", "seq": -1}), "seq"),
    (msgpack.packb({"table": "t", "key": "k", "action": "a", "value": "v", "topic": "D"}) + b"x", "undecodable"),
    (msgpack.packb({1: 2}), "undecodable"),
])
def test_malformed_messages_raise_protocol_error(data, reason):
    with pytest.raises(ProtocolError) as info:
        decode(data, peer="tcp://10.0.0.1:8866")
    assert reason in str(info.value)
    assert info.value.peer == "tcp://10.0.0.1:8866"


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


def test_unencodable_value_is_a_protocol_error_and_packer_recovers():
    with pytest.raises(ProtocolError):
        encode(DbUpdate("t", "k", "set", object()))
    u = DbUpdate("t", "k", "set", "v")
    assert decode(encode(u)) == u


def test_every_truncation_of_a_message_is_a_protocol_error():
    data = encode(DbUpdate("lport", "k", "create", '{"id": "k"}', "t1"), publisher="p", seq=7)
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:end])


@pytest.mark.parametrize("data", [
    b"\x91" * 1_000_000 + b"\xc0",  # a list nested a million deep
    b"\xdf\xff\xff\xff\xff",  # a map that claims 4 billion entries
    b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # a string that claims 4 GiB
    b"\xdd\xff\xff\xff\xff",  # a list that claims 4 billion items
], ids=["deep", "map32", "str32", "array32"])
def test_hostile_shapes_fail_fast(data):
    start = time.perf_counter()
    with pytest.raises(ProtocolError):
        decode(data)
    assert time.perf_counter() - start < 0.5


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | text
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8)


@settings(max_examples=500)
@given(st.dictionaries(
    st.sampled_from(["table", "key", "action", "value", "topic", "publisher", "seq", "x"]),
    wire_values))
def test_maps_of_any_shape_decode_or_raise_protocol_error(fields):
    try:
        update = decode(msgpack.packb(fields))
    except ProtocolError:
        return
    assert isinstance(update, DbUpdate) and update.table == fields["table"]


def _decode_seconds(data: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        decode(data)
        best = min(best, time.perf_counter() - start)
    return best


def test_decoding_time_is_linear_in_the_size():
    small = encode(DbUpdate("t", "k", "set", "x" * 1_000_000))
    large = encode(DbUpdate("t", "k", "set", "x" * 8_000_000))
    # 8x the bytes: linear is ~8x; the bound leaves room for a loaded machine
    # and is far below quadratic (~64x).
    assert _decode_seconds(large) < 30 * _decode_seconds(small) + 0.01
