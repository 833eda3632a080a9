"""
RedisDbDriver: the NB DB contract on a real Redis Cluster and on a single
non-cluster server, and what the driver adds (key layout, replicas, rollback,
failures).
"""

from __future__ import annotations

import hiredis
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from dftx.config import parse
from dftx.db.redis import RedisDbDriver, row_key
from dftx.errors import DBConnectionError, DBKeyNotFound, ProtocolError
from dftx.redis.slots import key_slot
from dftx.harness import poll

from .db_contract import DbDriverContract, _raises

aio = pytest_twisted.ensureDeferred


class TestRedisDbDriverOnCluster(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self, redis_cluster):
        driver = RedisDbDriver(hosts=redis_cluster.seeds[:2], retries=3)
        await driver.initialize()
        yield driver
        await driver.close()


class TestRedisDbDriverOnSingleNode(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self, redis_single):
        driver = RedisDbDriver(hosts=[redis_single.address], retries=3)
        await driver.initialize()
        yield driver
        await driver.close()


# --- what the Redis driver adds to the contract ----------------------------------


@pytest_twisted.async_yield_fixture
async def cluster_driver(redis_cluster):
    driver = RedisDbDriver(hosts=redis_cluster.seeds[:1], retries=3)
    await driver.initialize()
    yield driver
    await driver.close()


@aio
async def test_rows_are_plain_strings_at_table_topic_key(redis_cluster, cluster_driver, unique):
    await cluster_driver.create_key(unique, "port1", '{"id": 1}', topic="tenant")
    await cluster_driver.create_key(unique, "chassis", "c")
    node = redis_cluster.nodes[0]
    assert await node.cli("-c", "GET", f"{{{unique}.tenant}}port1") == '{"id": 1}'
    assert await node.cli("-c", "GET", f"{{{unique}.}}chassis") == "c"
    # One tenant's rows of a table share a slot.
    assert key_slot(f"{{{unique}.tenant}}a") == key_slot(f"{{{unique}.tenant}}b")
    counter = await cluster_driver.allocate_unique_key(unique)
    assert await node.cli("-c", "GET", f"{{unique_key.}}{unique}") == str(counter)


def test_from_config(tmp_path):
    config = parse(
        "[df]\nremote_db_hosts = 127.0.0.1:7000, 127.0.0.1:7001\n"
        "[df_redis]\nretries = 5\nwait_replicas = 1\n",
        role="neutron_server",
    )
    driver = RedisDbDriver.from_config(config)
    assert driver.client.retries == 5 and driver.wait_replicas == 1
    assert driver.client._nodes.seeds == ["127.0.0.1:7000", "127.0.0.1:7001"]


@aio
async def test_acl_user_and_password_from_config(redis_single, unique):
    user = f"u{unique}"
    await redis_single.cli("ACL", "SETUSER", user, "on", ">pw-1", "~*", "+@all")
    try:
        def driver(creds):
            return RedisDbDriver.from_config(parse(
                f"[df]\nremote_db_hosts = {redis_single.address}\n"
                f"[df_redis]\nretries = 1\n{creds}", role="neutron_server"))

        good = driver(f"username = {user}\npassword = pw-1\n")
        await good.initialize()
        try:
            await good.create_key(unique, "k", "v")
            assert await redis_single.cli("ACL", "WHOAMI") == "default"
            assert await good.client.execute("ACL", "WHOAMI", slot=0) == user.encode()
        finally:
            await good.close()
        bad = driver(f"username = {user}\npassword = wrong\n")
        with pytest.raises(DBConnectionError) as info:
            await bad.initialize()
        await bad.close()
        assert "WRONGPASS" in str(info.value) and "wrong" not in str(info.value).replace(
            "WRONGPASS", "")
    finally:
        await redis_single.cli("ACL", "DELUSER", user)


@aio
async def test_wait_replicas_on_a_cluster(redis_cluster, unique):
    driver = RedisDbDriver(hosts=redis_cluster.seeds, wait_replicas=1)
    await driver.initialize()
    try:
        await defer.gatherResults(
            [driver.create_key(unique, f"k{i}", str(i)) for i in range(100)]
        )
        await driver.set_key(unique, "k1", "x")
        await driver.delete_key(unique, "k2")
        assert len(await driver.get_all_keys(unique)) == 99
    finally:
        await driver.close()


@aio
async def test_write_not_replicated_is_undone_and_reported(redis_single, unique):
    # A single server has no replica: every WAIT 1 falls short.
    plain = RedisDbDriver(hosts=[redis_single.address])
    strict = RedisDbDriver(hosts=[redis_single.address], wait_replicas=1, timeout=0.4)
    await plain.initialize()
    await strict.initialize()
    try:
        err = await _raises(DBConnectionError, strict.create_key(unique, "new", "v"))
        assert "the write was undone" in str(err) and err.node == redis_single.address
        await _raises(DBKeyNotFound, plain.get_key(unique, "new"))

        await plain.create_key(unique, "old", "before", topic="t")
        await _raises(DBConnectionError, strict.create_key(unique, "old", "after", topic="t"))
        assert await plain.get_key(unique, "old") == "before"
        await _raises(DBConnectionError, strict.set_key(unique, "old", "after"))
        assert await plain.get_key(unique, "old", topic="t") == "before"

        # A delete is not undone, but not reported done either.
        await _raises(DBConnectionError, strict.delete_key(unique, "old", topic="t"))
        await _raises(DBKeyNotFound, plain.get_key(unique, "old"))
    finally:
        await plain.close()
        await strict.close()


@aio
async def test_kill_master_with_1000_writes_in_flight(redis_cluster, unique):
    """
    kill -9 the master of a table's slot while 1,000 writes to it are in
    flight: each write either fails, or can be read once the replica has
    taken over.  The writes lost with the connection are sent again, to the
    new master once the cluster has failed over.

    (Redis replicates asynchronously.  On loopback, Redis 7 writes the
    replication stream before the client's reply, so a reply the client
    saw means the replica has the write; across a network only
    C{wait_replicas} makes that so, see doc/redis.md.)
    """
    slot = key_slot(row_key(unique, "k", None))
    master = await redis_cluster.owner(slot)
    [replica] = await redis_cluster.replicas_of(master)
    driver = RedisDbDriver(hosts=redis_cluster.seeds, retries=10)
    await driver.initialize()
    try:
        writes = [driver.create_key(unique, f"k{i}", f"v{i}") for i in range(1000)]
        done: list[int] = []
        in_flight_at_kill: list[int] = []

        def kill(_):
            in_flight_at_kill.append(len(writes) - len(done))
            master.process.signal("KILL")

        # Kill as soon as the first write is acknowledged: the rest are in
        # flight (sent, or answered in a later read).
        writes[0].addCallback(kill)
        for w in writes:
            w.addBoth(lambda result: done.append(1) or result)
        results = await defer.DeferredList(writes, consumeErrors=True)
        assert in_flight_at_kill[0] > 900
        acked = [f"k{i}" for i, (ok, _) in enumerate(results) if ok]
        failed = [r.value for ok, r in results if not ok]
        assert all(isinstance(e, DBConnectionError) for e in failed), failed[:3]
        await redis_cluster.wait_promoted(replica, 20)
        await driver.create_key(unique, "after", "failover")
    finally:
        await driver.close()

    reader = RedisDbDriver(hosts=[replica.address])
    await reader.initialize()
    try:
        for key in acked:
            assert await reader.get_key(unique, key) == "v" + key[1:]
        assert await reader.get_key(unique, "after") == "failover"
    finally:
        await reader.close()


@aio
async def test_every_node_down_then_back(redis_cluster, unique):
    driver = RedisDbDriver(hosts=redis_cluster.seeds, retries=3)
    await driver.initialize()
    try:
        await driver.create_key(unique, "k", "v")
        await defer.gatherResults(
            [defer.ensureDeferred(n.kill()) for n in redis_cluster.nodes]
        )
        started = reactor.seconds()
        err = await _raises(DBConnectionError, driver.get_key(unique, "k", topic="t"))
        assert err.slot == key_slot(row_key(unique, "k", "t")) and err.node
        err = await _raises(DBConnectionError, driver.create_key(unique, "k", "v2"))
        assert err.slot is not None
        await _raises(DBConnectionError, driver.get_all_keys(unique))
        assert reactor.seconds() - started < 10
        fresh = RedisDbDriver(hosts=redis_cluster.seeds[:2], retries=2)
        err = await _raises(DBConnectionError, fresh.initialize())
        assert "CLUSTER SHARDS" in str(err)
        await fresh.close()

        for n in redis_cluster.nodes:
            await n.start()
        await poll(lambda: driver.create_key(unique, "k2", "back").addCallback(
            lambda _: True), 30, "writes after the restart")
        # The servers keep nothing on disk: only what was written since.
        assert await driver.get_all_keys(unique) == ["k2"]
        assert await driver.get_key(unique, "k2") == "back"
    finally:
        await driver.close()


# --- a node that answers what no Redis would --------------------------------------


class OneShardNode(protocol.Protocol):
    """A fake node: owns every slot, answers commands from a table."""

    def __init__(self, replies):
        self.replies = replies
        self.reader = hiredis.Reader()

    def dataReceived(self, data):
        self.reader.feed(data)
        while (command := self.reader.gets()) is not False:
            if command[:2] == [b"CLUSTER", b"SHARDS"]:  # as before Redis 7
                out = b"-ERR unknown subcommand 'SHARDS'. Try CLUSTER HELP.\r\n"
            elif command[:2] == [b"CLUSTER", b"SLOTS"]:
                port = self.transport.getHost().port
                out = b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n" % port
            else:
                self.replies.setdefault("log", []).append(command[0])
                out = self.replies[command[0].decode()]
                if isinstance(out, list):  # one reply per call, in turn
                    out = out.pop(0)
            if out is None:  # hang up instead of answering
                self.transport.loseConnection()
                return
            self.transport.write(out)


@pytest_twisted.async_yield_fixture
async def odd_node():
    replies = {}
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(lambda: OneShardNode(replies)), interface="127.0.0.1"
    )
    driver = RedisDbDriver(hosts=[f"127.0.0.1:{port.getHost().port}"], retries=2)
    await driver.initialize()
    yield driver, replies
    await driver.close()
    await port.stopListening()


@pytest.mark.parametrize(
    "command, reply, call",
    [
        ("GET", b":5\r\n", lambda d: d.get_key("t", "k", topic="x")),
        ("GET", b"*1\r\n$1\r\nv\r\n", lambda d: d.get_key("t", "k", topic="x")),
        ("GET", b"$2\r\n\xff\xfe\r\n", lambda d: d.get_key("t", "k", topic="x")),
        ("EVALSHA", b":1\r\n", lambda d: d.create_key("t", "k", "v")),
        ("EVALSHA", b"-WRONGTYPE Operation against a key\r\n",
         lambda d: d.create_key("t", "k", "v")),
        ("SCAN", b"+OK\r\n", lambda d: d.get_all_keys("t")),
        ("SCAN", b"*2\r\n$1\r\n0\r\n:1\r\n", lambda d: d.get_key("t", "k")),
        ("INCR", b"$1\r\n1\r\n", lambda d: d.allocate_unique_key("t")),
    ],
    ids=["int-for-get", "array-for-get", "not-utf8", "int-for-set", "error-reply",
         "status-for-scan", "bad-scan-page", "bulk-for-incr"],
)
@aio
async def test_unexpected_replies_are_protocol_errors(odd_node, command, reply, call):
    driver, replies = odd_node
    replies[command] = reply
    err = await _raises(ProtocolError, call(driver))
    assert err.peer is None or err.peer.startswith("127.0.0.1:")


@aio
async def test_write_whose_wait_is_cut_off_is_resent_then_undone(odd_node):
    driver, replies = odd_node
    driver.wait_replicas = 1
    replies.update({"EVALSHA": [b"$-1\r\n", b"$-1\r\n", b":1\r\n"], "WAIT": None})
    err = await _raises(DBConnectionError, driver.create_key("t", "k", "v"))
    assert "the write was undone" in str(err)
    # Sent, WAIT lost with the connection; sent again (a WAIT on a new
    # connection would confirm nothing); out of attempts: undone.
    assert replies["log"] == [b"EVALSHA", b"WAIT", b"EVALSHA", b"WAIT", b"EVALSHA"]
