"""
Key/value throughput on a Redis Cluster: dftx's cluster client against
redis-py's redis.asyncio.cluster.RedisCluster and coredis's RedisCluster.

    .venv/bin/python bench/redis_kv.py [--keys 50000] [--inflight 50] [--rounds 3] [--markdown FILE]

The script starts one 3-master Redis Cluster (dftx.harness.RedisCluster) and
then runs each client in a fresh interpreter of its own (this same script
with --client NAME), one after the other, against that cluster: SET of
--keys distinct keys, then GET of each (checking the value), with --inflight
requests outstanding at any time (that many concurrent loops, each awaiting
its own request).  Between runs the cluster is flushed.  Each client is run
--rounds times, in turn, and its best round is kept; the table gives ops/s
and the ratio to redis.asyncio.

Fairness: every client runs alone, in its own process, on the default event
loop of its framework (Twisted's epoll reactor; asyncio's default loop), with
hiredis available to all three.  The peers may open as many connections as
they want (redis.asyncio opens one per request in flight; coredis is given
--inflight connections); dftx uses one connection per master and pipelines.

A second table compares the RESP layer alone on one non-cluster server:
dftx's protocol (hiredis.Reader) against txredisapi's (with its number and
charset conversion off), both pipelining over one connection: this is the
measurement behind using our own protocol (doc/design.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from twisted.internet import defer, task

from _common import table as markdown_table, write_markdown

HERE = os.path.abspath(__file__)


# --- one client's run (in its own process) --------------------------------------


def keys_for(n: int) -> list[str]:
    return [f"bench:{i}" for i in range(n)]


async def measure(call, keys, inflight, check) -> dict[str, float]:
    """SET then GET every key with C{inflight} loops; ops/s of each phase."""
    out = {}
    for phase in ("SET", "GET"):
        it = iter(keys)

        async def loop():
            for key in it:
                reply = await call(phase, key)
                if phase == "GET":
                    check(key, reply)

        started = time.perf_counter()
        await gather_for(phase, [loop() for _ in range(inflight)])
        out[phase] = len(keys) / (time.perf_counter() - started)
    return out


gather_for = None  # set per framework: Twisted or asyncio


def check_value(key, reply):
    if reply not in (key.encode(), key):
        raise AssertionError(f"GET {key} gave {reply!r}")


async def run_dftx(seed, keys, inflight):
    from dftx.redis import ClusterClient, key_slot

    client = ClusterClient([seed])
    await client.start()
    try:
        async def call(op, key):
            if op == "SET":
                return await client.execute("SET", key, key, slot=key_slot(key))
            return await client.execute("GET", key, slot=key_slot(key))

        return await measure(call, keys, inflight, check_value)
    finally:
        await client.close()


async def run_redis_py(seed, keys, inflight):
    from redis.asyncio.cluster import RedisCluster

    host, port = seed.rsplit(":", 1)
    client = RedisCluster(host=host, port=int(port))
    await client.initialize()
    try:
        async def call(op, key):
            return await (client.set(key, key) if op == "SET" else client.get(key))

        return await measure(call, keys, inflight, check_value)
    finally:
        await client.aclose()


async def run_coredis(seed, keys, inflight):
    import coredis

    host, port = seed.rsplit(":", 1)
    client = coredis.RedisCluster(host, int(port), max_connections=inflight)
    async with client:
        async def call(op, key):
            return await (client.set(key, key) if op == "SET" else client.get(key))

        return await measure(call, keys, inflight, check_value)


async def run_dftx_protocol(seed, keys, inflight):
    from twisted.internet import reactor

    from dftx.redis.connection import NodeConnection
    from dftx.redis.endpoints import NodeEndpoints

    conn = NodeConnection(seed, NodeEndpoints([seed], reactor).endpoint(seed), reactor)
    conn.start()
    try:
        return await measure(lambda op, key: (
            conn.execute("SET", key, key) if op == "SET" else conn.execute("GET", key)
        ), keys, inflight, check_value)
    finally:
        await conn.close()


async def run_txredisapi_protocol(seed, keys, inflight):
    import txredisapi

    host, port = seed.rsplit(":", 1)
    conn = await txredisapi.Connection(
        host, int(port), reconnect=False, convertNumbers=False, charset=None
    )
    try:
        return await measure(lambda op, key: (
            conn.set(key, key) if op == "SET" else conn.get(key)
        ), keys, inflight, check_value)
    finally:
        await conn.disconnect()


TWISTED_CLIENTS = {
    "dftx": run_dftx,
    "dftx-protocol": run_dftx_protocol,
    "txredisapi-protocol": run_txredisapi_protocol,
}
ASYNCIO_CLIENTS = {"redis.asyncio": run_redis_py, "coredis": run_coredis}


def client_main(args) -> None:
    global gather_for
    keys = keys_for(args.keys)
    if args.client in TWISTED_CLIENTS:
        async def twisted_gather(phase, coros):
            await defer.gatherResults([defer.ensureDeferred(c) for c in coros])

        gather_for = twisted_gather

        async def main(reactor):
            result = await TWISTED_CLIENTS[args.client](args.seed, keys, args.inflight)
            print(json.dumps(result))

        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))  # exits
    else:
        async def asyncio_gather(phase, coros):
            await asyncio.gather(*coros)

        gather_for = asyncio_gather
        result = asyncio.run(ASYNCIO_CLIENTS[args.client](args.seed, keys, args.inflight))
        print(json.dumps(result))


# --- the orchestrator -------------------------------------------------------------


async def run_client(name, seed, args) -> dict[str, float]:
    from dftx.harness import run

    out = await run(
        [sys.executable, HERE, "--client", name, "--seed", seed,
         "--keys", str(args.keys), "--inflight", str(args.inflight)],
        timeout=600,
    )
    return json.loads(out.strip().splitlines()[-1])


async def best_of(names, seed, servers, args) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name in names:
            for server in servers:
                await server.cli("FLUSHALL")
            got = await run_client(name, seed, args)
            prev = best.setdefault(name, got)
            for phase in got:
                prev[phase] = max(prev[phase], got[phase])
    return best


def table(title, results, reference) -> str:
    lines = [title, f"{'client':<22}{'SET ops/s':>12}{'GET ops/s':>12}{'SET ratio':>11}{'GET ratio':>11}"]
    ref = results[reference]
    for name, r in results.items():
        lines.append(
            f"{name:<22}{r['SET']:>12,.0f}{r['GET']:>12,.0f}"
            f"{r['SET'] / ref['SET']:>10.2f}x{r['GET'] / ref['GET']:>10.2f}x"
        )
    return "\n".join(lines)


LABELS = {
    "dftx": "dftx `ClusterClient`",
    "redis.asyncio": "redis.asyncio.cluster.RedisCluster",
    "coredis": "coredis.RedisCluster",
    "dftx-protocol": "`dftx.redis` (`NodeConnection`, hiredis.Reader)",
    "txredisapi-protocol": "txredisapi `HiredisProtocol` (`convertNumbers=False, charset=None`)",
}


def markdown(first, results, reference, ratio) -> str:
    ref = results[reference]
    return markdown_table([first, "SET ops/s", "GET ops/s", ratio], [
        [LABELS[name], f"{r['SET']:,.0f}", f"{r['GET']:,.0f}",
         "1.00x" if name == reference
         else f"{r['SET'] / ref['SET']:.2f}x / {r['GET'] / ref['GET']:.2f}x"]
        for name, r in results.items()])


async def orchestrate(args) -> None:
    from dftx.harness import RedisCluster, RedisServer

    cluster = RedisCluster(masters=3, replicas=args.replicas)
    single = RedisServer(cluster.dir / "single")
    try:
        await cluster.start()
        await single.start()
        masters = await cluster.masters()
        print(f"{args.keys} keys, {args.inflight} in flight, best of {args.rounds} rounds; "
              f"cluster of {len(masters)} masters + {args.replicas * len(masters)} replicas "
              f"(redis-server 7), Python {sys.version.split()[0]}")
        results = await best_of(
            ["dftx", "redis.asyncio", "coredis"], cluster.seeds[0], cluster.nodes, args
        )
        print(table("\nRedis Cluster, SET then GET:", results, "redis.asyncio"))
        blocks = {"redis_kv.cluster": markdown(
            f"client (Redis Cluster, {len(masters)} masters)", results, "redis.asyncio",
            "vs redis.asyncio")}
        if not args.no_protocol:
            proto = await best_of(
                ["dftx-protocol", "txredisapi-protocol"], single.address, [single], args
            )
            print(table("\nOne server, one pipelined connection (RESP layer only):",
                        proto, "txredisapi-protocol"))
            blocks["redis_kv.protocol"] = markdown(
                "protocol (one connection)", proto, "txredisapi-protocol", "ratio")
        write_markdown(args.markdown, blocks)
    finally:
        await single.kill()
        await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=0,
                        help="replicas per master (default 0: 2-core machines)")
    parser.add_argument("--no-protocol", action="store_true",
                        help="skip the RESP layer comparison")
    parser.add_argument("--markdown", help="also write the tables to this file (bench markers)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--seed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
    else:
        task.react(lambda reactor: defer.ensureDeferred(orchestrate(args)))


if __name__ == "__main__":
    main()
