"""
Reads of one topic on a real 3+3 Redis Cluster (dftx.redis.slotread through
RedisDbDriver.get_topic_rows): what they send to which node (INFO
commandstats), during a slot migration and with a stale slot map, from a
replica, and the write scripts' versions meanwhile.
"""

from __future__ import annotations

from collections import Counter

import pytest_twisted

from dftx.db.redis import RedisDbDriver, row_key, version_key
from dftx.harness import poll
from dftx.redis.slots import key_slot
from dftx.redis.topology import Shard, Topology

aio = pytest_twisted.ensureDeferred

COUNTED = ("scan", "mget", "get", "exists", "cluster|getkeysinslot", "evalsha", "eval")


async def calls(nodes) -> Counter:
    """(node address, command) -> calls so far, for the COUNTED commands."""
    out: Counter = Counter()
    for n in nodes:
        info = await n.info("commandstats")
        for command in COUNTED:
            stats = info.get(f"cmdstat_{command}")
            if stats:
                out[n.address, command] = int(dict(
                    f.split("=") for f in stats.split(","))["calls"])
    return out


async def sent(nodes, before: Counter) -> dict:
    after = await calls(nodes)
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def same_slot_keys(slot: int, n: int) -> list[str]:
    """C{n} keys without dftx's layout that hash to C{slot}."""
    found = []
    i = 0
    while len(found) < n:
        i += 1
        if key_slot(f"other{i}") == slot:
            found.append(f"other{i}")
    return found


@pytest_twisted.async_yield_fixture
async def driver(redis_cluster):
    d = RedisDbDriver(redis_cluster.seeds)
    await d.initialize()
    yield d
    await d.close()


@aio
async def test_a_topic_read_lists_its_slot_and_reads_only_the_topic(redis_cluster, driver, unique):
    rows = {f"p{i}": f"v{i}" for i in range(50)}
    for k, v in rows.items():
        await driver.create_key(unique, k, v, topic="t1")
    slot = key_slot(row_key(unique, "", "t1"))
    plain, tagged = same_slot_keys(slot, 2)
    for key in (plain, "{" + tagged + "}k", row_key(unique, "", "t1")):  # the last: the probe
        await driver.client.execute("SET", key, "not a row of t1", slot=slot)
    for i in range(300):  # and keys elsewhere
        await driver.create_key(unique, f"k{i}", "x", topic=f"other{i}")
    owner = driver.client.owner(slot)

    before = await calls(redis_cluster.nodes)
    assert dict(await driver.get_topic_rows(unique, "t1")) == rows
    assert await sent(redis_cluster.nodes, before) == {
        (owner, "cluster|getkeysinslot"): 1, (owner, "mget"): 1}

    before = await calls(redis_cluster.nodes)
    await driver.get_topic_versions([(unique, "t1"), (unique, "other1")])
    owner1 = driver.client.owner(key_slot(version_key(unique, "other1")))
    assert await sent(redis_cluster.nodes, before) == (
        {(owner, "get"): 2} if owner == owner1 else {(owner, "get"): 1, (owner1, "get"): 1})


@aio
async def test_reads_and_writes_during_a_migration_and_with_a_stale_map(
        redis_cluster, driver, unique):
    rows = {f"p{i}": f"v{i}" for i in range(40)}
    for k, v in rows.items():
        await driver.create_key(unique, k, v, topic="t1")
    slot = key_slot(row_key(unique, "", "t1"))
    src = await redis_cluster.owner(slot)
    dst = await redis_cluster.other_master(src)
    replica_reader = RedisDbDriver(redis_cluster.seeds, read_from_replicas=True)
    await replica_reader.initialize()
    await redis_cluster.begin_migration(slot, dst)
    try:
        keys = sorted((await src.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100")).split())
        version = version_key(unique, "t1")
        # Half the rows on each side, the version on the target.
        await redis_cluster.move_keys(slot, src, dst, [version, *keys[::2]])
        assert dict(await driver.get_topic_rows(unique, "t1")) == rows
        empty = next(t for t in (f"e{i}" for i in range(10 ** 6))
                     if key_slot(row_key(unique, "", t)) == slot)  # a topic of the slot
        assert await driver.get_topic_rows(unique, empty) == []
        fallbacks = replica_reader.client.stats["replica_fallbacks"]
        assert dict(await replica_reader.get_topic_rows(unique, "t1")) == rows
        assert replica_reader.client.stats["replica_fallbacks"] == fallbacks + 1

        # Writes meet TRYAGAIN (row and version apart) and are split.
        v0 = (await driver.get_topic_versions([(unique, "t1")]))[unique, "t1"]
        await driver.create_key(unique, "new", "n", topic="t1")
        await driver.set_key(unique, "p1", "changed", topic="t1")
        await driver.delete_key(unique, "p2", topic="t1")
        rows.update(new="n", p1="changed")
        del rows["p2"]
        assert dict(await driver.get_topic_rows(unique, "t1")) == rows
        assert (await driver.get_topic_versions([(unique, "t1")]))[unique, "t1"] == v0 + 3

        await redis_cluster.move_keys(slot, src, dst)  # everything on the target
        assert dict(await driver.get_topic_rows(unique, "t1")) == rows
    finally:
        await redis_cluster.finish_migration(slot, src, dst)
    try:
        # The driver still routes the slot to the source: MOVED, then right.
        assert driver.client.owner(slot) == src.address
        moved = driver.client.stats["moved"]
        assert dict(await driver.get_topic_rows(unique, "t1")) == rows
        assert driver.client.stats["moved"] == moved + 1
        assert driver.client.owner(slot) == dst.address
    finally:
        await replica_reader.close()


@aio
async def test_reads_from_a_replica(redis_cluster, unique):
    writer = RedisDbDriver(redis_cluster.seeds)
    reader = RedisDbDriver(redis_cluster.seeds, read_from_replicas=True)
    await writer.initialize()
    await reader.initialize()
    try:
        rows = {f"p{i}": f"v{i}" for i in range(30)}
        for k, v in rows.items():
            await writer.create_key(unique, k, v, topic="t1")
        slot = key_slot(row_key(unique, "", "t1"))
        master = await redis_cluster.owner(slot)
        [replica] = await redis_cluster.replicas_of(master)

        async def replicated():  # (the slot may hold other tests' keys too)
            count = ("CLUSTER", "COUNTKEYSINSLOT", str(slot))
            return await replica.cli(*count) == await master.cli(*count)

        async def listed():
            # CLUSTER SLOTS lists a replica once it has replicated something
            # (Redis 7.0, isReplicaAvailable): a fresh cluster's have not.
            topology = await reader.client.refresh()
            return replica.address in topology.replicas_of(master.address)

        await poll(replicated, 10, "the replica to have the rows")
        await poll(listed, 10, "the replica in CLUSTER SLOTS")

        before = await calls([master, replica])
        assert dict(await reader.get_topic_rows(unique, "t1")) == rows
        versions = await reader.get_topic_versions([(unique, "t1")])
        # The replica lists and reads; the master answers one EXISTS (is the
        # slot being migrated?).
        assert await sent([master, replica], before) == {
            (replica.address, "cluster|getkeysinslot"): 1, (replica.address, "mget"): 1,
            (replica.address, "get"): 1, (master.address, "exists"): 1}
        assert versions == await writer.get_topic_versions([(unique, "t1")])
        assert reader.client.stats["replica_reads"] == 2

        # A replica that does not answer: the master serves the read.
        topology = reader.client.topology
        reader.client.apply_topology(Topology([
            Shard(s.start, s.end, s.master, ("127.0.0.1:1",)) for s in topology.shards]))
        before = await calls([master, replica])
        assert dict(await reader.get_topic_rows(unique, "t1")) == rows
        assert await reader.get_topic_versions([(unique, "t1")]) == versions
        assert await sent([master, replica], before) == {
            (master.address, "cluster|getkeysinslot"): 1, (master.address, "mget"): 1,
            (master.address, "get"): 1}
        assert reader.client.stats["replica_fallbacks"] == 2
    finally:
        await writer.close()
        await reader.close()


@aio
async def test_writes_load_their_scripts_where_a_node_lacks_them(redis_cluster, driver, unique):
    masters = await redis_cluster.masters()
    for m in masters:
        await m.cli("SCRIPT", "FLUSH")
    before = await calls(masters)
    await driver.create_key(unique, "k", "v", topic="t1")
    await driver.create_key(unique, "k", "v2", topic="t1")
    owner = driver.client.owner(key_slot(row_key(unique, "k", "t1")))
    scripts = {k: n for k, n in (await sent(masters, before)).items() if "eval" in k[1]}
    assert scripts == {(owner, "evalsha"): 2, (owner, "eval"): 1}
    assert await driver.get_key(unique, "k", topic="t1") == "v2"


@aio
async def test_rows_stay_what_dragonflows_driver_reads_and_writes(redis_cluster, driver, unique):
    # A row as Dragonflow's driver writes it (plain SET, no version): read.
    df_row = row_key(unique, "df-port", "t1")
    await driver.client.execute("SET", df_row, '{"id": "df-port"}', slot=key_slot(df_row))
    await driver.create_key(unique, "dftx-port", '{"id": "dftx-port"}', topic="t1")
    assert sorted(await driver.get_topic_rows(unique, "t1")) == [
        ("df-port", '{"id": "df-port"}'), ("dftx-port", '{"id": "dftx-port"}')]
    # Dragonflow's scans ({table.*, {table.topic}*) match rows, never versions.
    for pattern in ("{" + unique + ".*", "{" + unique + ".t1}*"):
        assert await driver.client.scan(pattern.encode()) == {
            df_row.encode(), row_key(unique, "dftx-port", "t1").encode()}
    assert (await driver.get_topic_versions([(unique, "t1")]))[unique, "t1"] == 1
