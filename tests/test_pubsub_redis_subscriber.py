"""
The Redis subscriber without servers: a fake cluster client whose
connections are the subscriber's own RESP protocol on StringTransports, and
a MemoryReactorClock.  Subscriptions, pushed messages (classic and
sharded), garbage, a lost connection (resubscribe, then dbrestart), a node
that cannot be reached, and a slot that moved.
"""

from __future__ import annotations

import hiredis
import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dftx.codec import encode
from dftx.pubsub.redis_link import ring
from dftx.pubsub.redis_subscriber import RedisSubscriber
from dftx.redis.slots import SLOTS, key_slot
from dftx.redis.topology import Shard, Topology
from dftx.update import DBRESTART, SYNC, DbUpdate

MASTERS = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]


def resp(*items: str | bytes | int) -> bytes:
    """A RESP array, as a server pushes or answers in subscribed mode."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        if isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            data = item.encode() if isinstance(item, str) else item
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class FakeConnection:
    """What the subscriber uses of a NodeConnection, over the protocol it
    builds, connected to a StringTransport."""

    def __init__(self, address, build, clock):
        self.address = address
        self.proto = build(address, clock, 5.0)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.connected = True
        self.closed = False
        self._on_lost = []

    def on_lost(self, callback):
        self._on_lost.append(callback)

    def execute(self, *args):
        return self.proto.execute(*args)

    def close(self):
        self.closed, self.connected = True, False
        return defer.succeed(None)

    def commands(self):
        """The commands written since the last call."""
        reader = hiredis.Reader()
        reader.feed(self.transport.value())
        self.transport.clear()
        found = []
        while (command := reader.gets()) is not False:
            found.append(command)
        return found

    def receive(self, *items):
        self.proto.dataReceived(resp(*items))

    def lose(self):
        self.connected = False
        reason = Failure(ConnectionDone("the node went away"))
        self.proto.connectionLost(reason)
        for callback in self._on_lost:
            callback(self, reason)


class FakeClient:
    """The ClusterClient calls the subscriber makes, on a fixed topology."""

    retries = 1

    def __init__(self, clock, masters=MASTERS):
        self.clock = clock
        self.set_masters(masters)
        self.conns: list[FakeConnection] = []
        self.refreshes = 0

    def set_masters(self, masters):
        step = SLOTS // len(masters)
        self.topology = Topology([
            Shard(i * step, SLOTS - 1 if i == len(masters) - 1 else (i + 1) * step - 1, m)
            for i, m in enumerate(masters)])

    def start(self):
        return defer.succeed(self.topology)

    def refresh(self):
        self.refreshes += 1
        return defer.succeed(self.topology)

    def owner(self, slot):
        return self.topology.owner(slot)

    def new_connection(self, address, build):
        conn = FakeConnection(address, build, self.clock)
        self.conns.append(conn)
        return conn

    def close(self):
        return defer.succeed(None)


def row(key, topic=None, seq=1):
    return encode(DbUpdate("lport", key, "create", "{}", topic), publisher="p", seq=seq)


class Setup:
    def __init__(self, sharded=False):
        self.clock = MemoryReactorClock()
        self.client = FakeClient(self.clock)
        self.got = []
        self.sub = RedisSubscriber(self.client, sharded, "chassis-1", keepalive=0,
                                   clock=self.clock)

    def start(self, *topics):
        """Initialize with C{topics}, the server confirming each."""
        for t in topics:
            self.sub.register_topic(t)
        d = self.sub.initialize(self.got.append)
        self.confirm()
        assert d.called, "initialize waits for a confirmation it was not given"
        return d

    def confirm(self):
        """Answer every (S)SUBSCRIBE written so far on every open connection,
        until none is left (answers may lead to more commands)."""
        while True:
            answered = False
            for conn in [c for c in self.client.conns if c.connected]:
                for command in conn.commands():
                    kind = command[0].lower().decode()
                    conn.receive(kind, command[1], 1)
                    answered = True
            if not answered:
                return

    def rows(self):
        return [(u.key, u.topic) for u in self.got if not u.is_control]

    def controls(self):
        return [(u.action, u.topic) for u in self.got if u.is_control]


def test_classic_subscribes_on_the_node_its_name_picks_and_delivers_messages():
    s = Setup()
    assert s.sub.initialize(s.got.append).called is False
    (conn,) = s.client.conns
    assert conn.address == ring(MASTERS, "chassis-1")[0]
    assert conn.commands() == [[b"SUBSCRIBE", b"D"]]
    conn.receive("subscribe", "D", 1)
    d = s.sub.register_topic("t1")
    assert conn.commands() == [[b"SUBSCRIBE", b"t1"]] and not d.called
    conn.receive("subscribe", "t1", 2)
    assert d.called and s.sub.nodes == [conn.address]
    conn.receive("message", "t1", row("a", "t1"))
    conn.receive("message", "D", row("b"))
    assert s.rows() == [("a", "t1"), ("b", "D")]
    assert s.sub.counters["delivered"] == 2


def test_sharded_subscribes_each_topic_on_its_slot_owner_and_delivers_smessages():
    s = Setup(sharded=True)
    s.start("t1", "t2")
    owners = {conn.address for conn in s.client.conns}
    assert owners == {s.client.owner(key_slot(t.encode())) for t in ("D", "t1", "t2")}
    for t in ("t1", "t2"):
        conn = next(c for c in s.client.conns if c.address == s.client.owner(key_slot(t.encode())))
        conn.receive("smessage", t, row(f"k-{t}", t))
    assert sorted(s.rows()) == [("k-t1", "t1"), ("k-t2", "t2")]


def test_garbage_is_counted_and_dropped_and_the_stream_goes_on():
    s = Setup()
    s.start()
    (conn,) = s.client.conns
    conn.receive("message", "D", b"\xc1 not msgpack")
    conn.receive("message", "D", encode(DbUpdate("lport", "k", "frobnicate", None)))
    conn.receive("message", "D", row("after"))
    assert s.sub.counters["undecodable"] == 2 and s.sub.counters["received"] == 3
    assert s.rows() == [("after", "D")] and not s.controls()


def test_a_lost_connection_resubscribes_every_topic_then_delivers_dbrestart():
    s = Setup()
    s.start("t1")
    (old,) = s.client.conns
    old.lose()
    s.clock.advance(0)  # the repair starts out of the loss handling
    new = s.client.conns[1]
    assert new.address == old.address and old.closed
    first = new.commands()
    assert first == [[b"SUBSCRIBE", b"D"]]
    new.receive("subscribe", "D", 1)
    assert new.commands() == [[b"SUBSCRIBE", b"t1"]]
    assert not s.controls()  # not before every topic is back
    new.receive("subscribe", "t1", 2)
    assert s.controls() == [(DBRESTART, None)] and s.sub.counters["restarts"] == 1
    new.receive("message", "t1", row("again", "t1"))
    assert s.rows() == [("again", "t1")]


def test_a_node_that_cannot_be_reached_is_left_for_the_next_master():
    s = Setup()
    s.start()
    (old,) = s.client.conns
    old.lose()
    s.clock.advance(0)
    same = s.client.conns[1]
    same.lose()  # the SUBSCRIBE written to it fails: the next master
    s.clock.advance(0)
    s.confirm()
    order = ring(MASTERS, "chassis-1")
    assert [c.address for c in s.client.conns] == [order[0], order[0], order[1]]
    assert s.sub.nodes == [order[1]] and s.controls() == [(DBRESTART, None)]


def test_resubscribing_retries_with_backoff_until_a_node_takes_the_topics():
    s = Setup()
    s.start()
    s.client.conns[0].lose()
    s.clock.advance(0)
    for _ in range(3):  # every master fails, round after round
        for conn in [c for c in s.client.conns if c.connected]:
            conn.lose()
        s.clock.advance(0)
    assert not s.controls()
    waited = s.clock.getDelayedCalls()
    assert waited and all(call.getTime() > s.clock.seconds() for call in waited)
    s.clock.advance(s.sub.max_backoff)
    s.confirm()
    assert s.controls() == [(DBRESTART, None)] and len(s.sub.nodes) == 1


def test_a_slot_that_moved_is_followed_and_its_topic_resynced():
    s = Setup(sharded=True)
    s.start("t1")
    slot_owner = s.client.owner(key_slot(b"t1"))
    old = next(c for c in s.client.conns if c.address == slot_owner)
    elsewhere = next(m for m in MASTERS if m != slot_owner)
    s.client.set_masters([elsewhere])  # every slot now on one master
    old.receive("sunsubscribe", "t1", 0)  # the server dropped the channel
    s.confirm()
    assert s.controls() == [(SYNC, "t1")] and s.sub.counters["moves"] == 1
    new = next(c for c in s.client.conns if c.address == elsewhere and c.connected)
    new.receive("smessage", "t1", row("moved", "t1"))
    assert ("moved", "t1") in s.rows()


@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
def test_close_closes_every_connection_and_ignores_later_losses(sharded):
    s = Setup(sharded)
    s.start("t1")
    conns = list(s.client.conns)
    assert s.sub.close().called
    assert all(c.closed for c in conns)
    for c in conns:
        c.lose()
    s.clock.advance(10)
    assert s.client.conns == conns and not s.controls()
