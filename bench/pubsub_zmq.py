"""
Throughput of the ZeroMQ path, dftx against raw pyzmq, in one run.

    .venv/bin/python bench/pubsub_zmq.py [--count 50000] [--subscribers 1,20] [--markdown FILE]

Both sides have the same shape: a writer process PUSHes N updates over ipc
to a relay process that re-publishes them on a PUB socket, and one
subscriber process holds S SUB sockets connected to it, each decoding every
message.

- dftx: the writer is C{NbApi}-free C{ZmqPublisher.send_event} (msgpack
  encoding, id and seq stamping), the relay is C{twistd -n dfpublisher}
  (memory NB DB; it validates every message before re-publishing), the
  subscribers are C{ZmqSubscriber}s in one Twisted reactor (exact topic
  filter, decoding, seq tracking, callback).
- pyzmq: a blocking writer (C{msgpack.packb} + C{send_multipart}), a
  C{zmq.proxy(PULL, PUB)} relay, and S SUB sockets polled by C{zmq.Poller}
  with C{msgpack.unpackb} per message.

Every socket has a high-water mark of 100,000 messages.  The subscriber
process times from its first update to the last update reaching every
subscriber; the rate is N / that time (per subscriber) and N * S / that time
(deliveries).  Everything shares the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import Child, table, write_markdown

HWM = 100_000
WARM = "warm"


# --- child roles ------------------------------------------------------------------


def dftx_writer(relay: str, count: int) -> None:
    from twisted.internet import defer, task

    from dftx.pubsub.zmq import ZmqPubSub
    from dftx.update import DbUpdate

    async def main(reactor):
        pub = ZmqPubSub(relay=relay, linger=30).get_publisher()
        await pub.initialize()
        batch = []
        for i in range(count):
            batch.append(pub.send_event(DbUpdate("lport", f"port-{i}", "create", '{"id": 1}')))
            if len(batch) == 5000:
                await defer.gatherResults(batch)
                batch = []
        await defer.gatherResults(batch)
        await pub.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def dftx_subscribers(uri: str, subs: int, count: int) -> None:
    from twisted.internet import defer, reactor, task

    from dftx.pubsub.zmq import ZmqPubSub

    got = [0] * subs
    warm = [False] * subs
    times: list[float] = []

    def callback(i):
        def on_update(update):
            if update.is_control:  # a sync on joining the relay: not an update
                return
            if update.topic == WARM:
                if not warm[i]:
                    warm[i] = True
                    if all(warm):
                        print("ready", flush=True)
                return
            if not times:
                times.append(time.perf_counter())
            got[i] += 1
            if got[i] == count and all(g == count for g in got):
                times.append(time.perf_counter())
                finish()
        return on_update

    def finish():
        print(json.dumps({"received": got, "elapsed": times[-1] - times[0]}), flush=True)
        reactor.stop()

    async def main(reactor):
        for i in range(subs):
            sub = ZmqPubSub(hwm=HWM).get_subscriber()
            await sub.register_topic(WARM)
            await sub.register_listen_address(uri)
            await sub.initialize(callback(i))
        await defer.Deferred()  # until finish() stops the reactor

    task.react(lambda r: defer.ensureDeferred(main(r)))


def raw_writer(relay: str, count: int) -> None:
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.set(zmq.SNDHWM, HWM)
    sock.set(zmq.LINGER, 30_000)
    sock.connect(relay)
    for i in range(count):
        data = msgpack.packb({"table": "lport", "key": f"port-{i}", "action": "create",
                              "value": '{"id": 1}', "topic": "D"})
        sock.send_multipart([b"D", data])
    sock.close()
    zmq.Context.instance().term()


def raw_relay(pull: str, pub: str) -> None:
    import zmq

    ctx = zmq.Context.instance()
    front, back = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    for s in (front, back):
        s.set(zmq.RCVHWM, HWM)
        s.set(zmq.SNDHWM, HWM)
    front.bind(pull)
    back.bind(pub)
    print("ready", flush=True)
    zmq.proxy(front, back)


def raw_subscribers(uri: str, subs: int, count: int) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    poller = zmq.Poller()
    socks = []
    for _ in range(subs):
        s = ctx.socket(zmq.SUB)
        s.set(zmq.RCVHWM, HWM)
        s.subscribe(b"D")
        s.subscribe(WARM.encode())
        s.connect(uri)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    index = {s: i for i, s in enumerate(socks)}
    got = [0] * subs
    warm = [False] * subs
    start = None
    while True:
        for s, _ in poller.poll():
            i = index[s]
            while True:
                try:
                    topic, data = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msgpack.unpackb(data)
                if topic == WARM.encode():
                    if not warm[i]:
                        warm[i] = True
                        if all(warm):
                            print("ready", flush=True)
                    continue
                if start is None:
                    start = time.perf_counter()
                got[i] += 1
        if all(g == count for g in got):
            elapsed = time.perf_counter() - start
            print(json.dumps({"received": got, "elapsed": elapsed}), flush=True)
            return


ROLES = {
    "dftx-writer": lambda a: dftx_writer(a.relay, a.count),
    "dftx-subscribers": lambda a: dftx_subscribers(a.uri, a.subscribers_n, a.count),
    "raw-writer": lambda a: raw_writer(a.relay, a.count),
    "raw-relay": lambda a: raw_relay(a.relay, a.uri),
    "raw-subscribers": lambda a: raw_subscribers(a.uri, a.subscribers_n, a.count),
}


# --- the orchestrator (Twisted) -----------------------------------------------------


async def run_case(kind: str, subs: int, count: int, workdir: Path) -> dict:
    from dftx.pubsub.zmq import ZmqPubSub
    from dftx.harness import free_port, poll
    from dftx.update import DbUpdate

    port = free_port()
    ipc = f"ipc://{workdir}/{kind}-{subs}.sock"
    uri = f"tcp://127.0.0.1:{port}"
    me = [sys.executable, __file__, "--count", str(count)]
    relay = None
    try:
        if kind == "dftx":
            http_port = free_port()
            config = workdir / f"dftx-{subs}.ini"
            config.write_text(
                "[df]\nnb_db_driver = memory\n[neutron_server]\n"
                f"publisher_port = {port}\npublisher_multiproc_socket = {ipc[6:]}\n"
                f"http_endpoint = tcp:{http_port}:interface=127.0.0.1\n")
            relay = Child([str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
                           "dfpublisher", "--config", str(config)], workdir / "dfpublisher.log")
            await poll(lambda: Path(ipc[6:]).exists(), 20, "dfpublisher's ipc socket")
        else:
            relay = Child(me + ["--role", "raw-relay", "--relay", ipc, "--uri", uri])
            await relay.line("ready")
        sub = Child(me + ["--role", f"{kind}-subscribers", "--uri", uri,
                          "--subscribers-n", str(subs)])
        warm = ZmqPubSub(relay=ipc).get_publisher()
        await warm.initialize()

        async def warmed():
            await warm.send_event(DbUpdate("warm", "w", "create", "{}", WARM))
            return "ready" in sub.lines
        await poll(warmed, 30, f"{kind} subscribers joined")
        await warm.close()
        writer = Child(me + ["--role", f"{kind}-writer", "--relay", ipc])
        result = json.loads(await sub.line("{", timeout=600))
        await writer.ended
        return result
    finally:
        for child in Child.live:
            child.kill()
        Child.live.clear()


async def orchestrate(counts: int, subscriber_counts: list[int], markdown: str | None) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dftx-bench-zmq-"))
    print(f"{counts} updates per run; writer -> relay (ipc) -> PUB -> S SUB sockets "
          "in one process\n")
    print(f"{'subscribers':>11} | {'dftx msgs/s':>12} | {'pyzmq msgs/s':>12} | "
          f"{'dftx/pyzmq':>10} | {'dftx deliveries/s':>17} | {'pyzmq deliveries/s':>18}")
    rows = []
    for subs in subscriber_counts:
        rates = {}
        for kind in ("dftx", "raw"):
            result = await run_case(kind, subs, counts, workdir)
            assert result["received"] == [counts] * subs, result
            rates[kind] = counts / result["elapsed"]
        print(f"{subs:>11} | {rates['dftx']:>12,.0f} | {rates['raw']:>12,.0f} | "
              f"{rates['dftx'] / rates['raw']:>9.2f}x | {rates['dftx'] * subs:>17,.0f} | "
              f"{rates['raw'] * subs:>18,.0f}", flush=True)
        rows.append([subs, f"{rates['dftx']:,.0f}", f"{rates['raw']:,.0f}",
                     f"{rates['dftx'] / rates['raw']:.2f}x", f"{rates['dftx'] * subs:,.0f}",
                     f"{rates['raw'] * subs:,.0f}"])
    write_markdown(markdown, {"pubsub_zmq": table(
        ["subscribers", "dftx msgs/s", "pyzmq msgs/s", "dftx / pyzmq", "dftx deliveries/s",
         "pyzmq deliveries/s"], rows)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--subscribers", default="1,20", help="comma-separated S values")
    parser.add_argument("--markdown", help="also write the table to this file (bench markers)")
    parser.add_argument("--role", choices=sorted(ROLES))
    parser.add_argument("--relay")
    parser.add_argument("--uri")
    parser.add_argument("--subscribers-n", type=int, default=1)
    args = parser.parse_args()
    if args.role:
        ROLES[args.role](args)
        return
    from twisted.internet import defer, task

    subs = [int(s) for s in args.subscribers.split(",")]
    task.react(lambda _: defer.ensureDeferred(orchestrate(args.count, subs, args.markdown)))


if __name__ == "__main__":
    main()
