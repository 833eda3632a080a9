"""
The cluster client against a real Redis Cluster: routing, MOVED after a
migration under load, ASK during one, a coordinated failover under load,
and nodes that answer with something that is not Redis.
"""

from __future__ import annotations

import hiredis
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from dftx.errors import ClusterDownError, DBConnectionError, ProtocolError, ReplyError
from dftx.redis.cluster import ClusterClient
from dftx.deferreds import gather
from dftx.redis.slots import SLOTS, key_slot
from dftx.redis.topology import Shard, Topology
from dftx.harness import poll

aio = pytest_twisted.ensureDeferred


@pytest_twisted.async_yield_fixture
async def client(redis_cluster):
    c = ClusterClient(redis_cluster.seeds[:1], retries=5)
    await c.start()
    yield c
    await c.close()


class Workload:
    """
    C{writers} loops that SET keys of one slot (and of random slots) until
    stopped, recording what was acknowledged and what failed.
    """

    def __init__(self, client, tag, writers=20):
        self.client = client
        self.tag = tag
        self.acked: dict[str, str] = {}
        self.failed: list[Exception] = []
        self.stopping = False
        self._loops = [defer.ensureDeferred(self._loop(i)) for i in range(writers)]

    async def _loop(self, n):
        i = 0
        while not self.stopping:
            i += 1
            key = f"{{{self.tag}}}w{n}-{i}" if i % 2 else f"{self.tag}-w{n}-{i}"
            try:
                await self.client.execute("SET", key, str(i), slot=key_slot(key))
            except Exception as e:
                self.failed.append(e)
            else:
                self.acked[key] = str(i)

    async def until(self, count):
        await poll(lambda: len(self.acked) >= count, 30, f"{count} acknowledged writes")

    async def stop(self):
        self.stopping = True
        await defer.DeferredList(self._loops)

    async def check_readable(self, client):
        keys = list(self.acked)
        values = await gather(client.execute("GET", k, slot=key_slot(k)) for k in keys)
        missing = [k for k, v in zip(keys, values) if v != self.acked[k].encode()]
        assert not missing, f"{len(missing)} acknowledged writes missing, e.g. {missing[:3]}"


@aio
async def test_routes_every_slot_range_to_its_master(redis_cluster, client, unique):
    topology = client.topology
    assert topology.cluster and topology.covered == SLOTS and len(topology.masters) == 3
    # The seed was one node; the others were discovered.
    assert sorted(topology.masters) == sorted(m.address for m in await redis_cluster.masters())
    keys = [f"{unique}-{i}" for i in range(300)]
    await gather(client.execute("SET", k, k, slot=key_slot(k)) for k in keys)
    for k in keys[:30]:
        owner = redis_cluster.node(client.owner(key_slot(k)))
        assert await owner.cli("GET", k) == k
    assert client.stats["moved"] == 0 and client.stats["refreshes"] == 1
    assert len({client.owner(key_slot(k)) for k in keys}) == 3


@aio
async def test_error_replies_reach_the_caller(client, unique):
    await client.execute("LPUSH", unique, "x", slot=key_slot(unique))
    with pytest.raises(ReplyError) as info:
        await client.execute("GET", unique, slot=key_slot(unique))
    assert info.value.kind == "WRONGTYPE" and info.value.node == client.owner(key_slot(unique))


@aio
async def test_single_node_is_one_shard(redis_single, unique):
    c = ClusterClient([redis_single.address])
    try:
        topology = await c.start()
        assert not topology.cluster and topology.masters == [redis_single.address]
        await c.execute("SET", unique, "v", slot=key_slot(unique))
        assert await redis_single.cli("GET", unique) == "v"
        assert await c.scan(f"{unique}*".encode()) == {unique.encode()}
    finally:
        await c.close()


@aio
async def test_moved_after_slot_migrated_mid_workload(redis_cluster, client, unique):
    slot = key_slot("{" + unique + "}")
    src = await redis_cluster.owner(slot)
    dst = await redis_cluster.other_master(src)
    changes = []
    client.on_topology_changed(lambda old, new: changes.append(old.moved_slots(new)))
    work = Workload(client, unique)
    await work.until(200)
    await redis_cluster.migrate_slot(slot, dst)
    acked = len(work.acked)
    await work.until(acked + 500)
    await work.stop()
    assert work.failed == []
    assert client.stats["moved"] > 0
    assert client.owner(slot) == dst.address
    await poll(lambda: changes, 5, "topology change notification")
    assert [slot] in changes
    # The map now lists the slot as a range of its own: not contiguous.
    assert client.topology.owner(slot) == dst.address
    assert client.topology.owner(slot - 1) == client.topology.owner(slot + 1) == src.address
    await work.check_readable(client)


@aio
async def test_burst_of_moved_makes_one_refresh(redis_cluster, client, unique):
    key = "{" + unique + "}k"
    slot = key_slot(key)
    await client.execute("SET", key, "v", slot=slot)
    src = await redis_cluster.owner(slot)
    await redis_cluster.migrate_slot(slot, await redis_cluster.other_master(src))
    before = client.stats["refreshes"]
    values = await gather(client.execute("GET", key, slot=slot) for _ in range(1000))
    assert values == [b"v"] * 1000
    assert client.stats["moved"] >= 1
    refreshes = client.stats["refreshes"] - before
    assert 1 <= refreshes <= 2, refreshes


@aio
async def test_ask_during_migration_in_progress(redis_cluster, client, unique):
    moved, stays = "{" + unique + "}moved", "{" + unique + "}stays"
    slot = key_slot(moved)
    await client.execute("SET", moved, "1", slot=slot)
    await client.execute("SET", stays, "2", slot=slot)
    src = await redis_cluster.owner(slot)
    dst = await redis_cluster.other_master(src)
    await redis_cluster.begin_migration(slot, dst)
    await redis_cluster.move_keys(slot, src, dst, keys=[moved])

    assert await client.execute("GET", moved, slot=slot) == b"1"
    assert await client.execute("GET", stays, slot=slot) == b"2"
    # A new key of a migrating slot is created on the target (ASK too).
    new = "{" + unique + "}new"
    await client.execute("SET", new, "3", slot=slot)
    assert client.stats["ask"] >= 2
    assert client.owner(slot) == src.address  # ASK does not change the map
    assert await dst.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "2"

    await redis_cluster.finish_migration(slot, src, dst)
    for k, v in ((moved, b"1"), (stays, b"2"), (new, b"3")):
        assert await client.execute("GET", k, slot=slot) == v
    assert client.owner(slot) == dst.address


@aio
async def test_cluster_failover_under_load(redis_cluster, client, unique):
    slot = key_slot("{" + unique + "}")
    master = await redis_cluster.owner(slot)
    [replica] = await redis_cluster.replicas_of(master)
    work = Workload(client, unique)
    await work.until(200)
    await redis_cluster.failover(replica)
    acked = len(work.acked)
    await work.until(acked + 500)
    await work.stop()
    # A coordinated failover drops no connection: redirects only.
    assert work.failed == []
    assert client.stats["moved"] > 0
    assert client.owner(slot) == replica.address
    await work.check_readable(client)


# --- nodes that do not speak Redis --------------------------------------------


class FakeNode(protocol.Protocol):
    """Answers each command with C{answer(args, port)} (bytes, or None for
    silence); CLUSTER SHARDS as a server older than Redis 7 does."""

    def __init__(self, answer):
        self.answer = answer
        self.reader = hiredis.Reader()

    def dataReceived(self, data):
        self.reader.feed(data)
        while (command := self.reader.gets()) is not False:
            if command[:2] == [b"CLUSTER", b"SHARDS"]:
                out = b"-ERR unknown subcommand 'SHARDS'. Try CLUSTER HELP.\r\n"
            else:
                out = self.answer(command, self.transport.getHost().port)
            if out:
                self.transport.write(out)


@pytest_twisted.async_yield_fixture
async def fake_node():
    ports = []

    def listen(answer):
        factory = protocol.Factory.forProtocol(lambda: FakeNode(answer))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return f"127.0.0.1:{port.getHost().port}"

    yield listen
    for port in ports:
        await port.stopListening()


def one_shard(command, port):
    if command[:2] == [b"CLUSTER", b"SLOTS"]:
        return b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n" % port
    return None


@aio
async def test_garbage_from_the_only_node_is_a_protocol_error(fake_node):
    address = fake_node(lambda command, port: b"HTTP/1.1 400 Bad Request\r\n\r\n")
    c = ClusterClient([address], timeout=2)
    started = reactor.seconds()
    with pytest.raises(ProtocolError) as info:
        await c.start()
    await c.close()
    assert info.value.peer == address
    assert reactor.seconds() - started < 2


@aio
async def test_malformed_cluster_slots_is_a_protocol_error(fake_node):
    address = fake_node(lambda command, port: b"*1\r\n*2\r\n:0\r\n:16383\r\n")
    c = ClusterClient([address])
    with pytest.raises(ProtocolError) as info:
        await c.start()
    await c.close()
    assert "CLUSTER SLOTS" in str(info.value) and info.value.peer == address


@pytest.mark.parametrize(
    "reply, error",
    [
        (b"\x00\x01garbage\r\n", ProtocolError),
        (b"$5\r\nab", DBConnectionError),  # truncated: the rest never comes
        (None, DBConnectionError),  # silence
    ],
    ids=["garbage", "truncated", "silence"],
)
@aio
async def test_bad_replies_after_start_fail_the_command_not_hang(fake_node, reply, error):
    address = fake_node(lambda command, port: one_shard(command, port) or reply)
    c = ClusterClient([address], retries=2, timeout=0.5)
    try:
        await c.start()
        started = reactor.seconds()
        with pytest.raises(error) as info:
            await c.execute("GET", "k", slot=key_slot("k"))
        assert reactor.seconds() - started < 3
        assert address in str(info.value)
    finally:
        await c.close()


@aio
async def test_slot_no_node_serves_is_cluster_down_naming_the_slot(fake_node):
    def answer(command, port):
        if command[:2] == [b"CLUSTER", b"SLOTS"]:
            return b"*1\r\n*3\r\n:0\r\n:100\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n" % port
        return b"+OK\r\n"

    address = fake_node(answer)
    c = ClusterClient([address], retries=3, backoff=0.01)
    try:
        await c.start()
        assert await c.execute("SET", "x", "1", slot=5) == b"OK"
        with pytest.raises(ClusterDownError) as info:
            await c.execute("SET", "x", "1", slot=5000)
        assert info.value.slot == 5000 and "no node serves" in str(info.value)
    finally:
        await c.close()


@aio
async def test_tryagain_is_retried_and_clusterdown_ends_in_cluster_down_error(fake_node):
    calls = []

    def answer(command, port):
        if command[:2] == [b"CLUSTER", b"SLOTS"]:
            return one_shard(command, port)
        calls.append(command)
        if command[0] == b"MGET":
            return b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n" if len(
                calls) < 3 else b"*1\r\n$1\r\nv\r\n"
        return b"-CLUSTERDOWN The cluster is down\r\n"

    address = fake_node(answer)
    c = ClusterClient([address], retries=3, backoff=0.01)
    try:
        await c.start()
        assert await c.execute("MGET", "{a}1", slot=key_slot("a")) == [b"v"]
        assert len(calls) == 3
        with pytest.raises(ClusterDownError) as info:
            await c.execute("GET", "a", slot=key_slot("a"))
        assert (info.value.node, info.value.slot) == (address, key_slot("a"))
        assert "CLUSTERDOWN" in str(info.value) and len(calls) == 6
    finally:
        await c.close()


@aio
async def test_moved_to_an_unknown_endpoint_means_same_host(fake_node):
    other = fake_node(lambda command, port: one_shard(command, port) or b"$5\r\nthere\r\n")
    other_port = other.rsplit(":", 1)[1]
    slot = key_slot("k")

    def answer(command, port):
        return one_shard(command, port) or b"-MOVED %d :%s\r\n" % (slot, other_port.encode())

    address = fake_node(answer)
    c = ClusterClient([address], min_refresh_interval=60)
    try:
        await c.start()
        assert await c.execute("GET", "k", slot=slot) == b"there"
        assert c.owner(slot) == other
    finally:
        await c.close()


@aio
async def test_malformed_redirection_is_a_protocol_error(fake_node):
    address = fake_node(lambda command, port: one_shard(command, port) or b"-MOVED soon\r\n")
    c = ClusterClient([address])
    try:
        await c.start()
        with pytest.raises(ProtocolError) as info:
            await c.execute("GET", "k", slot=key_slot("k"))
        assert info.value.peer == address
    finally:
        await c.close()


@aio
async def test_apply_topology_routes_at_once_and_moved_corrects_it(client, unique):
    real = client.topology
    seen = []
    client.on_topology_changed(lambda old, new: seen.append(new))
    slot = key_slot(unique)
    right = real.owner(slot)
    wrong = next(m for m in real.masters if m != right)
    # A (stale) topology that sends every slot to one wrong master.
    stale = Topology([Shard(0, SLOTS - 1, wrong)])
    client.apply_topology(stale)
    assert client.owner(slot) == wrong and seen == [stale]
    await client.execute("SET", unique, "v", slot=slot)  # MOVED, then right
    assert client.owner(slot) == right
    await poll(lambda: client.topology == real, 5, "refresh after MOVED")
    assert seen[-1] == real
    assert await client.execute("GET", unique, slot=slot) == b"v"


def test_commands_after_close_fail_their_deferreds():
    # No server: the topology is installed, not read.
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    c = ClusterClient(["10.0.0.1:7000"], reactor=clock)
    c.apply_topology(Topology.single("10.0.0.1:7000"))
    c.close()
    failures = []
    for d in (c.execute("GET", "k", slot=0), c.execute("SET", "k", "v", slot=0, replicas=1),
              c.execute_on("10.0.0.1:7000", "PING"), c.scan(b"*")):
        d.addErrback(failures.append)
    assert [f.type for f in failures] == [DBConnectionError] * 4
    assert all("closed" in str(f.value) for f in failures)
