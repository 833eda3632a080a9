"""
Redis pub/sub end to end, dftx against redis.asyncio, in one run:

    .venv/bin/python bench/pubsub_redis.py [--count 20000] [--window 1000] [--rounds 3]
                           [--latency-count 2000] [--cost-count 200000] [--cost-replicas 1]
                           [--markdown FILE]

1. On one Redis Cluster of 3 masters (no replicas): one publisher process
   sends N DbUpdates of ~500 bytes (encoded) on one channel to one
   subscriber process, for dftx classic (RedisPubSub) and sharded
   (RedisPubSub(sharded=True)), and for redis.asyncio classic (PUBLISH /
   SUBSCRIBE) and sharded (SPUBLISH / SSUBSCRIBE to the channel's owner).
   The publishers send batches of W messages and wait for the last reply
   of each (dftx pipelines W send_event calls on its connection;
   redis.asyncio sends a pipeline of W).  Classic: both systems publish on
   the same node and subscribe on another (the cluster bus carries every
   message across, as for most publisher/subscriber pairs); sharded: both
   use the channel's owner.  The redis.asyncio side encodes and decodes
   the same msgpack map.  Each message carries its send time; the
   subscriber reports delivered messages/s (first to last receipt) and
   the p50/p99 of publish-to-callback latency.  Each system runs R rounds,
   alternating with the other; its best round is kept.  Then the latency
   alone: L messages sent one at a time (window 1).
2. The cost of one PUBLISH as the cluster grows: the dftx publisher alone
   sends C messages to a cluster of 3 and then 6 masters (each with
   C{--cost-replicas} replicas), classic and sharded; the script reports
   the redis-server CPU time the cluster spent per message (sum over every
   node, from /proc: a classic message is carried to every node of the
   cluster, a sharded one only to its shard) and the rate the publisher
   got its replies at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import table, write_markdown

CHANNEL = "bench"
PAD = "x" * 380


def value(i: int) -> str:
    return json.dumps({"id": f"port-{i}", "t": time.time(), "pad": PAD})


# --- child roles ------------------------------------------------------------------


def hashed_to(node: str, seeds: list[str], prefix: str) -> str:
    """An id that a classic dftx publisher or subscriber hashes to C{node}
    (the cluster has no replicas: every seed is a master)."""
    from dftx.pubsub.redis_link import ring

    return next(f"{prefix}-{i}" for i in range(10_000) if ring(seeds, f"{prefix}-{i}")[0] == node)


def dftx_publisher(seeds: list[str], sharded: bool, count: int, window: int) -> None:
    from twisted.internet import defer, task

    from dftx.pubsub.redis import RedisPubSub
    from dftx.update import DbUpdate

    failures: list = []

    async def main(reactor):
        pub = RedisPubSub(seeds, sharded=sharded).get_publisher(
            hashed_to(pub_node(seeds), seeds, "bench-pub"))
        await pub.initialize()
        began = time.perf_counter()
        for start in range(0, count, window):
            sends = [pub.send_event(DbUpdate("lport", f"port-{i}", "create", value(i), CHANNEL))
                     for i in range(start, min(count, start + window))]
            # They fire in order (one connection): wait for the last, as a
            # pipeline's execute() does.
            for d in sends[:-1]:
                d.addErrback(failures.append)
            await sends[-1]
        elapsed = time.perf_counter() - began
        await pub.close()
        if failures:
            raise RuntimeError(f"{len(failures)} sends failed: {failures[0]}")
        print(json.dumps({"elapsed": elapsed}), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def dftx_subscriber(seeds: list[str], sharded: bool, count: int) -> None:
    from twisted.internet import defer, reactor, task

    from dftx.pubsub.redis import RedisPubSub

    latencies: list[float] = []
    stamps: list[float] = []

    def on_update(update):
        if update.is_control:
            return
        now = time.time()
        latencies.append(now - json.loads(update.value)["t"])
        if not stamps:
            stamps.append(time.perf_counter())
        if len(latencies) == count:
            stamps.append(time.perf_counter())
            report(latencies, stamps[1] - stamps[0])
            reactor.stop()

    async def main(reactor):
        sub = RedisPubSub(seeds, sharded=sharded).get_subscriber(
            hashed_to(sub_node(seeds), seeds, "bench-sub"))
        await sub.register_topic(CHANNEL)
        await sub.initialize(on_update)
        print("ready", flush=True)
        await defer.Deferred()

    task.react(lambda r: defer.ensureDeferred(main(r)))


def pub_node(seeds: list[str]) -> str:
    """Classic: every publisher sends to this node..."""
    return sorted(seeds)[0]


def sub_node(seeds: list[str]) -> str:
    """...and every subscriber listens on this one (the cluster bus
    carries each message across, as it does for most pairs)."""
    return sorted(seeds)[1]


async def _peer_node(seeds: list[str], sharded: bool, node: str):
    import redis.asyncio as redis
    from redis.asyncio.cluster import RedisCluster

    host, port = node.rsplit(":", 1)
    if not sharded:
        return redis.Redis(host=host, port=int(port))
    cluster = RedisCluster(host=host, port=int(port))
    await cluster.initialize()
    node = cluster.get_node_from_key(CHANNEL)
    await cluster.aclose()
    return redis.Redis(host=node.host, port=node.port)


def peer_publisher(seeds: list[str], sharded: bool, count: int, window: int) -> None:
    import asyncio

    import msgpack

    async def main():
        r = await _peer_node(seeds, sharded, pub_node(seeds))
        for start in range(0, count, window):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(count, start + window)):
                data = msgpack.packb({"table": "lport", "key": f"port-{i}", "action": "create",
                                      "value": value(i), "topic": CHANNEL})
                if sharded:
                    pipe.execute_command("SPUBLISH", CHANNEL, data)
                else:
                    pipe.publish(CHANNEL, data)
            await pipe.execute()
        await r.aclose()

    asyncio.run(main())


def peer_subscriber(seeds: list[str], sharded: bool, count: int) -> None:
    import asyncio

    import msgpack

    async def main():
        r = await _peer_node(seeds, sharded, sub_node(seeds))
        ps = r.pubsub()
        if sharded:
            await ps.ssubscribe(CHANNEL)
        else:
            await ps.subscribe(CHANNEL)
        latencies: list[float] = []
        first = 0.0
        print("ready", flush=True)
        while len(latencies) < count:
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg["type"] not in ("message", "smessage"):
                continue
            update = msgpack.unpackb(msg["data"])
            latencies.append(time.time() - json.loads(update["value"])["t"])
            if len(latencies) == 1:
                first = time.perf_counter()
        report(latencies, time.perf_counter() - first)
        await r.aclose()

    asyncio.run(main())


def report(latencies: list[float], elapsed: float) -> None:
    ordered = sorted(latencies)
    print(json.dumps({
        "rate": (len(latencies) - 1) / elapsed if elapsed > 0 else 0.0,
        "p50": ordered[len(ordered) // 2] * 1000,
        "p99": ordered[int(len(ordered) * 0.99)] * 1000,
    }), flush=True)


# --- the parent -----------------------------------------------------------------------


class _Child:
    """A child process of this script; C{ready} fires on its "ready"
    line, C{ended} with its output at exit."""

    def __init__(self, *args: str) -> None:
        from twisted.internet import defer, protocol, reactor

        outer = self
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[str] = defer.Deferred()
        self.out = b""

        class P(protocol.ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                outer.out += data
                if b"ready\n" in outer.out and not outer.ready.called:
                    outer.ready.callback(None)

            errReceived = outReceived

            def processEnded(self, reason) -> None:
                code = reason.value.exitCode
                if code:
                    outer.ended.errback(RuntimeError(f"{args}: exit {code}\n"
                                                     f"{outer.out.decode()[-2000:]}"))
                else:
                    outer.ended.callback(outer.out.decode())

        argv = [sys.executable, __file__, *args]
        reactor.spawnProcess(P(), argv[0], argv, env=os.environ)


async def end_to_end(seeds: list[str], system: str, sharded: bool, count: int,
                     window: int) -> dict[str, float]:
    common = ["--seeds", ",".join(seeds), "--count", str(count), "--window", str(window)]
    if sharded:
        common.append("--sharded")
    sub = _Child("--role", f"{system}-sub", *common)
    await sub.ready
    pub = _Child("--role", f"{system}-pub", *common)
    await pub.ended
    out = await sub.ended
    return json.loads(out.strip().splitlines()[-1])


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


async def publish_cost(masters: int, replicas: int, count: int,
                       window: int) -> dict[str, tuple[float, float]]:
    """(redis-server CPU microseconds per message, messages/s acknowledged)
    of the dftx publisher alone, classic and sharded."""
    from dftx.harness import RedisCluster

    cluster = RedisCluster(masters=masters, replicas=replicas)
    await cluster.start()
    try:
        pids = [n.process.pid for n in cluster.nodes]
        masters_now = [m.address for m in await cluster.masters()]
        cost = {}
        for sharded in (False, True):
            before = _cpu_seconds(pids)
            args = ["--seeds", ",".join(masters_now), "--count", str(count), "--window",
                    str(window), "--role", "dftx-pub"] + (["--sharded"] if sharded else [])
            out = await _Child(*args).ended
            elapsed = json.loads(out.strip().splitlines()[-1])["elapsed"]
            cost["sharded" if sharded else "classic"] = (
                (_cpu_seconds(pids) - before) / count * 1e6, count / elapsed)
        return cost
    finally:
        await cluster.stop()


async def compare(args: argparse.Namespace) -> None:
    from dftx.harness import RedisCluster

    cluster = RedisCluster(masters=3, replicas=0)
    await cluster.start()
    results: dict = {}
    try:
        for _ in range(args.rounds):
            for sharded in (False, True):
                for system in ("dftx", "peer"):
                    r = await end_to_end(cluster.seeds, system, sharded, args.count,
                                         args.window)
                    best = results.get((system, sharded))
                    if best is None or r["rate"] > best["rate"]:
                        results[system, sharded] = r
        latency = {}
        for sharded in (False, True):
            for system in ("dftx", "peer"):
                latency[system, sharded] = await end_to_end(
                    cluster.seeds, system, sharded, args.latency_count, 1)
    finally:
        await cluster.stop()
    costs = {m: await publish_cost(m, args.cost_replicas, args.cost_count, args.window)
             for m in (3, 6)}

    print(f"end to end, {args.count} messages of ~500 bytes, one publisher and one "
          f"subscriber process, 3 masters, best of {args.rounds} rounds:")
    print(f"  {'client':32} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'vs peer':>8}")
    for sharded in (False, True):
        mode = "sharded" if sharded else "classic"
        for system, name in (("dftx", f"dftx RedisPubSub {mode}"),
                             ("peer", f"redis.asyncio {mode}")):
            r = results[system, sharded]
            ratio = r["rate"] / results["peer", sharded]["rate"]
            print(f"  {name:32} {r['rate']:12,.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
                  f"{ratio:7.2f}x")
    print(f"publish-to-callback latency, one message at a time ({args.latency_count} "
          f"messages, each sent once the previous one was acknowledged):")
    print(f"  {'client':32} {'p50 ms':>8} {'p99 ms':>8}")
    for sharded in (False, True):
        mode = "sharded" if sharded else "classic"
        for system, name in (("dftx", f"dftx RedisPubSub {mode}"),
                             ("peer", f"redis.asyncio {mode}")):
            r = latency[system, sharded]
            print(f"  {name:32} {r['p50']:8.3f} {r['p99']:8.3f}")
    print(f"one PUBLISH as the cluster grows (dftx publisher alone, {args.cost_count} "
          f"messages, {args.cost_replicas} replica(s) per master): redis-server CPU per "
          f"message summed over every node, and messages/s acknowledged:")
    for mode in ("classic", "sharded"):
        (c3, r3), (c6, r6) = costs[3][mode], costs[6][mode]
        print(f"  {mode:8}  3 masters {c3:6.1f} us {r3:9,.0f}/s   6 masters {c6:6.1f} us "
              f"{r6:9,.0f}/s   CPU growth {c6 / c3:4.2f}x")
    write_markdown(args.markdown, markdown(results, latency, costs))


def markdown(results: dict, latency: dict, costs: dict) -> dict[str, str]:
    """The three tables of doc/performance.md's Redis pub/sub section."""
    names = {"dftx": "dftx `RedisPubSub`", "peer": "redis.asyncio"}
    modes = {False: "classic", True: "sharded"}
    end_to_end, one = [], []
    for sharded, mode in modes.items():
        for system in ("dftx", "peer"):
            r = results[system, sharded]
            ratio = r["rate"] / results["peer", sharded]["rate"]
            end_to_end.append([f"{names[system]} {mode}", f"{r['rate']:,.0f}",
                               f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{ratio:.2f}x"])
            r = latency[system, sharded]
            one.append([f"{system.replace('peer', 'redis.asyncio')} {mode}",
                        f"{r['p50']:.3f}", f"{r['p99']:.3f}"])
    cost = []
    for mode, command in (("classic", "PUBLISH"), ("sharded", "SPUBLISH")):
        (c3, r3), (c6, r6) = costs[3][mode], costs[6][mode]
        cost.append([f"{mode} (`{command}`)", f"{c3:.1f} µs", f"{c6:.1f} µs",
                     f"{c6 / c3:.2f}x", f"{r3:,.0f}", f"{r6:,.0f}"])
    return {
        "pubsub_redis.end_to_end": table(["end to end (3 masters)", "delivered msgs/s", "p50 ms",
                                          "p99 ms", "vs redis.asyncio"], end_to_end),
        "pubsub_redis.latency": table(["one message at a time", "p50 ms", "p99 ms"], one),
        "pubsub_redis.cost": table(["mode", "redis CPU per message, 3 masters", "6 masters",
                                    "growth", "publisher msgs/s, 3 masters", "6 masters"], cost),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--cost-replicas", type=int, default=1)
    parser.add_argument("--cost-count", type=int, default=200_000,
                        help="messages for the CPU cost (CPU time is counted in 10 ms ticks)")
    parser.add_argument("--markdown", help="also write the tables to this file (bench markers)")
    parser.add_argument("--role")
    parser.add_argument("--seeds")
    parser.add_argument("--sharded", action="store_true")
    args = parser.parse_args()
    roles = {"dftx-pub": dftx_publisher, "peer-pub": peer_publisher}
    subs = {"dftx-sub": dftx_subscriber, "peer-sub": peer_subscriber}
    seeds = (args.seeds or "").split(",")
    if args.role in roles:
        roles[args.role](seeds, args.sharded, args.count, args.window)
    elif args.role in subs:
        subs[args.role](seeds, args.sharded, args.count)
    else:
        from twisted.internet import defer, task

        task.react(lambda reactor: defer.ensureDeferred(compare(args)))


if __name__ == "__main__":
    main()
