"""
The Redis pub/sub driver on the real cluster, classic and sharded: round
trips, exact topics, 10,000 messages in order, a killed subscriber node, a
killed publisher node, a slot migrated under a sharded subscriber, garbage
on a channel, and calls made while reconnecting.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task

from dftx.errors import PublishError, SubscribeError
from dftx.pubsub.redis import RedisPubSub
from dftx.pubsub.redis_link import ring
from dftx.redis.slots import key_slot
from dftx.harness import poll
from dftx.update import DbUpdate

from .helpers import Received

aio = pytest_twisted.ensureDeferred
MODES = pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])


def row(key, topic=None, value="{}"):
    return DbUpdate("lport", key, "create", value, topic)


class Pair:
    """A publisher and a subscriber on the cluster, both closed at the end."""

    def __init__(self, cluster, sharded, publisher_id=None, sub_name=None):
        self.cluster = cluster
        self.pubsub = RedisPubSub(cluster.seeds[:2], sharded=sharded, retries=2, timeout=2.0)
        self.pub = self.pubsub.get_publisher(publisher_id)
        self.sub = self.pubsub.get_subscriber(sub_name)
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

    async def make(sharded, *topics, publisher_id=None, sub_name=None):
        p = Pair(redis_cluster, sharded, publisher_id, sub_name)
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


def _id_on_another_node(masters, node):
    """A publisher id or subscriber name that a classic client hashes to a
    master other than C{node}."""
    for i in range(1000):
        if ring(masters, f"id-{i}")[0] != node:
            return f"id-{i}"
    raise AssertionError("no id hashes elsewhere")


@aio
async def test_subscriber_node_killed_it_resubscribes_elsewhere_then_dbrestart(
        redis_cluster, pair_factory, unique):
    p = await pair_factory(False, unique)
    [node] = p.sub.nodes
    masters = [m.address for m in await redis_cluster.masters()]
    sender = await pair_factory(False, publisher_id=_id_on_another_node(masters, node))
    await sender.pub.send_event(row("before", unique))
    await poll(lambda: "before" in p.got.keys(unique), 10, "before")
    await redis_cluster.node(node).kill()
    await poll(lambda: p.control("dbrestart"), 20, "dbrestart")
    [now] = p.sub.nodes
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
    listener = await pair_factory(False, unique, sub_name=_id_on_another_node(masters, node))
    assert node not in listener.sub.nodes
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
    dst = await redis_cluster.other_master(src)
    await p.pub.send_event(row("before", unique))
    await poll(lambda: "before" in p.got.keys(unique), 10, "before")
    await redis_cluster.migrate_slot(slot, dst)
    await poll(lambda: p.control("sync"), 15, "sync after the slot moved")
    assert [u.topic for u in p.control("sync")][-1] == unique
    assert unique.encode() in p.sub._links[dst.address].channels
    assert all(unique.encode() not in link.channels
               for a, link in p.sub._links.items() if a != dst.address)

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
    # Oversized: dropped, and its topic resynced (an update was lost).
    p.sub.max_message_size = 4096
    await p.pub.send_event(row("big", unique, value="x" * 5000))
    await p.pub.send_event(row("after", unique))
    await poll(lambda: "after" in p.got.keys(unique), 10, "after")
    assert "big" not in p.got.keys(unique) and p.sub.counters["oversized"] == 1
    assert [(u.action, u.topic) for u in p.got.updates if u.is_control][-1] == (
        "sync", unique)


def topics_on(client, node, prefix, n):
    """C{n} topic names whose slot C{node} serves, by C{client}'s map."""
    names = (f"{prefix}-{i}" for i in range(100_000))
    return [t for t in names if client.owner(key_slot(t)) == node][:n]


@MODES
@aio
async def test_lost_connection_resubscribes_every_topic_then_dbrestart(
        redis_cluster, pair_factory, unique, sharded):
    topics = [f"{unique}-{i}" for i in range(8)]
    p = await pair_factory(sharded, *topics)
    for node in p.sub.nodes:  # the server drops the subscriber's connections
        await redis_cluster.node(node).cli("CLIENT", "KILL", "TYPE", "pubsub")
    await poll(lambda: p.control("dbrestart"), 10, "dbrestart")
    assert p.sub.counters["restarts"] >= 1

    async def delivered():
        for t in topics:
            await p.pub.send_event(row(f"after-{t}", t))
        return all(f"after-{t}" in p.got.keys(t) for t in topics)
    await poll(delivered, 10, "every topic delivers again")


@aio
async def test_sharded_owner_killed_calls_while_reconnecting(redis_cluster, pair_factory,
                                                              unique):
    """
    The master of some topics is killed: publishing there errbacks until
    the failover; a subscriber with a connection there reconnects (topics
    registered and unregistered meanwhile fire at once and are applied on
    reconnect); one without registers a topic there (that starts its own
    reconnection).  Both get dbrestart once the replica took over, then
    every topic they hold delivers.
    """
    probe = await pair_factory(True)
    client = probe.sub.client
    home = client.owner(key_slot("D"))
    victim = next(m for m in client.topology.masters if m != home)
    lost, later = topics_on(client, victim, f"{unique}-v", 2)
    [kept] = topics_on(client, home, f"{unique}-h", 1)
    a = await pair_factory(True, lost, kept)
    b = await pair_factory(True, kept)
    assert victim in a.sub.nodes and victim not in b.sub.nodes

    await redis_cluster.node(victim).kill()
    with pytest.raises(PublishError) as info:
        await a.pub.send_event(row("dropped", lost))
    assert info.value.topic == lost
    await poll(lambda: a.sub._repairing is not None, 5, "a reconnecting")
    registered = a.sub.register_topic(later)
    assert registered.called  # at once: applied on reconnect
    await a.sub.unregister_topic(kept)  # its connection is up: confirmed now
    await b.sub.register_topic(later)  # its shard is down: b reconnects
    assert b.sub._repairing is not None
    await poll(lambda: a.control("dbrestart") and b.control("dbrestart"), 30,
               "dbrestart after the failover")

    async def delivered():
        for t in (lost, later, kept):
            await a.pub.send_event(row(f"after-{t}", t))
        return (f"after-{lost}" in a.got.keys(lost) and f"after-{later}" in a.got.keys(later)
                and f"after-{later}" in b.got.keys(later) and f"after-{kept}" in b.got.keys(kept))
    await poll(delivered, 15, "every registered topic delivers")
    assert "dropped" not in a.got.keys()
    assert f"after-{kept}" not in a.got.keys() and a.sub.counters["filtered"] == 0
    assert a.sub.counters["restarts"] == 1 and b.sub.counters["restarts"] == 1


@aio
async def test_a_stopped_node_is_left_after_keepalive_and_timeout(redis_cluster, unique):
    """SIGSTOP keeps the connection open but silent: the keepalive PING
    times out, and the subscriber moves to the next master."""
    pubsub = RedisPubSub(redis_cluster.seeds[:2], retries=2, timeout=1.0, keepalive=0.3)
    sub, got = pubsub.get_subscriber(), Received()
    await sub.register_topic(unique)
    await sub.initialize(got)
    [node] = sub.nodes
    masters = [m.address for m in await redis_cluster.masters()]
    pub = pubsub.get_publisher(_id_on_another_node(masters, node))
    await pub.initialize()
    try:
        redis_cluster.node(node).pause()
        await poll(lambda: [u for u in got.updates if u.action == "dbrestart"], 15, "dbrestart")
        assert sub.nodes and sub.nodes != [node]

        async def delivered():
            await pub.send_event(row("after", unique))
            return "after" in got.keys(unique)
        await poll(delivered, 10, "messages after moving")
    finally:
        await sub.close()
        await pub.close()


@aio
async def test_from_config_sharded_round_trip(redis_cluster, tmp_path, unique):
    from dftx import config, pubsub

    ca = tmp_path / "ca.pem"
    ca.write_text("")
    path = tmp_path / "dftx.ini"
    path.write_text(
        "[df]\n"
        f"remote_db_hosts = {','.join(redis_cluster.seeds[:2])}\n"
        "pub_sub_driver = redis_sharded\n"
        "[df_redis]\nretries = 2\nusername = app\npassword = secret\n")
    ps = pubsub.from_config(config.load(str(path)))
    assert isinstance(ps, RedisPubSub) and ps.sharded
    assert ps.hosts == redis_cluster.seeds[:2]
    assert ps.client_options == {"retries": 2, "tls": None, "password": "secret",
                                 "username": "app"}
    path.write_text(
        "[df]\n"
        f"remote_db_hosts = {','.join(redis_cluster.seeds[:2])}\n"
        "pub_sub_driver = redis\n"
        f"[df_redis]\ntls = true\nca_file = {ca}\n")
    ps = pubsub.from_config(config.load(str(path)))
    assert not ps.sharded and ps.client_options["tls"].ca_file == str(ca)
    assert ps.client_options["password"] is None and ps.client_options["username"] is None
    # Usable as configured (the test cluster has no password or TLS).
    path.write_text(
        "[df]\n"
        f"remote_db_hosts = {','.join(redis_cluster.seeds[:2])}\n"
        "pub_sub_driver = redis_sharded\n")
    ps = pubsub.from_config(config.load(str(path)))
    pub, sub, got = ps.get_publisher(), ps.get_subscriber(), Received()
    try:
        await pub.initialize()
        await sub.register_topic(unique)
        await sub.initialize(got)
        await pub.send_event(row("cfg", unique))
        await poll(lambda: "cfg" in got.keys(unique), 10, "cfg")
    finally:
        await sub.close()
        await pub.close()


@MODES
@aio
async def test_single_server_round_trip_and_reconnect(redis_single, unique, sharded):
    ps = RedisPubSub([redis_single.address], sharded=sharded, retries=2, timeout=2.0)
    pub, sub, got = ps.get_publisher(), ps.get_subscriber("compute1"), Received()
    assert sub.name == "compute1"
    try:
        await pub.initialize()
        await sub.register_topic(unique)
        await sub.initialize(got)
        await pub.send_event(row("one", unique))
        await poll(lambda: "one" in got.keys(unique), 10, "one")
        await redis_single.cli("CLIENT", "KILL", "TYPE", "pubsub")
        await poll(lambda: [u for u in got.updates if u.action == "dbrestart"], 10, "dbrestart")
        await pub.send_event(row("two", unique))
        await poll(lambda: "two" in got.keys(unique), 10, "two")
    finally:
        await sub.close()
        await pub.close()


@aio
async def test_nothing_reachable_is_a_subscribe_error():
    from dftx.harness import free_port

    sub = RedisPubSub([f"127.0.0.1:{free_port()}"], retries=1, timeout=0.5).get_subscriber()
    with pytest.raises(SubscribeError):
        await sub.initialize(lambda u: None)
    await sub.close()


def test_ring_spreads_ids_over_masters():
    masters = [f"127.0.0.1:{7000 + i}" for i in range(3)]
    firsts = {ring(masters, f"id-{i}")[0] for i in range(100)}
    assert firsts == set(masters)
    assert sorted(ring(masters, "x")) == sorted(masters)


@aio
async def test_sharded_sends_keep_their_order_while_the_slot_moves(redis_cluster, pair_factory,
                                                                    unique):
    """
    A publisher sending without pause while the channel's slot moves: the
    sends the old owner redirects are sent on to the new one before any
    later send, so no subscriber ever gets one late (it would count it as
    a duplicate).
    """
    p = await pair_factory(True, unique)
    watcher = await pair_factory(True, unique)
    slot = key_slot(unique)
    src = await redis_cluster.owner(slot)
    dst = await redis_cluster.other_master(src)
    sends = []

    def burst():
        n = len(sends)
        sends.extend(p.pub.send_event(row(f"{n + i}", unique)) for i in range(200))

    loop = task.LoopingCall(burst)
    loop.start(0.005)
    await poll(lambda: len(p.got.keys(unique)) > 100, 10, "a stream")
    await redis_cluster.migrate_slot(slot, dst)
    await poll(lambda: p.control("sync") and watcher.control("sync"), 15, "moved")
    n = len(sends)
    await poll(lambda: len(sends) > n + 200, 10, "more sends")
    loop.stop()
    results = await defer.DeferredList(sends, consumeErrors=True)
    assert all(ok for ok, _ in results)
    last = f"{len(sends) - 1}"
    await poll(lambda: last in p.got.keys(unique) and last in watcher.got.keys(unique), 10,
               "the last send")
    assert p.pub.stats["redirected"] > 0
    for sub in (p, watcher):
        keys = [int(k) for k in sub.got.keys(unique)]
        assert keys == sorted(keys)
        assert sub.sub.counters["duplicates"] == 0, sub.sub.counters
