"""
The HA watcher on the real cluster: it publishes the topology over a real
ZeroMQ PUB/SUB pair when a master is killed or a slot migrates, runs the
failover hook only for a master change, and keeps checking through errors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from dftx.codec import decode, encode
from dftx.errors import DBConnectionError, ProtocolError, PublishError
from dftx.ha import (
    HA_TOPIC, ClusterWatcher, lost_slots, restart_slots, restart_update, topology_from_update,
    topology_update,
)
from dftx.redis.cluster import ClusterClient
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Shard, Topology
from dftx.harness import poll
from dftx.update import DBRESTART, DbUpdate

from .helpers import joined, publisher, subscriber

aio = pytest_twisted.ensureDeferred


def test_topology_message_survives_the_wire():
    t = Topology.single("127.0.0.1:6379")
    update = decode(encode(topology_update(t), publisher="p", seq=1))
    assert update.topic == HA_TOPIC and topology_from_update(update) == t
    assert topology_from_update(DbUpdate("lport", "topology", "set", "{}")) is None
    assert topology_from_update(DbUpdate.control("dbrestart")) is None
    for bad in ("not json", "[]", '{"cluster": true, "masters": {}}'):
        with pytest.raises(ProtocolError):
            topology_from_update(DbUpdate("ha", "topology", "set", bad, HA_TOPIC))


class Watched:
    """A watcher on the cluster, publishing to a joined ZMQ subscriber."""

    async def start(self, seeds, interval=0.1, hook_failures=0, **client_kw):
        self.client = ClusterClient(seeds, **client_kw)
        await self.client.start()
        self.pub = await publisher()
        self.sub, self.got = await subscriber(self.pub.uri, topics=[HA_TOPIC])
        await joined(self.pub, self.got, HA_TOPIC)
        self.hook_calls = 0
        self.hook_failures = hook_failures
        self.watcher = ClusterWatcher(self.client, self.pub, interval, on_failover=self.hook)
        self.watcher.startService()
        await poll(lambda: self.topologies(), 10, "first topology message")
        return self

    def hook(self):
        self.hook_calls += 1
        if self.hook_calls <= self.hook_failures:
            raise RuntimeError("hook failed")

    def topologies(self):
        return [t for t in map(topology_from_update, self.got.updates) if t is not None]

    async def stop(self):
        await self.watcher.stopService()
        await self.sub.close()
        await self.pub.close()
        await self.client.close()


def topology_change(old, new):
    """What differs between two topologies: slots that moved, replicas."""
    moved = old.moved_slots(new)
    replicas = {
        m: (old.replicas_of(m), new.replicas_of(m))
        for m in {*old.masters, *new.masters}
        if sorted(old.replicas_of(m)) != sorted(new.replicas_of(m))
    }
    return f"slots moved: {moved[:10]} ({len(moved)}); replicas changed: {replicas}"


@aio
async def test_master_killed_topology_published_and_hook_run_until_it_succeeds(redis_cluster):
    w = await Watched().start(redis_cluster.seeds, hook_failures=1)
    try:
        assert w.topologies()[-1] == w.client.topology
        master = (await redis_cluster.masters())[0]
        [replica] = await redis_cluster.replicas_of(master)
        await master.kill()
        await poll(lambda: replica.address in w.topologies()[-1].masters, 30,
                   "topology with the promoted replica")
        new = w.topologies()[-1]
        assert master.address not in new.masters and len(new.masters) == 3
        # The hook failed once and was retried at the next check.
        await poll(lambda: w.hook_calls == 2, 10, "hook retried")
        assert w.watcher.counters["hook_errors"] == 1
        assert w.watcher.counters["failovers"] == 1
        checks = w.watcher.counters["checks"]
        await poll(lambda: w.watcher.counters["checks"] >= checks + 3, 10, "more checks")
        assert w.hook_calls == 2
    finally:
        await w.stop()


@aio
async def test_slot_migration_is_published_without_failover(redis_cluster, unique):
    w = await Watched().start(redis_cluster.seeds)
    try:
        slot = await redis_cluster.keyslot(unique)
        src = await redis_cluster.owner(slot)
        dst = await redis_cluster.other_master(src)
        await redis_cluster.migrate_slot(slot, dst)
        await poll(lambda: w.topologies()[-1].owner(slot) == dst.address, 20,
                   "topology with the slot moved")
        assert w.hook_calls == 0 and w.watcher.counters["failovers"] == 0
        checks = w.watcher.counters["checks"]
        await poll(lambda: w.watcher.counters["checks"] >= checks + 5, 10, "checks")
        # Only a change is sent: never the same topology twice in a row.  (A
        # node can still report a replica late, which is a change.)
        await poll(lambda: len(w.topologies()) == w.watcher.counters["published"], 5,
                   "every topology sent received")
        sent = w.topologies()
        assert all(a != b for a, b in zip(sent, sent[1:])), [
            topology_change(a, b) for a, b in zip(sent, sent[1:])
        ]
    finally:
        await w.stop()


@aio
async def test_checks_go_on_through_a_stalled_node(redis_single):
    w = await Watched().start([redis_single.address], interval=0.1, retries=1, timeout=0.3)
    try:
        redis_single.pause()
        try:
            await poll(lambda: w.watcher.counters["check_errors"] >= 2, 10, "failed checks")
        finally:
            redis_single.resume()
        errors = w.watcher.counters["check_errors"]
        checks = w.watcher.counters["checks"]
        await poll(lambda: w.watcher.counters["checks"] >= checks + 3, 10, "checks resumed")
        assert w.watcher.counters["check_errors"] <= errors + 1
        assert w.watcher.counters["published"] == 1 and w.hook_calls == 0
    finally:
        await w.stop()


@aio
async def test_a_master_restarted_in_place_runs_the_hook(redis_single):
    # Same address, same slots, no failover: only the run_id tells that a
    # node without persistence came back empty.
    w = await Watched().start([redis_single.address], interval=0.1)
    try:
        checks = w.watcher.counters["checks"]
        await poll(lambda: w.watcher.counters["checks"] >= checks + 3, 10, "checks")
        assert w.hook_calls == 0
        await redis_single.restart()
        await poll(lambda: w.hook_calls == 1, 10, "hook after the restart")
        assert w.watcher.counters["restarts"] == 1
        assert w.watcher.counters["failovers"] == 0
        checks = w.watcher.counters["checks"]
        await poll(lambda: w.watcher.counters["checks"] >= checks + 3, 10, "more checks")
        assert w.hook_calls == 1 and w.watcher.counters["published"] == 1
    finally:
        await w.stop()


# --- ClusterWatcher on a clock, with a fake client and publisher ----------------


class FakeClient:
    """What the watcher uses of a ClusterClient; C{result} is what the next
    refresh gives (a Topology, or an exception it fails with)."""

    def __init__(self, result):
        self.result = result
        self.run_ids: dict[str, str] = {}

    def refresh(self):
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)

    def connection(self, address):
        info = f"# Server\r\nrun_id:{self.run_ids.get(address, 'r1')}\r\n".encode()
        return SimpleNamespace(execute=lambda *args: defer.succeed(info))


class FakePublisher:
    def __init__(self):
        self.sent: list[DbUpdate] = []
        self.fail = False

    def send_event(self, update, topic=None):
        if self.fail:
            return defer.fail(PublishError(HA_TOPIC, "the test made it fail"))
        self.sent.append(update)
        return defer.succeed(None)

    def topologies(self):
        return [topology_from_update(u) for u in self.sent if not u.is_control]


A, B = Topology.single("10.0.0.1:7000"), Topology.single("10.0.0.2:7000")


@pytest.fixture
def warnings():
    events = []

    def observer(event):
        if event.get("log_namespace") == "dftx.ha" and event["log_level"] == LogLevel.warn:
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def watching(result, **kw):
    clock = Clock()
    client, pub = FakeClient(result), FakePublisher()
    watcher = ClusterWatcher(client, pub, 3.0, clock=clock, **kw)
    watcher.startService()
    return watcher, client, pub, clock


def test_a_topology_is_published_once():
    watcher, client, pub, clock = watching(A)
    assert pub.topologies() == [A] and watcher.counters["checks"] == 1
    clock.advance(3)
    clock.advance(3)
    assert watcher.counters["checks"] == 3 and pub.topologies() == [A]
    client.result = B
    clock.advance(2.9)
    assert pub.topologies() == [A]
    clock.advance(0.1)
    assert pub.topologies() == [A, B]
    clock.advance(3)
    assert pub.topologies() == [A, B] and watcher.counters["published"] == 2
    assert all(u.topic == HA_TOPIC for u in pub.sent)


def test_a_master_change_runs_the_hook_once():
    calls = []
    watcher, client, pub, clock = watching(A, on_failover=lambda: calls.append(1))
    assert calls == []  # the first topology is no failover
    client.result = B
    clock.advance(3)
    clock.advance(3)
    assert calls == [1] and watcher.counters["failovers"] == 1


def test_a_failed_check_is_counted_logged_and_retried(warnings):
    watcher, client, pub, clock = watching(DBConnectionError(None, "no node answered"))
    assert watcher.counters["check_errors"] == 1 and pub.sent == []
    assert any("no node answered" in w for w in warnings)
    client.result = A
    clock.advance(3)
    assert pub.topologies() == [A] and watcher.counters["check_errors"] == 1


def test_a_failed_publish_is_counted_logged_and_retried(warnings):
    clock = Clock()
    client, pub = FakeClient(A), FakePublisher()
    pub.fail = True
    watcher = ClusterWatcher(client, pub, 3.0, clock=clock)
    watcher.startService()
    assert watcher.counters["publish_errors"] == 1 and watcher.published is None
    assert any("the test made it fail" in w for w in warnings)
    pub.fail = False
    clock.advance(3)
    assert pub.topologies() == [A] and watcher.published == A


def test_stop_waits_for_the_check_under_way():
    clock = Clock()
    client, pub = FakeClient(A), FakePublisher()
    pending = defer.Deferred()
    client.refresh = lambda: pending
    watcher = ClusterWatcher(client, pub, 3.0, clock=clock)
    watcher.startService()
    stopped = watcher.stopService()
    assert not stopped.called
    pending.callback(A)
    assert stopped.called and pub.topologies() == [A]
    clock.advance(30)
    assert watcher.counters["checks"] == 1


# --- the slots a failover or a restart may have emptied, and the dbrestart naming them


def shards(*owners):
    """A topology of C{owners}: (start, end, master, replica) tuples."""
    return Topology([Shard(a, b, m, (r,)) for a, b, m, r in owners])


T1 = shards((0, 8191, "m1:1", "r1:1"), (8192, SLOTS - 1, "m2:1", "r2:1"))
FAILED_OVER = shards((0, 8191, "r1:1", "m1:1"), (8192, SLOTS - 1, "m2:1", "r2:1"))
MIGRATED = shards((0, 8190, "m1:1", "r1:1"), (8191, SLOTS - 1, "m2:1", "r2:1"))
JOINED = shards((0, 8191, "m1:1", "r1:1"), (8192, 9000, "m3:1", "r3:1"),
                (9001, SLOTS - 1, "m2:1", "r2:1"))


def test_lost_slots_are_those_of_masters_that_left_joined_or_restarted():
    assert lost_slots(T1, FAILED_OVER) == frozenset(range(8192))
    assert lost_slots(T1, MIGRATED) == frozenset()  # a migration loses nothing
    assert lost_slots(T1, T1, restarted=["m2:1"]) == frozenset(range(8192, SLOTS))
    assert lost_slots(T1, JOINED) == frozenset(range(8192, 9001))
    partial = Topology([Shard(0, 8191, "m1:1")])  # 8192.. served by nobody
    assert lost_slots(T1, partial) == frozenset(range(8192, SLOTS))


def test_a_restart_update_names_its_slots_on_the_wire():
    update = decode(encode(restart_update({5, 1, 2, 3, 16383}), publisher="p", seq=1))
    assert update.action == DBRESTART and update.is_control and update.topic == "D"
    assert update.value == '{"lost_slots": [[1, 3], [5, 5], [16383, 16383]]}'
    assert restart_slots(update) == {1, 2, 3, 5, 16383}
    assert restart_slots(restart_update([])) == frozenset()
    # Anything else says nothing about slots: everything may be lost.
    for value in (None, "", "false", "[]", '{"lost_slots": [[3, 1, 2]]}',
                  '{"lost_slots": [[0, 16384]]}', '{"lost_slots": [["a", 1]]}', '{"x": 1}'):
        assert restart_slots(DbUpdate(None, None, DBRESTART, value)) is None, value


def dbrestarts(pub):
    return [restart_slots(u) for u in pub.sent if u.action == DBRESTART]


def test_a_failover_publishes_the_topology_then_a_dbrestart_of_the_slots_lost():
    calls = []
    watcher, client, pub, clock = watching(T1, on_failover=lambda: calls.append(len(pub.sent)),
                                           restart_event=True)
    client.result = MIGRATED
    clock.advance(3)
    assert pub.topologies() == [T1, MIGRATED] and dbrestarts(pub) == [] and calls == []
    client.result = FAILED_OVER
    clock.advance(3)
    # The topology, the hook, then the dbrestart, which Dragonflow also reads.
    assert pub.topologies()[2] == FAILED_OVER and calls == [3]
    assert dbrestarts(pub) == [frozenset(range(8192))]
    assert pub.sent[3].topic == "D" and watcher.counters["restart_events"] == 1
    clock.advance(3)
    assert len(pub.sent) == 4


def test_a_master_restarted_in_place_gets_a_dbrestart_of_its_slots():
    watcher, client, pub, clock = watching(T1, restart_event=True)
    client.run_ids["m2:1"] = "r2"
    clock.advance(3)
    assert pub.topologies() == [T1] and dbrestarts(pub) == [frozenset(range(8192, SLOTS))]


def test_a_failed_dbrestart_is_retried_with_every_slot_lost_since(warnings):
    watcher, client, pub, clock = watching(T1, restart_event=True)
    pub.fail = True
    client.run_ids["m2:1"] = "r2"
    clock.advance(3)
    client.result = FAILED_OVER
    clock.advance(3)
    assert watcher.counters["publish_errors"] >= 2 and dbrestarts(pub) == []
    assert any("publishing dbrestart failed" in w for w in warnings)
    pub.fail = False
    clock.advance(3)
    assert dbrestarts(pub) == [frozenset(range(SLOTS))]
    clock.advance(3)
    assert len(dbrestarts(pub)) == 1


def test_without_restart_event_no_dbrestart_is_published():
    watcher, client, pub, clock = watching(T1, on_failover=lambda: None)
    client.result = FAILED_OVER
    clock.advance(3)
    assert dbrestarts(pub) == [] and pub.topologies() == [T1, FAILED_OVER]
