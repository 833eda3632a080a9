"""
The RESP protocol on a StringTransport: what a real server cannot be made to
send (replies split anywhere, garbage, replies nobody asked for, silence).
"""

from __future__ import annotations

import hiredis
import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dftx.errors import ProtocolError, ReplyError
from dftx.errors import ConnectionClosed
from dftx.redis.resp import RespProtocol

PEER = "127.0.0.1:7000"


def connected(timeout=5.0):
    clock = Clock()
    proto = RespProtocol(PEER, clock, timeout)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_commands_are_pipelined_and_replies_matched_in_order():
    proto, transport, _ = connected()
    got = [results(proto.execute("SET", "k", "é")), results(proto.execute("GET", "k")),
           results(proto.execute("INCR", "n")), results(proto.execute("MGET", "a", "b"))]
    assert transport.value() == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n"
        b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nb\r\n"
    )
    assert proto.in_flight == 4
    proto.dataReceived(b"+OK\r\n$2\r\n\xc3\xa9\r\n:7\r\n*2\r\n$1\r\n1\r\n$-1\r\n")
    assert got == [[b"OK"], ["é".encode()], [7], [[b"1", None]]]
    assert proto.in_flight == 0


def test_replies_split_at_every_byte():
    proto, _, _ = connected()
    got = [results(proto.execute("GET", "a")), results(proto.execute("GET", "b"))]
    for byte in b"$5\r\nhello\r\n$-1\r\n":
        proto.dataReceived(bytes([byte]))
    assert got == [[b"hello"], [None]]


def test_error_reply_is_a_value_naming_the_node():
    proto, _, _ = connected()
    got = results(proto.execute("GET", "k"))
    proto.dataReceived(b"-MOVED 3999 127.0.0.1:7001\r\n")
    [err] = got
    assert isinstance(err, ReplyError)
    assert (err.kind, err.node) == ("MOVED", PEER)
    assert str(err) == f"{PEER}: MOVED 3999 127.0.0.1:7001"


@pytest.mark.parametrize("garbage", [b"!!!\r\n", b"hello world\r\n", b"$abc\r\n", b"*x\r\n"])
def test_garbage_fails_everything_in_flight_with_protocol_error(garbage):
    proto, transport, _ = connected()
    got = [results(proto.execute("GET", "a")), results(proto.execute("GET", "b"))]
    proto.dataReceived(garbage)
    for [f] in got:
        assert isinstance(f, Failure) and f.check(ProtocolError)
        assert f.value.peer == PEER
    assert transport.disconnected
    late = results(proto.execute("GET", "c"))
    assert late[0].check(ConnectionClosed)


def test_reply_nobody_asked_for_is_a_protocol_error():
    proto, transport, _ = connected()
    got = results(proto.execute("GET", "a"))
    proto.dataReceived(b"$1\r\nx\r\n+OK\r\n")
    assert got == [b"x"]
    assert transport.disconnected


def test_silence_with_commands_in_flight_closes_the_connection():
    proto, transport, clock = connected(timeout=2.0)
    got = results(proto.execute("GET", "a"))
    clock.advance(1.5)
    proto.dataReceived(b"$3\r\nab")  # progress: part of the reply
    clock.advance(1.5)
    assert got == [] and not transport.disconnected
    clock.advance(0.6)
    [f] = got
    assert f.check(ConnectionClosed) and "no reply within 2s" in str(f.value)
    assert f.value.node == PEER
    assert transport.disconnected


def test_idle_connection_is_not_timed_out():
    proto, transport, clock = connected(timeout=1.0)
    d = results(proto.execute("PING"))
    proto.dataReceived(b"+PONG\r\n")
    clock.advance(10)
    assert d == [b"PONG"] and not transport.disconnected


def test_connection_lost_fails_commands_and_tells_listeners():
    proto, _, _ = connected()
    lost = []
    proto.notify_lost(lambda p, reason: lost.append((p, reason)))
    got = results(proto.execute("GET", "a"))
    proto.connectionLost(Failure(ConnectionLost("bye")))
    [f] = got
    assert f.check(ConnectionClosed) and f.value.node == PEER
    assert lost and lost[0][0] is proto
    assert results(proto.execute("GET", "a"))[0].check(ConnectionClosed)


def test_asking_reply_is_discarded():
    proto, _, _ = connected()
    got = results(proto.execute_packed(
        hiredis.pack_command(("ASKING",)) + hiredis.pack_command(("GET", "k")), replies=2
    ))
    proto.dataReceived(b"+OK\r\n$1\r\nv\r\n")
    assert got == [b"v"]
