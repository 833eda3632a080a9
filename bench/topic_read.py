"""
What one topic's rows cost to read, and what a row write costs, on 3-master
Redis Clusters (dftx.harness.RedisCluster, no replicas by default):

    .venv/bin/python bench/topic_read.py [--rows 200] [--others 400000] [--reads 300]
        [--writes 20000] [--inflight 50] [--markdown FILE]

1. Reads: C{RedisDbDriver.get_all_entries("lport", topic="t1")} returning
   --rows rows from two clusters started side by side, one holding nothing
   else, the other also --others lport rows of 1,000 other tenant topics
   (one MSET per topic).  The reads alternate between the two, --reads
   each, so that whatever else the machine does weighs on both alike; the
   medians, their ratio, and the commands one read sends (INFO
   commandstats, every master).
2. Writes, on the first cluster: C{create_key} (dftx's write script: the
   row and its topic's version) and, for comparison, the plain C{SET ...
   GET} it replaced, --writes rows each (100 topics), --inflight at a time,
   the two alternating for 3 rounds, best round kept: rows/s, and the Redis
   time per write (the outer commands' C{usec} in INFO commandstats, summed
   over the masters, divided by the writes; on a busy machine it includes
   time the servers waited for a CPU).
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


async def write_rate(driver, nodes, count: int, inflight: int, script: bool,
                     ) -> tuple[float, float]:
    """rows/s and Redis microseconds per write of C{count} writes: with
    create_key, or the plain SET ... GET of the same rows."""
    from dftx.db.redis import row_key
    from dftx.redis.slots import key_slot

    keys = iter(range(count))

    async def loop():
        for i in keys:
            topic = f"w{i % 100}"
            if script:
                await driver.create_key("bench", f"k{i}", value(i, 100), topic=topic)
            else:
                rkey = row_key("bench", f"k{i}", topic)
                await driver.client.execute("SET", rkey, value(i, 100), "GET",
                                            slot=key_slot(rkey))

    before = await commandstats(driver, nodes)
    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(loop()) for _ in range(inflight)])
    rate = count / (time.perf_counter() - started)
    after = await commandstats(driver, nodes)
    # A script's own commands are counted under their names too.
    outer = ("evalsha", "eval") if script else ("set",)
    usec = sum(after[c + ".usec"] - before[c + ".usec"] for c in outer)
    return rate, usec / count


async def reads(setups, count: int, rows: int) -> list[tuple[float, Counter]]:
    """Median seconds of a read of the topic in each (driver, nodes) of
    C{setups}, the reads alternating; and the commands one read sent."""
    times: list[list[float]] = [[] for _ in setups]
    before = [await commandstats(d, nodes) for d, nodes in setups]
    for _ in range(count):
        for i, (driver, _) in enumerate(setups):
            started = time.perf_counter()
            got = await driver.get_all_entries(TABLE, topic=TOPIC)
            times[i].append(time.perf_counter() - started)
            assert len(got) == rows, len(got)
    out = []
    for (driver, nodes), spent, b in zip(setups, times, before):
        after = await commandstats(driver, nodes)
        sent = Counter({c[:-len(".calls")]: (after[c] - b[c]) / count
                        for c in after if c.endswith(".calls") and after[c] != b[c]})
        sent.pop("info", None)
        out.append((statistics.median(spent), sent))
    return out


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

    clusters = [RedisCluster(masters=3, replicas=args.replicas) for _ in range(2)]
    setups = []
    try:
        await defer.gatherResults([defer.ensureDeferred(c.start()) for c in clusters])
        for c in clusters:
            driver = RedisDbDriver(c.seeds)
            await driver.initialize()
            setups.append((driver, [m.address for m in await c.masters()]))
        for driver, _ in setups:
            for i in range(args.rows):
                await driver.create_key(TABLE, f"p{i}", value(i, 300), topic=TOPIC)
        await load_others(setups[1][0], args.others)
        (empty, sent_empty), (full, sent_full) = await reads(setups, args.reads, args.rows)
        driver, nodes = setups[0]
        best: dict[bool, tuple[float, float]] = {}
        for _ in range(3):
            for script in (True, False):
                got = await write_rate(driver, nodes, args.writes, args.inflight, script)
                best[script] = max(best.get(script, got), got)
    finally:
        for driver, _ in setups:
            await driver.close()
        for c in clusters:
            await c.stop()
    ratio = full / empty
    (rate, usec), (plain_rate, plain_usec) = best[True], best[False]
    print(f"read of {args.rows} rows of one topic: {empty * 1000:.2f} ms alone, "
          f"{full * 1000:.2f} ms next to {args.others:,} other rows: {ratio:.2f}x")
    print(f"commands per read alone: {dict(sent_empty)}; next to the others: {dict(sent_full)}")
    print(f"create_key (script, with the version): {rate:,.0f}/s, {usec:.1f} us of Redis "
          f"per write; SET ... GET: {plain_rate:,.0f}/s, {plain_usec:.1f} us "
          f"({args.inflight} in flight)")
    write_markdown(args.markdown, {"topic_read": markdown_table(
        ["measure", "value"],
        [[f"read of {args.rows} rows of one topic, nothing else", f"{empty * 1000:.2f} ms"],
         [f"the same next to {args.others:,} other rows", f"{full * 1000:.2f} ms"],
         ["ratio", f"{ratio:.2f}x"],
         [f"`create_key` (row and version), {args.inflight} in flight",
          f"{rate:,.0f}/s, {usec:.1f} µs of Redis each"],
         ["plain `SET ... GET`, the same rows", f"{plain_rate:,.0f}/s, {plain_usec:.1f} µs"]])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--others", type=int, default=400_000)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=0,
                        help="replicas per master (default 0: 2-core machines)")
    parser.add_argument("--markdown", help="also write the table to this file (bench markers)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
