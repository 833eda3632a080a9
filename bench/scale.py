"""
One publisher, many subscribers: how delivery rate and latency change with
the number of subscribers, for each transport, in one run:

    .venv/bin/python bench/scale.py [--sizes 10,100,1000] [--count 1000]
                     [--latency-count 100] [--transports redis,redis_sharded,zmq]
                     [--procs 4]

Transports: Redis classic (C{RedisPubSub(hosts, sharded=False)}) and
sharded (C{sharded=True}) on one Redis Cluster of 3 masters without
replicas; ZeroMQ through a real C{twistd -n dfpublisher} (memory NB DB):
the publisher PUSHes over ipc to its relay, which re-publishes on its PUB
socket (tcp, loopback).  The publisher is this process.  For each size S,
S real dftx subscribers (each its own C{get_subscriber()}, so its own
connections or SUB socket) are spread over up to C{--procs} subscriber
processes, each one reactor, all subscribed to one topic.  Their callback
parses the update's JSON value (~300 bytes encoded) for its send time.

1. Burst: C{--count} messages sent as fast as the transport acknowledges
   them (1,000 in flight at most); the rate is the count over the time from
   the first send to the last message reaching every subscriber.
2. One at a time: C{--latency-count} messages, each sent once the previous
   one reached every subscriber.

Latency is from the send time in the message to the callback, over every
delivery.  Each subscriber counts what it got: a lost message (or a
sequence gap a subscriber saw) is reported in the table's "lost" column.
Every wait is bounded; a phase that does not complete reports its losses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import Child, orchestrate_with, raise_nofile, table, write_markdown

TOPIC = "scale"
TABLE = "lport"
PAD = "x" * 200
CHUNK = 1000
EVENTS = ("gaps", "undecodable", "restarts")  # subscriber counters that mean a loss
TRANSPORTS = {"redis": "Redis classic", "redis_sharded": "Redis sharded",
              "zmq": "ZeroMQ (dfpublisher)"}


def pubsub(transport: str, where: str, relay: str | None = None):
    """The dftx pub/sub driver of C{transport}: C{where} is the Redis seeds
    (comma-separated) or the relay's PUB address."""
    if transport == "zmq":
        from dftx.pubsub.zmq import ZmqPubSub

        return ZmqPubSub(relay=relay)
    from dftx.pubsub.redis import RedisPubSub

    return RedisPubSub(where.split(","), sharded=transport == "redis_sharded")


# --- child role: a process of subscribers -----------------------------------------


def subscribers(transport: str, where: str, n: int) -> None:
    """
    C{n} subscribers in one reactor.  Prints "ready" once each has seen a
    warm-up message, "got I" once each has got message I of a report point,
    and on "report" (stdin) "result {json}" of what the phase delivered.
    Exits when stdin closes.
    """
    import zmq
    from twisted.internet import defer, reactor, stdio, task
    from twisted.protocols.basic import LineReceiver

    from dftx.pubsub.zmq_socket import context

    # Each subscriber: its SUB socket and a monitor pair (libzmq allows 1,023 by default).
    context().context.set(zmq.MAX_SOCKETS, 8 * n + 64)
    driver = pubsub(transport, where)
    subs: list = []
    got = [0] * n
    warm = [False] * n
    latencies: list[float] = []
    reached: dict[int, int] = {}

    def say(line: str) -> None:  # stdout is StandardIO's (non-blocking): no print()
        commands.transport.write(line.encode() + b"\n")

    def callback(k: int):
        def on_update(update) -> None:
            if update.is_control or update.table != TABLE:
                return
            now = time.time()
            v = json.loads(update.value)
            if v["i"] < 0:  # warm-up
                if not warm[k]:
                    warm[k] = True
                    if all(warm):
                        say("ready")
                return
            latencies.append(now - v["t"])
            got[k] += 1
            if v["r"]:
                reached[v["i"]] = reached.get(v["i"], 0) + 1
                if reached[v["i"]] == n:
                    say(f"got {v['i']}")
        return on_update

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line == b"report":
                counts = {k: sum(s.counters[k] for s in subs) for k in EVENTS}
                say("result " + json.dumps({
                    "got": got, **counts, "lat": [round(x * 1e6) for x in latencies]}))
                for s in subs:
                    s.counters.clear()
                got[:] = [0] * n
                latencies.clear()
                reached.clear()

        def connectionLost(self, reason=None) -> None:
            d = defer.DeferredList([s.close() for s in subs], consumeErrors=True)
            d.addBoth(lambda _: reactor.stop())

    async def start(k: int) -> None:
        sub = driver.get_subscriber()
        subs.append(sub)
        await sub.register_topic(TOPIC)
        if transport == "zmq":
            await sub.register_listen_address(where)
        await sub.initialize(callback(k))

    commands = Commands()

    async def main(reactor) -> None:
        stdio.StandardIO(commands)
        await defer.gatherResults([defer.ensureDeferred(start(k)) for k in range(n)])
        say("subscribed")
        await defer.Deferred()  # until stdin closes

    task.react(lambda r: defer.ensureDeferred(main(r)))


# --- the orchestrator and publisher (Twisted) -----------------------------------------


def message(i: int, report: bool):
    from dftx.update import DbUpdate

    return DbUpdate(TABLE, f"port-{i}", "set",
                    json.dumps({"i": i, "t": time.time(), "r": report, "pad": PAD}), TOPIC)


async def measure(transport: str, where: str, relay: str | None, size: int,
                  args: argparse.Namespace) -> dict:
    from dftx.harness import poll

    procs = min(args.procs, size)
    shares = [size // procs + (k < size % procs) for k in range(procs)]
    children = [Child([sys.executable, __file__, "--role", "subscribers", "--transport",
                       transport, "--where", where, "--n", str(share)]) for share in shares]
    pub = pubsub(transport, where, relay).get_publisher()
    failed: list = []
    try:
        await pub.initialize()
        for c in children:
            await c.line("subscribed", timeout=60 + size / 10)

        async def warmed() -> bool:
            await pub.send_event(message(-1, False))
            return all("ready" in c.lines for c in children)
        await poll(warmed, 60, f"{size} {transport} subscribers warmed up", interval=0.1)

        async def report(count: int) -> tuple[Counter, list[int]]:
            """What the phase lost (messages, and why), and its latencies."""
            for c in children:
                c.lines.clear()
                c.transport.write(b"report\n")
            results = [json.loads((await c.line("result ", 120))[7:]) for c in children]
            events = Counter(lost=sum(max(0, count - g) for r in results for g in r["got"]))
            for r in results:
                events.update({k: r[k] for k in EVENTS})
            return events, sorted(x for r in results for x in r["lat"])

        async def delivered(i: int, timeout: float) -> bool:
            """Message I reached every subscriber (False: not in time)."""
            line = f"got {i}"
            try:
                return await poll(lambda: all(line in c.lines for c in children), timeout,
                                  f"message {i} at every subscriber", interval=0.002)
            except TimeoutError:
                return False

        # 1. Burst.
        for c in children:
            c.lines.clear()
        start = time.perf_counter()
        for first in range(0, args.count, CHUNK):
            last = min(args.count, first + CHUNK) - 1
            sends = [pub.send_event(message(i, i == args.count - 1)).addErrback(failed.append)
                     for i in range(first, last + 1)]
            await sends[-1]  # they fire in order
        complete = await delivered(args.count - 1, 30 + args.count * size / 5000)
        elapsed = time.perf_counter() - start
        events, burst = await report(args.count)
        delivered_n = args.count * size - events["lost"]
        # 2. One at a time.
        for i in range(args.latency_count):
            for c in children:
                c.lines.clear()
            await pub.send_event(message(i, True)).addErrback(failed.append)
            if not await delivered(i, 10):
                complete = False
                break
        more, single = await report(args.latency_count)
        events += more
        events["failed sends"] = len(failed)
    finally:
        await pub.close()
        for c in children:
            c.transport.closeStdin()
        try:
            for c in children:
                await poll(lambda: c.ended.called, 30, "a subscriber process's exit")
        finally:
            for c in children:
                c.kill()
            Child.live.clear()
    return {"procs": procs, "complete": complete, "events": events,
            "msgs": delivered_n / size / elapsed, "deliveries": delivered_n / elapsed,
            "burst": percentiles(burst), "single": percentiles(single)}


def percentiles(micros: list[int]) -> tuple[float, float]:
    """p50 and p99, in ms, of sorted microseconds."""
    if not micros:
        return float("nan"), float("nan")
    return micros[len(micros) // 2] / 1000, micros[int(len(micros) * 0.99)] / 1000


async def orchestrate(args: argparse.Namespace) -> None:
    from dftx.harness import DftxService, RedisCluster, free_port

    sizes = [int(s) for s in args.sizes.split(",")]
    transports = args.transports.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="dftx-bench-scale-"))
    rows = []
    print(f"{args.count} messages in a burst, then {args.latency_count} one at a time; "
          f"subscribers in up to {args.procs} processes")
    for transport in transports:
        if transport == "zmq":
            http_port, port = free_port(), free_port()
            sock = workdir / "publisher.sock"
            server = DftxService("dfpublisher", workdir / "dfpublisher",
                                 "[df]\nnb_db_driver = memory\n[neutron_server]\n"
                                 f"publisher_port = {port}\npublisher_multiproc_socket = {sock}\n"
                                 f"http_endpoint = tcp:{http_port}:interface=127.0.0.1\n",
                                 http_port)
            where, relay = f"tcp://127.0.0.1:{port}", f"ipc://{sock}"
        else:
            server = RedisCluster(workdir / transport, masters=3, replicas=0)
            where, relay = ",".join(server.seeds), None
        await server.start()
        try:
            for size in sizes:
                r = await measure(transport, where, relay, size, args)
                events = r["events"]
                why = [f"{events[k]:,} {k}" for k in (*EVENTS, "failed sends") if events[k]]
                why += [] if r["complete"] else ["incomplete"]
                lost = f"{events['lost']:,}" + (f" ({', '.join(why)})" if why else "")
                row = [TRANSPORTS[transport], f"{size:,}", r["procs"], f"{r['msgs']:,.0f}",
                       f"{r['deliveries']:,.0f}", lost,
                       *(f"{x:.2f}" for x in r["burst"] + r["single"])]
                rows.append(row)
                print(" | ".join(str(c) for c in row), flush=True)
        finally:
            await server.stop()
    md = table(["transport", "subscribers", "processes", "msgs/s to every subscriber",
                "deliveries/s", "lost", "burst p50 ms", "burst p99 ms",
                "one at a time p50 ms", "one at a time p99 ms"], rows)
    shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(md, end="")
    write_markdown(args.markdown, {"scale": md})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated subscriber counts")
    parser.add_argument("--count", type=int, default=1000, help="messages in the burst")
    parser.add_argument("--latency-count", type=int, default=100,
                        help="messages sent one at a time")
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help="comma-separated, of " + ", ".join(TRANSPORTS))
    parser.add_argument("--procs", type=int, default=4, help="subscriber processes (at most)")
    parser.add_argument("--markdown", help="also write the table to this file (bench markers)")
    parser.add_argument("--role", choices=["subscribers"], help=argparse.SUPPRESS)
    parser.add_argument("--transport", help=argparse.SUPPRESS)
    parser.add_argument("--where", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()
    if args.role:
        subscribers(args.transport, args.where, args.n)
        return
    orchestrate_with(parser, args.transports, TRANSPORTS, orchestrate, args)


if __name__ == "__main__":
    main()
