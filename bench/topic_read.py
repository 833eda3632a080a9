"""
What one topic's rows cost to read, and what a row write costs, on a
3-master Redis Cluster (dftx.harness.RedisCluster, no replicas by default):

    .venv/bin/python bench/topic_read.py [--rows 200] [--others 400000] [--reads 30]
        [--writes 20000] [--inflight 50] [--markdown FILE]

1. Writes: C{RedisDbDriver.create_key} of --writes rows (100 topics of one
   table), --inflight at a time, best of 3 rounds: rows/s, and the Redis CPU
   per write (the write commands' C{usec} in INFO commandstats, summed over
   the masters, divided by the writes).
2. Reads: C{get_all_entries("lport", topic="t1")} returning --rows rows, the
   median of --reads reads, first with nothing else in the cluster, then
   after loading --others other lport rows (1,000 tenant topics, one MSET
   per topic) next to them; the ratio of the two medians.  The number of
   commands each read sends (INFO commandstats, every master) is printed
   too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

from twisted.internet import defer, task

from _common import table as markdown_table, write_markdown

TABLE = "lport"
TOPIC = "t1"
# A script's own commands are counted under their names too: count the
# scripts, or the plain commands where there is none.
SCRIPTS, PLAIN = ("evalsha", "eval"), ("set", "incr", "del")


def value(i: int, size: int) -> str:
    return json.dumps({"id": f"port-{i}", "pad": "x" * size})


async def commandstats(driver, nodes) -> Counter:
    """calls and usec per command, summed over C{nodes}."""
    out: Counter = Counter()
    for node in nodes:
        text = (await driver.client.execute_on(node, "INFO", "commandstats")).decode()
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_"):].partition(":")
                stats = dict(f.split("=") for f in fields.split(","))
                out[name + ".calls"] += int(stats["calls"])
                out[name + ".usec"] += int(stats["usec"])
    return out


async def write_rate(driver, nodes, count: int, inflight: int) -> tuple[float, float]:
    """rows/s and Redis microseconds per write of C{count} create_key calls."""
    keys = iter(range(count))

    async def loop():
        for i in keys:
            await driver.create_key("bench", f"k{i}", value(i, 100), topic=f"w{i % 100}")

    before = await commandstats(driver, nodes)
    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(loop()) for _ in range(inflight)])
    rate = count / (time.perf_counter() - started)
    after = await commandstats(driver, nodes)
    ran = SCRIPTS if after["evalsha.calls"] > before["evalsha.calls"] else PLAIN
    usec = sum(after[c + ".usec"] - before[c + ".usec"] for c in ran)
    return rate, usec / count


async def read_time(driver, nodes, reads: int, rows: int) -> tuple[float, Counter]:
    """Median seconds of a read of the topic, and the commands one read sent."""
    times = []
    before = await commandstats(driver, nodes)
    for _ in range(reads):
        started = time.perf_counter()
        got = await driver.get_all_entries(TABLE, topic=TOPIC)
        times.append(time.perf_counter() - started)
        assert len(got) == rows, len(got)
    after = await commandstats(driver, nodes)
    sent = Counter({c[:-len(".calls")]: (after[c] - before[c]) / reads
                    for c in after if c.endswith(".calls") and after[c] != before[c]})
    sent.pop("info", None)
    return statistics.median(times), sent


async def load_others(driver, count: int, topics: int = 1000) -> None:
    """C{count} lport rows over C{topics} tenant topics, one MSET per topic."""
    from dftx.db.redis import row_key
    from dftx.redis.slots import key_slot

    per_topic = count // topics
    sem = defer.DeferredSemaphore(20)

    def mset(t: int):
        args = []
        for i in range(per_topic):
            args += [row_key(TABLE, f"p{t}-{i}", f"tenant-{t}"), value(i, 100)]
        return driver.client.execute("MSET", *args, slot=key_slot(args[0]))

    await defer.gatherResults([sem.run(mset, t) for t in range(topics)])


async def run(reactor, args) -> None:
    from dftx.db.redis import RedisDbDriver
    from dftx.harness import RedisCluster

    cluster = RedisCluster(masters=3, replicas=args.replicas)
    try:
        await cluster.start()
        nodes = [m.address for m in await cluster.masters()]
        driver = RedisDbDriver(cluster.seeds)
        await driver.initialize()
        try:
            rates = []
            for _ in range(3):
                rates.append(await write_rate(driver, nodes, args.writes, args.inflight))
                for n in nodes:
                    await driver.client.execute_on(n, "FLUSHALL")
            rate, usec = max(rates)
            for i in range(args.rows):
                await driver.create_key(TABLE, f"p{i}", value(i, 300), topic=TOPIC)
            empty, sent_empty = await read_time(driver, nodes, args.reads, args.rows)
            await load_others(driver, args.others)
            full, sent_full = await read_time(driver, nodes, args.reads, args.rows)
        finally:
            await driver.close()
    finally:
        await cluster.stop()
    ratio = full / empty
    print(f"writes: {rate:,.0f} create_key/s ({args.inflight} in flight), "
          f"{usec:.1f} us of Redis CPU per write")
    print(f"read of {args.rows} rows of one topic: {empty * 1000:.2f} ms alone, "
          f"{full * 1000:.2f} ms with {args.others:,} other rows: {ratio:.2f}x")
    print(f"commands per read alone: {dict(sent_empty)}; with the others: {dict(sent_full)}")
    write_markdown(args.markdown, {"topic_read": markdown_table(
        ["measure", "value"],
        [[f"`create_key`, {args.inflight} in flight", f"{rate:,.0f}/s"],
         ["Redis CPU per write", f"{usec:.1f} µs"],
         [f"read of {args.rows} rows of one topic, empty cluster", f"{empty * 1000:.2f} ms"],
         [f"the same with {args.others:,} other rows", f"{full * 1000:.2f} ms"],
         ["ratio", f"{ratio:.2f}x"]])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--others", type=int, default=400_000)
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=0,
                        help="replicas per master (default 0: 2-core machines)")
    parser.add_argument("--markdown", help="also write the table to this file (bench markers)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
