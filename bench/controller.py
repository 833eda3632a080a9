"""
The local controller's two numbers, in one run on one Redis Cluster (3
masters with one replica each, cluster-node-timeout 2000 ms):

    .venv/bin/python bench/controller.py [--rows 10000] [--failovers 3] [--markdown FILE]

1. Loading a table of N rows into the cache: dftx's C{Mirror.resync} (one
   SCAN of the masters, per-slot MGET batches) against what Dragonflow's
   Redis driver does, with redis.asyncio's cluster client: SCAN, then one
   GET per key (50 in flight).  Each in a fresh process, best of 3.
2. A Redis master killed under a deployment (dftx.sandbox: dfpublisher and
   two dfcontrollers, ZeroMQ): the time from kill -9 to the first NB write
   that succeeds, and to every controller's cache of the table equal to the
   NB DB again (more rows are written as soon as writes succeed).  The
   cluster is repaired between rounds; the median is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import table, write_markdown

TABLE = "lport"


async def load_dftx(seed: str, rows: int) -> float:
    from dftx.cache import Mirror
    from dftx.db.redis import RedisDbDriver

    db = RedisDbDriver([seed])
    await db.initialize()
    try:
        mirror = Mirror(db, [TABLE])
        start = time.perf_counter()
        await mirror.resync()
        elapsed = time.perf_counter() - start
        assert len(mirror.cache) == rows, len(mirror.cache)
        return elapsed
    finally:
        await db.close()


async def load_redis_py(seed: str, rows: int) -> float:
    import asyncio

    from redis.asyncio.cluster import RedisCluster

    host, port = seed.rsplit(":", 1)
    client = RedisCluster(host=host, port=int(port))
    await client.initialize()
    try:
        start = time.perf_counter()
        keys = [k async for k in client.scan_iter(match=f"{{{TABLE}.*", count=1000)]
        sem = asyncio.Semaphore(50)

        async def get(key):
            async with sem:
                return key, await client.get(key)

        cache = dict(await asyncio.gather(*(get(k) for k in keys)))
        elapsed = time.perf_counter() - start
        assert len(cache) == rows, len(cache)
        return elapsed
    finally:
        await client.aclose()


def child(role: str, seed: str, rows: int) -> None:
    if role == "dftx":
        from twisted.internet import defer, task

        def main(reactor):
            return defer.ensureDeferred(load_dftx(seed, rows)).addCallback(print)
        task.react(main)
    else:
        import asyncio

        print(asyncio.run(load_redis_py(seed, rows)))


async def fill(seed: str, rows: int) -> None:
    from dftx.db.redis import RedisDbDriver
    from dftx.deferreds import gather

    db = RedisDbDriver([seed])
    await db.initialize()
    try:
        value = json.dumps({"id": "x" * 36, "name": "port", "mac": "fa:16:3e:00:00:01",
                            "ips": ["10.0.0.1"], "chassis": "compute1", "tenant": "t" * 32})
        for start in range(0, rows, 2000):
            await gather(db.create_key(TABLE, f"p{i:06d}", value)
                         for i in range(start, min(rows, start + 2000)))
    finally:
        await db.close()


async def loads(cluster, rows: int) -> dict[str, float]:
    from dftx.harness import run

    await fill(cluster.seeds[0], rows)
    best: dict[str, float] = {}
    for _ in range(3):
        for role in ("dftx", "redis.asyncio"):
            out = await run([sys.executable, __file__, "--role", role, "--seed",
                             cluster.seeds[0], "--rows", str(rows)], timeout=300)
            t = float(out.strip().splitlines()[-1])
            best[role] = min(best.get(role, t), t)
    return best


async def failover_round(base: Path, cluster) -> tuple[float, float]:
    from dftx.errors import DftxError
    from dftx.redis.slots import key_slot
    from dftx.sandbox import Deployment

    d = Deployment(base, cluster, controllers=2)
    await d.start()
    try:
        from dftx.deferreds import gather

        await gather(d.nb.create(TABLE, f"r{i}", "{}") for i in range(200))
        await d.wait_converged(TABLE, 60)
        master = await cluster.owner(key_slot("{lport.}r0"))
        await master.kill()
        start = time.monotonic()
        while True:
            try:
                await d.nb.create(TABLE, "after-kill", "{}")
                break
            except DftxError:
                pass
        first_write = time.monotonic() - start
        await gather(d.nb.create(TABLE, f"after{i}", "{}") for i in range(50))
        await d.wait_converged(TABLE, 120)
        return first_write, time.monotonic() - start
    finally:
        await d.stop()


async def compare(args: argparse.Namespace) -> None:
    from dftx.harness import RedisCluster

    cluster = RedisCluster(masters=3, replicas=1, node_timeout_ms=2000)
    await cluster.start()
    try:
        best = await loads(cluster, args.rows)
        rounds = []
        for i in range(args.failovers):
            await cluster.repair()
            await cluster.nodes[0].cli("-c", "FLUSHALL")
            for n in await cluster.masters():
                await n.cli("FLUSHALL")
            rounds.append(await failover_round(Path(tempfile.mkdtemp(prefix="dftx-bench-")),
                                               cluster))
    finally:
        await cluster.stop()
    dftx, peer = best["dftx"], best["redis.asyncio"]
    print(f"load a {args.rows}-row table into the cache (best of 3):")
    print(f"  dftx Mirror.resync (SCAN + per-slot MGET)     {dftx * 1000:8.1f} ms")
    print(f"  redis.asyncio SCAN + GET per key (Dragonflow) {peer * 1000:8.1f} ms")
    print(f"  speed-up                                      {peer / dftx:8.1f}x")
    writes = [r[0] for r in rounds]
    caches = [r[1] for r in rounds]
    print(f"kill -9 of a master, cluster-node-timeout 2000 ms, {args.failovers} rounds (median):")
    print(f"  first successful NB write after  {statistics.median(writes):6.2f} s  "
          f"{[round(w, 2) for w in writes]}")
    print(f"  every controller's cache == DB   {statistics.median(caches):6.2f} s  "
          f"{[round(c, 2) for c in caches]}")
    write_markdown(args.markdown, {
        "controller.load": table(["client", f"load {args.rows:,} rows", "ratio"], [
            ["dftx `Mirror.resync` (one SCAN of the masters, per-slot MGET batches)",
             f"{dftx * 1000:.1f} ms", f"{peer / dftx:.1f}x faster"],
            ["redis.asyncio cluster client, SCAN then one GET per key, 50 in flight "
             "(what Dragonflow's Redis driver does)", f"{peer * 1000:.1f} ms", "1.00x"]]),
        "controller.failover": table(["measured from the kill", "median", "rounds"], [
            [what, f"{statistics.median(xs):.2f} s", " / ".join(f"{x:.2f}" for x in xs) + " s"]
            for what, xs in (("first successful NB write", writes),
                             ("every controller's cache equal to the NB DB", caches))]),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--markdown", help="also write the tables to this file (bench markers)")
    parser.add_argument("--role")
    parser.add_argument("--seed")
    args = parser.parse_args()
    if args.role:
        child(args.role, args.seed, args.rows)
        return
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(compare(args)))


if __name__ == "__main__":
    main()
