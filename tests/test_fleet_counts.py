"""
A fleet of controllers' caches against one real 3+3 Redis Cluster that
holds 100,000 unrelated keys: what their resyncs cost, counted with INFO
over every node (commands, and keys looked up: keyspace hits + misses),
never timed.

Each of the 20 controller-equivalents is a real L{dftx.cache.Mirror} on a
real L{dftx.db.redis.RedisDbDriver}, keeping two tables for "D" and 3 tenant
topics of its own.  A resync must send no SCAN and touch only its own
slots: one CLUSTER GETKEYSINSLOT and one MGET per (table, topic) pair it
keeps, one version GET per pair, and look up exactly its own rows plus one
probe and one version key per pair.  A periodic resync that finds nothing
changed sends only the version GETs.
"""

from __future__ import annotations

from collections import Counter

import pytest_twisted
from twisted.internet import defer, reactor

from dftx.cache import Mirror
from dftx.db.redis import RedisDbDriver
from dftx.deferreds import gather
from dftx.redis.slots import key_slot

aio = pytest_twisted.ensureDeferred

CONTROLLERS = 20
TOPICS_EACH = 3
ROWS_EACH = 5  # per (table, tenant topic)
SHARED_ROWS = 10  # per table, without topic
UNRELATED = 100_000
COUNTED = ("scan", "cluster|getkeysinslot", "mget", "get")


async def counts(nodes) -> Counter:
    """The COUNTED commands' calls and the keys looked up, summed over
    C{nodes}."""
    total: Counter = Counter()
    for n in nodes:
        info = await n.info("all")
        for command in COUNTED:
            stats = info.get(f"cmdstat_{command}")
            if stats:
                total[command] += int(dict(f.split("=") for f in stats.split(","))["calls"])
        total["keys"] += int(info["keyspace_hits"]) + int(info["keyspace_misses"])
    return total


async def cost(nodes, action) -> dict[str, int]:
    """What C{action()} cost the cluster (every counter, zeros included)."""
    before = await counts(nodes)
    await action()
    after = await counts(nodes)
    return {k: after[k] - before[k] for k in (*COUNTED, "keys")}


async def load_unrelated(client, count: int) -> list[tuple[int, list[str]]]:
    """C{count} keys that are no row (1,000 hash tags), one MSET per tag.
    @return: the (slot, keys) batches, for the cleanup."""
    batches = []
    for g in range(1000):
        keys = [f"{{junk{g}}}{i}" for i in range(count // 1000)]
        batches.append((key_slot(keys[0]), keys))
    sem = defer.DeferredSemaphore(20)
    await defer.gatherResults([
        sem.run(client.execute, "MSET", *[x for k in keys for x in (k, "x" * 40)], slot=slot)
        for slot, keys in batches])
    return batches


@pytest_twisted.async_yield_fixture
async def fleet(redis_cluster, unique):
    tables = [f"{unique}-lport", f"{unique}-lswitch"]
    dbs = [RedisDbDriver(redis_cluster.seeds) for _ in range(CONTROLLERS)]
    await gather(db.initialize() for db in dbs)
    batches = await load_unrelated(dbs[0].client, UNRELATED)
    mirrors = []
    try:
        for c, db in enumerate(dbs):
            topics = [f"tenant{c}-{t}" for t in range(TOPICS_EACH)]
            mirrors.append(Mirror(db, tables, topics, clock=reactor))
            await gather(db.create_key(table, f"p{i}", f"row {i} of {topic}", topic=topic)
                         for table in tables for topic in topics for i in range(ROWS_EACH))
        await gather(dbs[0].create_key(table, f"s{i}", "shared") for table in tables
                     for i in range(SHARED_ROWS))
        yield tables, mirrors
    finally:
        await gather(m.close() for m in mirrors)
        await gather(dbs[0].client.execute("DEL", *keys, slot=slot) for slot, keys in batches)
        await gather(db.close() for db in dbs)


@aio
async def test_a_fleets_resyncs_cost_what_each_controller_keeps(redis_cluster, fleet):
    tables, mirrors = fleet
    nodes = redis_cluster.nodes
    pairs = len(tables) * (1 + TOPICS_EACH)  # "D" and its own topics, per table
    own_rows = len(tables) * (SHARED_ROWS + TOPICS_EACH * ROWS_EACH)

    # One controller's first load: no SCAN, its own slots only.
    spent = await cost(nodes, mirrors[0].resync)
    assert spent == {"scan": 0, "cluster|getkeysinslot": pairs, "mget": pairs, "get": pairs,
                     "keys": own_rows + 2 * pairs}
    assert len(mirrors[0].cache) == own_rows

    # The whole fleet at once (a dbrestart): the sum of what each keeps.
    spent = await cost(nodes, lambda: gather(m.resync() for m in mirrors))
    assert spent == {"scan": 0, "cluster|getkeysinslot": CONTROLLERS * pairs,
                     "mget": CONTROLLERS * pairs, "get": CONTROLLERS * pairs,
                     "keys": CONTROLLERS * (own_rows + 2 * pairs)}

    # The periodic resync, nothing changed: one version GET per pair, no row.
    spent = await cost(nodes, lambda: gather(m.resync_changed() for m in mirrors))
    assert spent == {"scan": 0, "cluster|getkeysinslot": 0, "mget": 0,
                     "get": CONTROLLERS * pairs, "keys": CONTROLLERS * pairs}
    assert all(m.counters["pairs_skipped"] == pairs for m in mirrors)

    # A row of one tenant written (its update lost): only the controller
    # that keeps that topic reads it, and only that pair (its 6 rows and
    # the probe, after the version checks).
    await mirrors[7].db.create_key(tables[0], "new", "v", topic="tenant7-1")
    spent = await cost(nodes, lambda: gather(m.resync_changed() for m in mirrors))
    assert spent == {"scan": 0, "cluster|getkeysinslot": 1, "mget": 1,
                     "get": CONTROLLERS * pairs, "keys": CONTROLLERS * pairs + ROWS_EACH + 2}
    assert mirrors[7].cache.get(tables[0], "new", "tenant7-1") == "v"

    # Discovery's periodic read of table `publisher` (dftx.registry) is
    # counted here too once it reads only the other role's rows: its place.
