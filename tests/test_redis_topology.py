"""
CLUSTER SHARDS and CLUSTER SLOTS parsing (recorded replies of Redis 7.0 and
Valkey 9.1, and the real server the suite runs), topology comparison, and
what a refresh sends.
"""

from __future__ import annotations

import json

import hiredis
import pytest
import pytest_twisted
from twisted.internet import protocol, reactor

from dftx.endpoints import format_address, split_address
from dftx.errors import ProtocolError
from dftx.harness import poll
from dftx.redis.cluster import ClusterClient
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Shard, Topology, parse_cluster_shards, parse_cluster_slots

aio = pytest_twisted.ensureDeferred

A, B, C = "127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"


def node(port, node_id=b"", extra=None):
    entry = [b"127.0.0.1", port]
    if node_id:
        entry.append(node_id)
    if extra is not None:
        entry.append(extra)
    return entry


def test_redis7_reply_with_ids_extra_fields_and_non_contiguous_ranges():
    # Redis 7 sends the node id and a map of extra fields (RESP2: a flat
    # array); after a migration one master owns several ranges.
    reply = [
        [5461, 10922, node(7001, b"id-b", [b"hostname", b"b.example"]), node(7004, b"id-e", [])],
        [0, 99, node(7000, b"id-a", []), node(7003, b"id-d", [])],
        [100, 100, node(7001, b"id-b", [b"hostname", b"b.example"])],
        [101, 5460, node(7000, b"id-a", []), node(7003, b"id-d", [])],
        [10923, 16383, node(7002), node(7005)],
    ]
    t = parse_cluster_slots(reply, A)
    assert t.cluster
    assert t.owner(0) == t.owner(99) == A
    assert t.owner(100) == B
    assert t.owner(101) == t.owner(5460) == A
    assert t.owner(5461) == t.owner(10922) == B
    assert t.owner(16383) == C
    assert t.masters == [A, B, C]
    assert t.replicas_of(A) == ["127.0.0.1:7003"]
    assert t.replicas_of(B) == ["127.0.0.1:7004"]
    assert t.covered == SLOTS
    assert t.nodes == [A, B, C, "127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7005"]
    assert t.as_dict()["masters"][A]["slots"] == [[0, 99], [101, 5460]]


def test_unknown_host_means_the_host_asked():
    reply = [[0, SLOTS - 1, [b"", 7000, b"id"], [b"?", 7001, b"id2"], [None, 7002]]]
    t = parse_cluster_slots(reply, "10.1.2.3:7005")
    assert t.owner(5) == "10.1.2.3:7000"
    assert t.replicas_of("10.1.2.3:7000") == ["10.1.2.3:7001", "10.1.2.3:7002"]


def test_uncovered_slots_have_no_owner():
    t = parse_cluster_slots([[0, 10, node(7000)]], A)
    assert t.owner(10) == A and t.owner(11) is None
    assert t.covered == 11


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage",
        None,
        [b"x"],
        [[0, 10]],
        [[0, b"10", node(7000)]],
        [[10, 5, node(7000)]],
        [[0, SLOTS, node(7000)]],
        [[0, 10, [b"127.0.0.1"]]],
        [[0, 10, [b"127.0.0.1", 0]]],
        [[0, 10, [b"127.0.0.1", b"7000"]]],
        [[0, 10, [7000, 7000]]],
    ],
)
def test_malformed_replies_are_protocol_errors_naming_the_peer(reply):
    with pytest.raises(ProtocolError) as info:
        parse_cluster_slots(reply, A)
    assert info.value.peer == A


def test_single_node_owns_everything():
    t = Topology.single("unix:/run/redis.sock")
    assert not t.cluster
    assert t.owner(0) == t.owner(SLOTS - 1) == "unix:/run/redis.sock"
    assert t.masters == t.nodes == ["unix:/run/redis.sock"]


def test_equality_and_moved_slots():
    one = Topology([Shard(0, 8000, A, (C,)), Shard(8001, SLOTS - 1, B)])
    same = Topology([Shard(8001, SLOTS - 1, B), Shard(0, 8000, A, (C,))])
    assert one == same and hash(one) == hash(same)
    assert one.moved_slots(same) == []
    moved = Topology([Shard(0, 7999, A, (C,)), Shard(8000, SLOTS - 1, B)])
    assert one != moved
    assert one.moved_slots(moved) == [8000]
    failed_over = Topology([Shard(0, 8000, C, (A,)), Shard(8001, SLOTS - 1, B)])
    assert one.moved_slots(failed_over) == list(range(8001))
    assert one != Topology([Shard(0, 8000, A), Shard(8001, SLOTS - 1, B)])  # replica gone
    assert Topology.single(A) != Topology([Shard(0, SLOTS - 1, A)])  # cluster flag


def test_addresses():
    assert format_address("::1", 7000) == "[::1]:7000"
    assert split_address("[::1]:7000") == ("::1", 7000)
    assert split_address("redis.example:6379") == ("redis.example", 6379)
    for bad in ("nohost", ":7000", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_as_dict_round_trips_through_json():
    reply = [
        [101, 5460, node(7000), node(7003)],
        [0, 99, node(7000), node(7003)],
        [5461, 16383, node(7001)],
    ]
    t = parse_cluster_slots(reply, "127.0.0.1:7000")
    again = Topology.from_dict(json.loads(json.dumps(t.as_dict())))
    assert again == t and again.owners() == t.owners()
    single = Topology.single("127.0.0.1:6379")
    assert Topology.from_dict(single.as_dict()) == single


@pytest.mark.parametrize("data", [
    None, [], {}, {"cluster": True}, {"cluster": True, "masters": {}},
    {"cluster": "yes", "masters": {"a:1": {"slots": [[0, 1]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[0, 99999]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[5, 1]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [["x", 1]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[0, 10]]}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[0, 10]], "replicas": []},
                                  "b:1": {"slots": [[5, 20]], "replicas": []}}},
])
def test_from_dict_refuses_what_as_dict_cannot_make(data):
    with pytest.raises(ProtocolError, match="not a topology"):
        Topology.from_dict(data)


# --- CLUSTER SHARDS ---------------------------------------------------------------


def shard_node(port, role, offset, health, node_id=b"id", host=b"127.0.0.1", **more):
    """One node of a CLUSTER SHARDS reply, with the fields in the order
    Redis 7.0 and Valkey 9.1 send them (C{more}: e.g. tls_port=)."""
    extra = [x for k, v in more.items() for x in (k.replace("_", "-").encode(), v)]
    return [b"id", node_id, b"port", port, *extra, b"ip", host, b"endpoint", host,
            b"role", role, b"replication-offset", offset, b"health", health]


def shard(slots, *nodes, shard_id=None):
    return [b"slots", slots, b"nodes", list(nodes), *([b"id", shard_id] if shard_id else [])]


M, R = b"master", b"replica"

# Recorded on Redis 7.0.15 (ports renamed 7000-7005): slot 100 migrated from
# 7000 to 7001, then 7001 killed and failed over to its replica 7004.  Redis
# 7.0 makes each master a shard: the failed master is a shard without slots;
# replicas that have no replication offset yet are "loading".
REDIS_7_0_SHARDS = [
    shard([], shard_node(7001, M, 0, b"fail")),
    shard([10923, 16383], shard_node(7002, M, 14, b"online"),
          shard_node(7005, R, 0, b"loading")),
    shard([0, 99, 101, 5460], shard_node(7000, M, 14, b"online"),
          shard_node(7003, R, 0, b"loading")),
    shard([100, 100, 5461, 10922], shard_node(7004, M, 0, b"online")),
]
REDIS_7_0_SLOTS = [
    [0, 99, node(7000, b"id-a", [])],
    [100, 100, node(7004, b"id-e", [])],
    [101, 5460, node(7000, b"id-a", [])],
    [5461, 10922, node(7004, b"id-e", [])],
    [10923, 16383, node(7002, b"id-c", [])],
]

# Recorded on Valkey 9.1.2, the same steps: a shard keeps its failed master
# (role master, health fail) beside the replica promoted in its place, and
# each shard has an id.
VALKEY_9_1_SHARDS = [
    shard([0, 99, 101, 5460], shard_node(7000, M, 322, b"online"),
          shard_node(7004, R, 322, b"online"), shard_id=b"shard-a"),
    shard([100, 100, 5461, 10922], shard_node(7001, M, 308, b"fail"),
          shard_node(7005, M, 308, b"online"), shard_id=b"shard-b"),
    shard([10923, 16383], shard_node(7002, M, 184, b"online"),
          shard_node(7003, R, 184, b"online"), shard_id=b"shard-c"),
]
VALKEY_9_1_SLOTS = [
    [0, 99, node(7000, b"id-a", []), node(7004, b"id-e", [])],
    [100, 100, node(7005, b"id-f", [])],
    [101, 5460, node(7000, b"id-a", []), node(7004, b"id-e", [])],
    [5461, 10922, node(7005, b"id-f", [])],
    [10923, 16383, node(7002, b"id-c", []), node(7003, b"id-d", [])],
]


@pytest.mark.parametrize("shards, slots, master_of_100, replicas", [
    (REDIS_7_0_SHARDS, REDIS_7_0_SLOTS, "127.0.0.1:7004", []),
    (VALKEY_9_1_SHARDS, VALKEY_9_1_SLOTS, "127.0.0.1:7005", ["127.0.0.1:7003", "127.0.0.1:7004"]),
], ids=["redis-7.0", "valkey-9.1"])
def test_recorded_cluster_shards_is_the_topology_cluster_slots_gave(
        shards, slots, master_of_100, replicas):
    t = parse_cluster_shards(shards, A)
    assert t == parse_cluster_slots(slots, A)
    assert t.owner(99) == t.owner(101) == A and t.owner(100) == t.owner(5461) == master_of_100
    assert t.as_dict()["masters"][A]["slots"] == [[0, 99], [101, 5460]]  # not contiguous
    assert t.covered == SLOTS and len(t.masters) == 3
    assert "127.0.0.1:7001" not in t.nodes  # failed
    assert sorted(r for m in t.masters for r in t.replicas_of(m)) == replicas  # none loading


def test_a_shard_with_a_restarted_old_master_takes_the_master_with_the_newest_offset():
    # Valkey, for a moment after a failed-over master restarts: back online,
    # still a master of its shard, without slots or a replication offset.
    reply = [shard([0, SLOTS - 1], shard_node(7001, M, 0, b"online"),
                   shard_node(7005, M, 308, b"online"), shard_node(7004, R, 308, b"online"))]
    t = parse_cluster_shards(reply, A)
    assert t.owners() == ["127.0.0.1:7005"] * SLOTS
    assert t.replicas_of("127.0.0.1:7005") == ["127.0.0.1:7004"]
    # A master that failed before its replica took over still owns its slots.
    failed = [shard([0, SLOTS - 1], shard_node(7001, M, 10, b"fail"),
                    shard_node(7004, R, 10, b"online"))]
    assert parse_cluster_shards(failed, A).owner(0) == "127.0.0.1:7001"
    # Online first, whatever the offsets ("failed" is what the documentation says).
    shards = [shard([0, SLOTS - 1], shard_node(7001, M, 900, b"failed"),
                    shard_node(7005, M, 10, b"online"), shard_node(7002, M, b"?", b"online"))]
    assert parse_cluster_shards(shards, A).owner(0) == "127.0.0.1:7005"


def test_shard_node_addresses():
    reply = [
        shard([0, 10], shard_node(7000, M, 1, b"online", host=b"?"),
              shard_node(7003, R, 1, b"online", host=b"")),
        shard([11, SLOTS - 1], shard_node(7001, M, 1, b"online", host=b"b.example",
                                          hostname=b"b")),
    ]
    t = parse_cluster_shards(reply, "10.1.2.3:7005")
    assert t.owner(0) == "10.1.2.3:7000" and t.replicas_of("10.1.2.3:7000") == ["10.1.2.3:7003"]
    assert t.owner(11) == "b.example:7001"


def test_a_peer_reached_on_its_tls_port_gives_tls_ports():
    def tls_node(port, role):
        return shard_node(port, role, 1, b"online", tls_port=port + 100)

    reply = [shard([0, SLOTS - 1], tls_node(7000, M), tls_node(7001, R))]
    plain = parse_cluster_shards(reply, "127.0.0.1:7000")
    assert plain.nodes == ["127.0.0.1:7000", "127.0.0.1:7001"]
    tls = parse_cluster_shards(reply, "127.0.0.1:7100")
    assert tls.nodes == ["127.0.0.1:7100", "127.0.0.1:7101"]
    # tls-cluster with the plain port off: only tls-port is sent.
    only_tls = [shard([0, SLOTS - 1], [b"id", b"x", b"tls-port", 7100, b"ip", b"127.0.0.1",
                                       b"endpoint", b"127.0.0.1", b"role", M, b"health", b"online"])]
    assert parse_cluster_shards(only_tls, "127.0.0.1:7100").nodes == ["127.0.0.1:7100"]


@pytest.mark.parametrize("reply", [
    b"garbage",
    None,
    [b"x"],
    [[b"slots", [0, 10]]],
    [[b"slots", [0, 10], b"nodes"]],
    [shard([0], shard_node(7000, M, 0, b"online"))],
    [shard([10, 5], shard_node(7000, M, 0, b"online"))],
    [shard([0, SLOTS], shard_node(7000, M, 0, b"online"))],
    [shard([0, b"10"], shard_node(7000, M, 0, b"online"))],
    [shard([0, 10], shard_node(7000, R, 0, b"online"))],
    [shard([0, 10], [b"id", b"x", b"role", M])],
    [shard([0, 10], shard_node(0, M, 0, b"online"))],
    [shard([0, 10], shard_node(b"7000", M, 0, b"online"))],
    [shard([0, 10], [b"id"])],
    [shard([0, 10], [7000, 1])],
])
def test_malformed_cluster_shards_is_a_protocol_error_naming_the_peer(reply):
    with pytest.raises(ProtocolError, match="CLUSTER SHARDS") as info:
        parse_cluster_shards(reply, A)
    assert info.value.peer == A


# --- against the real server ----------------------------------------------------------


async def _shards_and_slots(client, address):
    shards = await client.execute_on(address, "CLUSTER", "SHARDS")
    slots = await client.execute_on(address, "CLUSTER", "SLOTS")
    return parse_cluster_shards(shards, address), parse_cluster_slots(slots, address)


@aio
async def test_shards_and_slots_agree_on_the_server(redis_cluster):
    cluster = redis_cluster
    client = ClusterClient(cluster.seeds)
    await client.start()
    try:
        async def agree(also=lambda t: True):
            asked = next(n.address for n in await cluster.masters())
            shards, slots = await _shards_and_slots(client, asked)
            return shards == slots and shards.covered == SLOTS and also(shards)

        await poll(agree, 10, "CLUSTER SHARDS = CLUSTER SLOTS, healthy")
        # A slot from the middle of a master's range moved: two ranges left.
        src = (await cluster.masters())[0]
        first, last = (await cluster._myself(src)).slots[0]
        slot = (first + last) // 2
        dst = await cluster.other_master(src)
        await cluster.migrate_slot(slot, dst)
        await poll(lambda: agree(lambda t: t.owner(slot) == dst.address and len(
            t.as_dict()["masters"][src.address]["slots"]) >= 2), 10, "agree after the migration")
        # The master killed and failed over (Valkey keeps it in its shard).
        [replica] = await cluster.replicas_of(dst)
        await dst.kill()
        await cluster.wait_promoted(replica)
        await poll(lambda: agree(lambda t: t.owner(slot) == replica.address
                                 and dst.address not in t.nodes), 20, "agree after the failover")
    finally:
        await client.close()


async def _calls(cluster, command):
    total = 0
    for n in cluster.nodes:
        stats = await n.info("commandstats")
        line = stats.get(f"cmdstat_cluster|{command}", "calls=0")
        total += int(line.split("calls=")[1].split(",")[0])
    return total


@aio
async def test_a_refresh_sends_one_cluster_shards(redis_cluster):
    client = ClusterClient(redis_cluster.seeds)
    await client.start()
    try:
        before = (await _calls(redis_cluster, "shards"), await _calls(redis_cluster, "slots"))
        for _ in range(5):
            await client.refresh()
        after = (await _calls(redis_cluster, "shards"), await _calls(redis_cluster, "slots"))
        assert (after[0] - before[0], after[1] - before[1]) == (5, 0)
    finally:
        await client.close()


class OldNode(protocol.Protocol):
    """A node older than Redis 7: CLUSTER SHARDS is an unknown subcommand."""

    def __init__(self, log):
        self.log = log
        self.reader = hiredis.Reader()

    def dataReceived(self, data):
        self.reader.feed(data)
        while (command := self.reader.gets()) is not False:
            self.log.append(b" ".join(command[:2]).decode())
            port = self.transport.getHost().port
            if command[:2] == [b"CLUSTER", b"SLOTS"]:
                out = b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n" % port
            else:
                out = b"-ERR unknown subcommand '%s'. Try CLUSTER HELP.\r\n" % command[1]
            self.transport.write(out)


@aio
async def test_a_server_without_cluster_shards_is_read_with_cluster_slots_from_then_on():
    log = []
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: OldNode(log)),
                             interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    client = ClusterClient([address])
    try:
        topology = await client.start()
        assert topology == Topology([Shard(0, SLOTS - 1, address)])
        for _ in range(3):
            await client.refresh()
        assert log == ["CLUSTER SHARDS", "CLUSTER SLOTS"] + ["CLUSTER SLOTS"] * 3
    finally:
        await client.close()
        await port.stopListening()
