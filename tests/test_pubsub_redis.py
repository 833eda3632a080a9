"""
The Redis pub/sub driver on the real cluster, classic and sharded: round
trips, exact topics, 10,000 messages in order, a killed subscriber node, a
killed publisher node, a slot migrated under a sharded subscriber, garbage
on a channel, and calls made while reconnecting.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from dftx.errors import PublishError, SubscribeError
from dftx.pubsub.redis import RedisPubSub, _ring
from dftx.redis.slots import key_slot
from dftx.servers import poll
from dftx.update import DbUpdate

from .test_pubsub_zmq import Received

aio = pytest_twisted.ensureDeferred
MODES = pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])


def row(key, topic=None, value="{}"):
    return DbUpdate("lport", key, "create", value, topic)


class Pair:
    """A publisher and a subscriber on the cluster, both closed at the end."""

    def __init__(self, cluster, sharded, publisher_id=None):
        self.cluster = cluster
        self.pubsub = RedisPubSub(cluster.seeds[:2], sharded=sharded, retries=2, timeout=2.0)
        self.pub = self.pubsub.get_publisher(publisher_id)
        self.sub = self.pubsub.get_subscriber()
        self.got = Received()

    async def start(self, *topics):
        await self.pub.initialize()
        for t in topics:
            await self.sub.register_topic(t)
        await self.sub.initialize(self.got)
        return self

    async def close(self):
        await self.sub.close()
        await self.pub.close()

    def control(self, action):
        return [u for u in self.got.updates if u.action == action]


@pytest_twisted.async_yield_fixture
async def pair_factory(redis_cluster):
    made = []

    async def make(sharded, *topics, publisher_id=None):
        p = Pair(redis_cluster, sharded, publisher_id)
        made.append(p)
        return await p.start(*topics)

    yield make
    for p in made:
        await p.close()


@MODES
@aio
async def test_round_trip_and_exact_topics(pair_factory, unique, sharded):
    p = await pair_factory(sharded, f"{unique}-t1")
    await p.pub.send_event(row("a", f"{unique}-t1"))
    await p.pub.send_event(row("b", f"{unique}-t10"))  # not subscribed
    await p.pub.send_event(row("c"))  # "D", always subscribed
    await poll(lambda: set(p.got.keys()) == {"a", "c"}, 10, "a and c")
    got = {u.key: u for u in p.got.updates if not u.is_control}
    assert got["a"].topic == f"{unique}-t1" and got["a"].publisher == p.pub.id
    assert got["c"].topic == "D"
    await p.sub.register_topic(f"{unique}-t10")
    await p.pub.send_event(row("e", f"{unique}-t10"))
    await poll(lambda: "e" in p.got.keys(), 10, "e after registering t10")
    assert "b" not in p.got.keys()
    await p.sub.unregister_topic(f"{unique}-t1")
    await p.pub.send_event(row("f", f"{unique}-t1"))
    await p.pub.send_event(row("g", f"{unique}-t10"))
    await poll(lambda: "g" in p.got.keys(), 10, "g")
    assert "f" not in p.got.keys()


@MODES
@aio
async def test_ten_thousand_messages_in_order_none_lost(pair_factory, unique, sharded):
    topics = [f"{unique}-{i}" for i in range(4)]
    p = await pair_factory(sharded, *topics)
    sends = [p.pub.send_event(row(f"{i}", topics[i % 4])) for i in range(10_000)]
    await defer.gatherResults(sends)
    await poll(lambda: len(p.got.keys()) == 10_000, 30, "10,000 messages")
    for t in topics:
        keys = [int(k) for k in p.got.keys(t)]
        assert keys == sorted(keys) and len(keys) == 2500
    assert p.sub.counters["gaps"] == 0 and p.sub.counters["duplicates"] == 0


def _id_on_another_node(masters, node_of_sub):
    for i in range(1000):
        if _ring(masters, f"pub-{i}")[0] != node_of_sub:
            return f"pub-{i}"
    raise AssertionError("no id hashes elsewhere")


@aio
async def test_subscriber_node_killed_it_resubscribes_elsewhere_then_dbrestart(
        redis_cluster, pair_factory, unique):
    p = await pair_factory(False, unique)
    [node] = list(p.sub._links)
    masters = [m.address for m in await redis_cluster.masters()]
    sender = await pair_factory(False, publisher_id=_id_on_another_node(masters, node))
    await sender.pub.send_event(row("before", unique))
    await poll(lambda: "before" in p.got.keys(unique), 10, "before")
    await redis_cluster.node(node).kill()
    await poll(lambda: p.control("dbrestart"), 20, "dbrestart")
    [now] = list(p.sub._links)
    assert now != node
    # Messages sent after the restart arrive.
    await sender.pub.send_event(row("after", unique))
    await poll(lambda: "after" in p.got.keys(unique), 10, "after")
    assert p.sub.counters["restarts"] == 1


@aio
async def test_publisher_node_killed_that_send_errbacks_the_next_succeeds(
        redis_cluster, pair_factory, unique):
    p = await pair_factory(False, unique)
    node = p.pub.node
    masters = [m.address for m in await redis_cluster.masters()]
    listener = await pair_factory(False, unique,
                                  publisher_id=_id_on_another_node(masters, node))
    await redis_cluster.node(node).kill()
    with pytest.raises(PublishError) as info:
        await p.pub.send_event(row("lost", unique))
    assert info.value.topic == unique
    await p.pub.send_event(row("next", unique))
    assert p.pub.node != node
    await poll(lambda: "next" in listener.got.keys(unique), 15, "next delivered")


@aio
async def test_sharded_slot_migrated_under_a_live_subscriber(redis_cluster, pair_factory,
                                                             unique):
    p = await pair_factory(True, unique)
    slot = key_slot(unique)
    src = await redis_cluster.owner(slot)
    dst = next(m for m in await redis_cluster.masters() if m is not src)
    await p.pub.send_event(row("before", unique))
    await poll(lambda: "before" in p.got.keys(unique), 10, "before")
    await redis_cluster.migrate_slot(slot, dst)
    await poll(lambda: p.control("sync"), 15, "sync after the slot moved")
    assert [u.topic for u in p.control("sync")][-1] == unique
    assert dst.address in p.sub._links and unique.encode() in p.sub._links[dst.address].channels

    async def delivered():
        await p.pub.send_event(row("after", unique))
        return "after" in p.got.keys(unique)
    await poll(delivered, 15, "messages after the move")
    assert p.sub.counters["moves"] == 1


@MODES
@aio
async def test_garbage_on_a_subscribed_channel_is_counted_and_dropped(
        redis_cluster, pair_factory, unique, sharded):
    p = await pair_factory(sharded, unique)
    node = redis_cluster.nodes[0]
    await node.cli("-c", "SPUBLISH" if sharded else "PUBLISH", unique, "\x01garbage")
    await p.pub.send_event(row("ok", unique))
    await poll(lambda: "ok" in p.got.keys(unique), 10, "ok")
    assert p.sub.counters["undecodable"] == 1


@aio
async def test_topics_registered_while_reconnecting_are_subscribed_on_reconnect(
        redis_cluster, pair_factory, unique):
    p = await pair_factory(False, unique)
    [node] = list(p.sub._links)
    await redis_cluster.node(node).kill()
    await poll(lambda: p.sub._repairing is not None or p.control("dbrestart"), 10, "repair")
    await p.sub.register_topic(f"{unique}-late")  # fires at once while reconnecting
    await poll(lambda: p.control("dbrestart"), 20, "dbrestart")
    assert f"{unique}-late".encode() in next(iter(p.sub._links.values())).channels

    async def delivered():
        await p.pub.send_event(row("late", f"{unique}-late"))
        return "late" in p.got.keys(f"{unique}-late")
    await poll(delivered, 15, "the late topic delivers")


@aio
async def test_nothing_reachable_is_a_subscribe_error():
    from dftx.servers import free_port

    sub = RedisPubSub([f"127.0.0.1:{free_port()}"], retries=1, timeout=0.5).get_subscriber()
    with pytest.raises(SubscribeError):
        await sub.initialize(lambda u: None)
    await sub.close()


def test_ring_spreads_ids_over_masters():
    masters = [f"127.0.0.1:{7000 + i}" for i in range(3)]
    firsts = {_ring(masters, f"id-{i}")[0] for i in range(100)}
    assert firsts == set(masters)
    assert sorted(_ring(masters, "x")) == sorted(masters)
