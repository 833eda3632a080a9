"""
The JSON-RPC layer with in-memory transports and a fake clock: stream
splitting at every cut, garbage, oversized and non-object messages,
requests and errors, echo, the inactivity probe.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dftx.errors import DBConnectionError, OvsdbError, ProtocolError
from dftx.ovsdb.jsonrpc import JsonRpcProtocol, JsonSplitter

MESSAGES = [
    {"id": 1, "result": {"a": 'x}{"]\\' * 3, "b": [1, 2.5, {"c": None}], "d": "\\\\"},
     "error": None},
    {"id": None, "method": "update2", "params": ["m", {"T": {"u": {"modify": {}}}}]},
    {},
    {"id": "é", "result": ["ü", "\u2603", "\\u0022"], "error": None},
]
STREAM = b" \n".join(json.dumps(m, ensure_ascii=False).encode() for m in MESSAGES) + b"\r\n"
# The splitter skips the middle of large messages in bulk; bulk=1 makes
# every stretch of these small streams go that way too.
BULK = pytest.mark.parametrize("bulk", [JsonSplitter.bulk, 1], ids=["by-string", "bulk"])
bulks = st.sampled_from([JsonSplitter.bulk, 1])  # the same, for hypothesis tests


def splitter(bulk=JsonSplitter.bulk, **kwargs):
    s = JsonSplitter(**kwargs)
    s.bulk = bulk
    return s


@BULK
def test_every_split_point_of_a_multi_message_stream(bulk):
    for cut in range(len(STREAM) + 1):
        s = splitter(bulk)
        assert s.feed(STREAM[:cut]) + s.feed(STREAM[cut:]) == MESSAGES, cut


@settings(max_examples=200, deadline=None)
@given(bulk=bulks, cuts=st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_any_chunking(bulk, cuts):
    bounds = [0, *sorted(cuts), len(STREAM)]
    s = splitter(bulk)
    out = []
    for a, b in zip(bounds, bounds[1:]):
        out += s.feed(STREAM[a:b])
    assert out == MESSAGES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.text('{}[]"\\ ,:é'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(bulk=bulks,
       objects=st.lists(st.dictionaries(st.text(), json_values, max_size=4), max_size=5),
       data=st.data())
def test_arbitrary_objects_survive_byte_by_byte_or_chunked(bulk, objects, data):
    stream = b"".join(json.dumps(o, ensure_ascii=data.draw(st.booleans())).encode()
                      for o in objects)
    size = data.draw(st.integers(1, 64))
    s = splitter(bulk)
    out = []
    for i in range(0, len(stream), size):
        out += s.feed(stream[i:i + size])
    assert out == objects


@settings(max_examples=400, deadline=None)
@given(bulk=bulks, data=st.binary(max_size=200) | st.text('{}[]"\\ :x').map(str.encode))
def test_garbage_is_protocol_error_or_waits_never_anything_else(bulk, data):
    s = splitter(bulk, max_message=1000)
    try:
        for message in s.feed(data):
            assert isinstance(message, dict)
    except ProtocolError:
        pass


@pytest.mark.parametrize("stream", [b"[1, 2]", b"42 ", b'"text"', b"{]", b'{"a": tru}',
                                    b"}", b"x {}"])
def test_not_an_object_or_malformed(stream):
    with pytest.raises(ProtocolError):
        JsonSplitter().feed(stream)


def test_oversized_message_is_refused_before_it_is_complete():
    s = JsonSplitter(max_message=1000)
    s.feed(b'{"a": "' + b"x" * 900)
    with pytest.raises(ProtocolError, match="larger than 1000"):
        s.feed(b"x" * 200)
    assert JsonSplitter(max_message=1000).feed(b'{"a": "' + b"x" * 980 + b'"}') == [
        {"a": "x" * 980}]


@BULK
@pytest.mark.parametrize("levels", [3, 11, 12, 13, 40])
def test_deep_nesting_in_any_chunks(bulk, levels):
    value = {"a": ["x]"]}
    for i in range(levels):
        value = {"k": [value, "}" * i, {}], "n": i}
    stream = json.dumps(value).encode() + json.dumps({"after": 1}).encode()
    for size in (1, 7, 64, len(stream)):
        s = splitter(bulk)
        out = []
        for i in range(0, len(stream), size):
            out += s.feed(stream[i:i + size])
        assert out == [value, {"after": 1}], size


def _big(rows):
    table = {f"{i:08x}-0000-0000-0000-000000000000": {"initial": {
        "name": f"tap{i}", "external_ids": ["map", [["iface-id", f"p{i}"]]], "ofport": i}}
        for i in range(rows)}
    return json.dumps({"id": 1, "result": {"Interface": table}, "error": None}).encode()


def _split_time(data, chunk):
    s = JsonSplitter()
    start = time.perf_counter()
    for i in range(0, len(data), chunk):
        out = s.feed(data[i:i + chunk])
    assert len(out) == 1
    return time.perf_counter() - start


def fastest(*runs, rounds=5):
    """The best time of each run, the runs interleaved (a busy machine
    slows them alike)."""
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            best[i] = min(best[i], run())
    return best


def test_splitting_is_linear_in_the_size_not_the_number_of_chunks():
    small, large = _big(5_000), _big(40_000)  # ~0.8 MB and ~6.5 MB
    t_small, t_large, t_tiny = fastest(lambda: _split_time(small, 4096),
                                       lambda: _split_time(large, 4096),
                                       lambda: _split_time(small, 512))
    # 8x the bytes in 8x the chunks: quadratic rescanning would be ~64x.
    assert t_large < t_small * 30, (t_small, t_large)
    # Tiny chunks cost per chunk, not per byte already seen.
    assert t_tiny < t_small * 6, (t_small, t_tiny)



def _backslashes_time(pairs, chunk=61):
    data = b'{"a": "' + b"\\\\" * pairs + b'\\"x"}'
    s = JsonSplitter()
    start = time.perf_counter()
    out = []
    for i in range(0, len(data), chunk):
        out += s.feed(data[i:i + chunk])
    assert out == [{"a": "\\" * pairs + '"x'}]
    return time.perf_counter() - start


def test_a_long_run_of_backslashes_in_small_chunks_is_linear():
    # Each chunk ends inside the run, with the last backslash paired or
    # not (odd chunk size); rescanning the run per chunk would be ~16x.
    t_small, t_large = fastest(lambda: _backslashes_time(50_000),
                               lambda: _backslashes_time(200_000))
    assert t_large < t_small * 8, (t_small, t_large)


@pytest.mark.parametrize("run", range(1, 7))
def test_escapes_split_inside_a_run_of_backslashes(run):
    # run backslashes then a quote: escaped when run is odd.
    body = b"\\" * run + b'"'
    text = b'{"k": "' + body + (b'x"}' if run % 2 else b"}")
    expected = [json.loads(text)]
    for cut in range(len(text) + 1):
        s = JsonSplitter()
        assert s.feed(text[:cut]) + s.feed(text[cut:]) == expected, cut


class Proto:
    def __init__(self, probe_interval=None, max_message=1_000_000):
        self.clock = Clock()
        self.notes = []
        self.proto = JsonRpcProtocol(self.clock, lambda m, p: self.notes.append((m, p)),
                                     max_message=max_message, probe_interval=probe_interval)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def sent(self):
        out = JsonSplitter().feed(self.transport.value())
        self.transport.clear()
        return out

    def receive(self, *messages):
        self.proto.dataReceived(b"".join(json.dumps(m).encode() for m in messages))


def test_requests_get_their_results_and_errors_in_any_order():
    p = Proto()
    a = p.proto.request("list_dbs", [])
    b = p.proto.request("transact", ["Open_vSwitch"])
    (ra, rb) = p.sent()
    assert ra["method"] == "list_dbs" and rb["params"] == ["Open_vSwitch"]
    got = []
    a.addCallback(got.append)
    failures = []
    b.addErrback(failures.append)
    p.receive({"id": rb["id"], "result": None, "error": {"error": "syntax error",
                                                         "details": "bad"}},
              {"id": ra["id"], "result": ["Open_vSwitch"], "error": None},
              {"id": 999, "result": 1, "error": None},
              {"id": [ra["id"]], "result": 1, "error": None},
              {"id": True, "result": 1, "error": None})
    assert got == [["Open_vSwitch"]] and not p.transport.disconnecting
    err = failures[0].value
    assert isinstance(err, OvsdbError) and err.error == "syntax error" and err.details == "bad"
    assert err.method == "transact"


def test_echo_is_answered_at_once_and_notifications_dispatched():
    p = Proto()
    p.receive({"id": "e1", "method": "echo", "params": ["x"]},
              {"id": None, "method": "update2", "params": ["m", {}]},
              {"id": 7, "method": "lock", "params": ["l"]})
    replies = p.sent()
    assert replies[0] == {"id": "e1", "result": ["x"], "error": None}
    assert replies[1]["id"] == 7 and replies[1]["error"]
    assert p.notes == [("update2", ["m", {}])]


def test_garbage_drops_the_connection_after_the_messages_before_it():
    p = Proto()
    answered, pending = p.proto.request("echo", []), p.proto.request("echo", [])
    results = []
    answered.addBoth(results.append)
    pending.addBoth(results.append)
    p.proto.dataReceived(b'{"id": 1, "result": tru')
    assert results == []
    p.proto.dataReceived(b'e} [1] {"id": 2, "result": null}')
    assert p.transport.disconnecting or p.transport.disconnected
    assert results[0] is True
    assert isinstance(results[1].value, ProtocolError) and "[1]" in str(results[1].value)


def test_splitter_keeps_messages_before_garbage_and_then_stays_broken():
    s = JsonSplitter()
    assert s.feed(b'{"a": 1} {"b": 2} nope') == [{"a": 1}, {"b": 2}]
    assert isinstance(s.error, ProtocolError)
    with pytest.raises(ProtocolError):
        s.feed(b'{"c": 3}')


def test_oversized_frame_drops_the_connection():
    p = Proto(max_message=100)
    p.proto.dataReceived(b'{"id": 1, "result": "' + b"x" * 200)
    assert p.transport.disconnecting or p.transport.disconnected


def test_a_stalled_server_is_probed_then_dropped():
    p = Proto(probe_interval=5)
    d = p.proto.request("monitor", [])
    failures = []
    d.addErrback(failures.append)
    p.sent()
    p.clock.advance(4)
    p.receive({"id": None, "method": "update", "params": []})  # activity resets the timer
    p.clock.advance(4.9)
    assert p.sent() == []
    p.clock.advance(0.2)
    [probe] = p.sent()
    assert probe["method"] == "echo"
    p.clock.advance(5.1)
    assert p.transport.disconnecting or p.transport.disconnected
    assert isinstance(failures[0].value, DBConnectionError)


def test_an_answered_probe_keeps_the_connection():
    p = Proto(probe_interval=5)
    for _ in range(3):
        p.clock.advance(5.1)
        [probe] = p.sent()
        p.receive({"id": probe["id"], "result": probe["params"], "error": None})
    assert not p.transport.disconnecting


def test_requests_after_the_connection_is_lost_fail_at_once():
    p = Proto()
    p.proto.connectionLost()
    failures = []
    p.proto.request("echo", []).addErrback(failures.append)
    assert isinstance(failures[0].value, DBConnectionError)
