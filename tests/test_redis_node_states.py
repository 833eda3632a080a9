"""
NodeConnection's states, deterministically: a fake endpoint the test
accepts or refuses, StringTransports, and a clock (no server, no sleep).
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure
from zope.interface import implementer

from dftx.errors import ConnectionClosed, NodeUnreachable
from dftx.redis import connection
from dftx.redis.connection import NodeConnection, State

ADDRESS = "10.0.0.1:7000"


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Records each connection attempt; the test settles the last one."""

    def __init__(self) -> None:
        self.attempts: list[defer.Deferred] = []
        self._factories: list = []

    def connect(self, factory):
        d = defer.Deferred()
        self.attempts.append(d)
        self._factories.append(factory)
        return d

    @property
    def pending(self) -> bool:
        return bool(self.attempts) and not self.attempts[-1].called

    def accept(self) -> StringTransportWithDisconnection:
        """The last attempt connects: @return: its transport."""
        proto = self._factories[-1].buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = proto
        proto.makeConnection(transport)
        self.attempts[-1].callback(proto)
        return transport

    def refuse(self) -> None:
        self.attempts[-1].errback(ConnectionRefusedError("refused"))


def reply(transport, data: bytes) -> None:
    transport.protocol.dataReceived(data)


def failure_of(d: defer.Deferred) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, f"{d!r} has not failed"
    return failures[0]


def result_of(d: defer.Deferred):
    results: list = []
    d.addCallback(results.append)
    assert results, f"{d!r} has not fired"
    return results[0]


@pytest.fixture(autouse=True)
def no_jitter(monkeypatch):
    monkeypatch.setattr(connection, "_jitter", lambda: 0.0)


@pytest.fixture
def clock():
    return MemoryReactorClock()


@pytest.fixture
def endpoint():
    return FakeEndpoint()


def node(endpoint, clock, **kw) -> NodeConnection:
    kw.setdefault("timeout", 5.0)
    return NodeConnection(ADDRESS, endpoint, clock, **kw)


def next_attempt_after(clock, endpoint, limit: float = 10.0) -> float:
    """Advance the clock in small steps until a new attempt starts;
    @return: how long that took."""
    before, started = len(endpoint.attempts), clock.seconds()
    while len(endpoint.attempts) == before:
        assert clock.seconds() - started < limit, "no new attempt"
        clock.advance(0.001)
    return clock.seconds() - started


def test_nothing_happens_before_start(endpoint, clock):
    conn = node(endpoint, clock)
    queued = conn.execute("PING")
    clock.advance(10)
    assert endpoint.attempts == [] and conn.state is State.IDLE and not queued.called
    conn.start()
    assert conn.state is State.CONNECTING and len(endpoint.attempts) == 1
    transport = endpoint.accept()
    assert conn.state is State.UP and conn.connected
    assert transport.value() == b"*1\r\n$4\r\nPING\r\n"
    reply(transport, b"+PONG\r\n")
    assert result_of(queued) == b"PONG"
    assert "up" in repr(conn)


def test_auth_then_the_waiting_commands(endpoint, clock):
    conn = node(endpoint, clock, username="u", password="pw")
    connected = []
    conn.on_connected(connected.append)
    conn.start()
    queued = conn.execute("GET", "k")
    transport = endpoint.accept()
    assert conn.state is State.AUTHENTICATING and not conn.connected
    # Only AUTH is on the wire until it succeeds.
    assert transport.value() == b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$2\r\npw\r\n"
    transport.clear()
    reply(transport, b"+OK\r\n")
    assert conn.state is State.UP and connected == [conn.protocol]
    assert transport.value() == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    reply(transport, b"$1\r\nv\r\n")
    assert result_of(queued) == b"v"


def test_a_refused_auth_fails_the_waiting_commands_and_backs_off(endpoint, clock):
    conn = node(endpoint, clock, password="wrong", max_backoff=1.0)
    conn.start()
    queued = conn.execute("PING")
    transport = endpoint.accept()
    reply(transport, b"-WRONGPASS invalid username-password pair\r\n")
    error = failure_of(queued).value
    assert isinstance(error, NodeUnreachable) and "AUTH refused: WRONGPASS" in str(error)
    assert "wrong" not in str(error).replace("WRONGPASS", "")
    assert conn.state is State.DOWN and transport.disconnected
    # Down: commands fail at once, without waiting for the next attempt.
    assert "AUTH refused" in str(failure_of(conn.execute("PING")).value)
    # Each refusal counts: the delays grow although every connection is made.
    delays = []
    for _ in range(3):
        delays.append(next_attempt_after(clock, endpoint))
        assert conn.state is State.CONNECTING
        reply(endpoint.accept(), b"-WRONGPASS invalid username-password pair\r\n")
    assert delays == sorted(delays) and delays[0] < delays[-1]
    next_attempt_after(clock, endpoint)
    transport = endpoint.accept()
    reply(transport, b"+OK\r\n")
    assert conn.state is State.UP


def test_a_failed_attempt_fails_the_waiting_commands(endpoint, clock):
    conn = node(endpoint, clock)
    conn.start()
    queued = conn.execute("PING")
    endpoint.refuse()
    assert conn.state is State.DOWN and "down" in repr(conn)
    assert "cannot connect" in str(failure_of(queued).value)
    assert isinstance(failure_of(conn.execute("PING")).value, NodeUnreachable)
    next_attempt_after(clock, endpoint)
    assert conn.state is State.CONNECTING
    queued = conn.execute("PING")
    reply(endpoint.accept(), b"+PONG\r\n")
    assert result_of(queued) == b"PONG"


def test_loss_and_reconnect_with_backoff(endpoint, clock):
    conn = node(endpoint, clock)
    lost = []
    conn.on_lost(lambda c, reason: lost.append(reason))
    conn.start()
    transport = endpoint.accept()
    in_flight = conn.execute("BLPOP", "never", 0)
    transport.loseConnection()
    assert isinstance(failure_of(in_flight).value, ConnectionClosed)
    assert len(lost) == 1 and lost[0].check(ConnectionDone)
    # Between connections commands wait for the next one (not failed).
    assert conn.state is State.CONNECTING and conn.protocol is None
    waiting = conn.execute("PING")
    assert next_attempt_after(clock, endpoint) > 0.01
    assert not waiting.called
    transport = endpoint.accept()
    assert transport.value() == b"*1\r\n$4\r\nPING\r\n"
    reply(transport, b"+PONG\r\n")
    assert result_of(waiting) == b"PONG"


def test_close_while_connecting(endpoint, clock):
    conn = node(endpoint, clock)
    conn.start()
    queued = conn.execute("PING")
    closed = conn.close()
    assert conn.state is State.CLOSED
    assert "closed" in str(failure_of(queued).value)
    assert endpoint.attempts[-1].called  # the attempt was cancelled
    assert result_of(closed) is None
    clock.advance(60)
    assert len(endpoint.attempts) == 1
    assert "closed" in str(failure_of(conn.execute("PING")).value)


def test_close_while_authenticating(endpoint, clock):
    conn = node(endpoint, clock, password="pw")
    conn.start()
    transport = endpoint.accept()
    assert conn.state is State.AUTHENTICATING
    closed = conn.close()
    assert transport.disconnected or not transport.connected
    assert result_of(closed) is None
    clock.advance(60)
    assert len(endpoint.attempts) == 1 and conn.state is State.CLOSED


def test_close_waits_for_the_replies_in_flight(endpoint, clock):
    conn = node(endpoint, clock)
    conn.start()
    transport = endpoint.accept()
    in_flight = conn.execute("PING")
    closed = conn.close()
    assert not closed.called
    assert isinstance(failure_of(conn.execute("PING")).value, NodeUnreachable)
    reply(transport, b"+PONG\r\n")
    assert result_of(in_flight) == b"PONG"
    clock.advance(0.01)
    assert result_of(closed) is None and not transport.connected


def test_close_before_start(endpoint, clock):
    conn = node(endpoint, clock)
    queued = conn.execute("PING")
    assert result_of(conn.close()) is None
    assert "closed" in str(failure_of(queued).value)
    conn.start()
    assert endpoint.attempts == [] and conn.state is State.CLOSED
