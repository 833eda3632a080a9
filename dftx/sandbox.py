"""
A whole dftx deployment on loopback, for the sandbox, the tests and the
benchmarks: a Redis Cluster with replicas, one dfpublisher, and controllers
each with its own ovsdb-server, plus an NB API writer as the neutron-server
side would run it (L{Deployment.nb}).  C{python -m dftx.sandbox} runs one
with a narrated scenario (L{main}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from dftx.deferreds import or_global_reactor
from dftx.harness import DftxService, OvsdbServer, RedisCluster, poll
from dftx.http import json_or_text

__all__ = ["Deployment", "main", "run_sandbox", "scenario"]


class Deployment:
    """
    @param cluster: a started L{RedisCluster} (the deployment does not own it).
    @param controllers: how many dfcontrollers (chassis C{compute1}, ...).
    @param pub_sub_driver: C{zmq} (through dfpublisher), C{redis} or
        C{redis_sharded}.
    @param topics: tenant topics every controller subscribes to beyond C{"D"}.
    @param reactor: runs the processes, the timers and the NB DB client (the
        global one when omitted).
    @param lab: a started L{dftx.harness.netns.Lab}: dfpublisher runs on host
        C{publisher}, each controller with its ovsdb-server on host
        C{computeN}; the NB writer stays in this process (the lab's root
        host), reaching dfpublisher over its ipc socket.  Omitted: loopback.
    @param wait_replicas: the NB writer's C{wait_replicas} (Redis WAIT).
    """

    def __init__(self, base_dir: Path, cluster: RedisCluster, controllers: int = 2,
                 pub_sub_driver: str = "zmq", publisher_timeout: int = 6,
                 db_sync_time: float = 5, tables: str = "lport,lswitch,chassis",
                 topics: Sequence[str] = (), reactor: Any = None, lab: Any = None,
                 wait_replicas: int = 0) -> None:
        self.dir = Path(base_dir)
        self.cluster = cluster
        self.pub_sub_driver = pub_sub_driver
        self.reactor = or_global_reactor(reactor)
        self.wait_replicas = wait_replicas
        self.lab = lab
        seeds = cluster.seeds

        def on(name: str) -> dict[str, Any]:
            return {} if lab is None else {"host": lab.host(name)}

        self.publisher = DftxService.publisher(
            self.dir / "dfpublisher", seeds, pub_sub_driver, publisher_timeout,
            reactor=self.reactor, **on("publisher"))
        computes = [on(f"compute{i + 1}") for i in range(controllers)]
        self.ovsdbs = [OvsdbServer(self.dir / f"ovsdb{i + 1}", reactor=self.reactor, **host)
                       for i, host in enumerate(computes)]
        self.controllers = [
            DftxService.controller(
                self.dir / f"compute{i + 1}", seeds, f"compute{i + 1}", ovsdb.tcp,
                pub_sub_driver, publisher_timeout, tables, db_sync_time,
                extra=f"topics = {','.join(topics)}", reactor=self.reactor, **host)
            for i, (ovsdb, host) in enumerate(zip(self.ovsdbs, computes))
        ]
        self.db: Any = None
        self.nb: Any = None
        self._writer: Any = None

    async def start(self) -> None:
        """Start the ovsdb-servers (each with br-int), dfpublisher, the
        controllers, and the NB writer."""
        from dftx.db.redis import RedisDbDriver
        from dftx.nb import NbApi
        from dftx.pubsub.zmq import ZmqPubSub

        for ovsdb in self.ovsdbs:
            await ovsdb.start()
            await ovsdb.vsctl("add-br", "br-int")
        await self.publisher.start()
        for controller in self.controllers:
            await controller.start()
        self.db = RedisDbDriver(hosts=self.cluster.seeds, reactor=self.reactor,
                                wait_replicas=self.wait_replicas)
        await self.db.initialize()
        if self.pub_sub_driver == "zmq":
            self._writer = ZmqPubSub(relay=self.publisher.ipc).get_publisher()
        else:
            from dftx.pubsub.redis import RedisPubSub

            self._writer = RedisPubSub(self.cluster.seeds,
                                       sharded=self.pub_sub_driver == "redis_sharded"
                                       ).get_publisher()
        await self._writer.initialize()
        self.nb = NbApi(self.db, self._writer)

    async def stop(self) -> None:
        """Stop everything it started (SIGTERM, then kill -9 what is left)."""
        for svc in [*self.controllers, self.publisher]:
            if svc.process.running:
                try:
                    await svc.stop()
                except Exception:
                    await svc.kill()
        if self._writer is not None:
            await self._writer.close()
        if self.db is not None:
            await self.db.close()
        for ovsdb in self.ovsdbs:
            await ovsdb.stop()

    async def db_table(self, table: str) -> dict[str, Any]:
        """C{table} as the NB DB has it (key -> value, JSON values parsed),
        rows without topic and with."""
        rows = await self.db.get_all_rows(table)
        return {key: json_or_text(value) for _, key, value in rows}

    async def converged(self, table: str) -> bool:
        """Whether every controller's cache of C{table} equals the NB DB."""
        want = await self.db_table(table)
        for controller in self.controllers:
            if not controller.process.running:
                return False
            if await controller.json(f"/v1/tables/{table}") != want:
                return False
        return True

    async def wait_converged(self, table: str, timeout: float = 30.0) -> None:
        """Wait until L{converged}."""
        await poll(lambda: self.converged(table), timeout,
                   f"every controller's {table} equal to the NB DB", reactor=self.reactor)


# --- the narrated sandbox: python -m dftx.sandbox [--once] ---------------------------


def _say(text: str) -> None:
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def _status_is(d: Deployment, iface_id: str, status: str) -> bool:
    row = (await d.db_table("port_status")).get(iface_id)
    return isinstance(row, dict) and row.get("status") == status


async def scenario(d: Deployment) -> None:
    """What the sandbox shows, step by step, with measured times."""
    import time

    from dftx.errors import DftxError
    from dftx.redis.slots import key_slot

    _say("writing 20 lport rows through NbApi (Redis Cluster, then ZeroMQ via dfpublisher)")
    t = time.monotonic()
    for i in range(20):
        await d.nb.create("lport", f"port-{i}", json.dumps({"id": f"port-{i}", "n": i}))
    await d.wait_converged("lport")
    _say(f"  both controllers have them ({time.monotonic() - t:.2f}s)")

    _say("plugging one VM port into each compute node's br-int with ovs-vsctl")
    t = time.monotonic()
    for i, ovsdb in enumerate(d.ovsdbs, 1):
        await ovsdb.vsctl("add-port", "br-int", f"tap{i}", "--", "set", "Interface",
                          f"tap{i}", f"external_ids:iface-id=vm-{i}",
                          f"external_ids:attached-mac=fa:16:3e:00:00:0{i}")
    for i in range(1, len(d.ovsdbs) + 1):
        await poll(lambda i=i: _status_is(d, f"vm-{i}", "up"), 30, f"vm-{i} up",
                   reactor=d.reactor)
    _say(f"  port_status says up for every VM port ({time.monotonic() - t:.2f}s)")

    master = await d.cluster.owner(key_slot("{lport.}port-0"))
    _say(f"killing the Redis master {master.address} (kill -9; cluster-node-timeout "
         f"{d.cluster.node_timeout_ms} ms)")
    await master.kill()
    t = time.monotonic()
    while True:
        try:
            await d.nb.create("lport", "after-failover", '{"id": "after-failover"}')
            break
        except DftxError:
            if time.monotonic() - t > 60:
                raise
    _say(f"  first NB write succeeded after {time.monotonic() - t:.2f}s")
    await d.wait_converged("lport", 60)
    _say(f"  every controller's cache equals the NB DB after {time.monotonic() - t:.2f}s")

    _say("unplugging the VM ports")
    t = time.monotonic()
    for i, ovsdb in enumerate(d.ovsdbs, 1):
        await ovsdb.vsctl("del-port", "br-int", f"tap{i}")
    for i in range(1, len(d.ovsdbs) + 1):
        await poll(lambda i=i: _status_is(d, f"vm-{i}", "down"), 30, f"vm-{i} down",
                   reactor=d.reactor)
    _say(f"  port_status says down ({time.monotonic() - t:.2f}s)")


async def run_sandbox(once: bool, reactor: Any) -> None:
    """Start everything in a temporary directory, run the scenario, then
    keep running until Ctrl-C (or stop at once with C{once}); everything is
    stopped and removed on every way out."""
    import shutil
    import signal
    import tempfile

    from twisted.internet import defer

    base = Path(tempfile.mkdtemp(prefix="dftx-sandbox-"))
    cluster = RedisCluster(base / "redis", masters=3, replicas=1, reactor=reactor)
    d = Deployment(base, cluster, controllers=2, publisher_timeout=30, db_sync_time=30,
                   reactor=reactor)
    # Ctrl-C and SIGTERM end the run through the finally below, before the
    # reactor stops (a ZeroMQ context terminated with sockets open would
    # hang the shutdown).
    interrupted: defer.Deferred[None] = defer.Deferred()

    def on_signal(signum: int, frame: object) -> None:
        reactor.callFromThread(
            lambda: interrupted.called or interrupted.errback(KeyboardInterrupt()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        _say(f"starting a Redis Cluster (3 masters, 3 replicas) in {base}")
        await _or_interrupted(cluster.start(), interrupted)
        _say("starting 2 ovsdb-servers, dfpublisher and 2 dfcontrollers")
        await _or_interrupted(d.start(), interrupted)
        await _or_interrupted(scenario(d), interrupted)
        _say("scenario done")
        if not once:
            _say(f"dfpublisher status: {d.publisher.url('/v1/status')}")
            for c in d.controllers:
                _say(f"{c.dir.name} status: {c.url('/v1/status')}  tables: "
                     f"{c.url('/v1/tables/lport')}  ports: {c.url('/v1/ports')}")
            _say("running until Ctrl-C")
            await interrupted
    except KeyboardInterrupt:
        _say("interrupted")
    finally:
        _say("stopping everything")
        await d.stop()
        await cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _or_interrupted(work: Any, interrupted: Any) -> None:
    """Run C{work}; raise KeyboardInterrupt as soon as C{interrupted} fails."""
    from twisted.internet import defer

    step = defer.ensureDeferred(work)
    first = defer.DeferredList([step, interrupted], fireOnOneCallback=True,
                               fireOnOneErrback=True, consumeErrors=True)
    try:
        await first
    except defer.FirstError as e:
        if not step.called:
            step.cancel()
            step.addErrback(lambda f: None)
        e.subFailure.raiseException()


def main(argv: list[str] | None = None) -> None:
    """C{python -m dftx.sandbox [--once]}: L{run_sandbox} on the default reactor."""
    import argparse

    from twisted.internet import defer, task

    parser = argparse.ArgumentParser(
        prog="python -m dftx.sandbox",
        description="A whole dftx deployment on this machine, with a narrated scenario.")
    parser.add_argument("--once", action="store_true",
                        help="stop after the scenario instead of running until Ctrl-C")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run_sandbox(args.once, reactor)))


if __name__ == "__main__":
    main()
