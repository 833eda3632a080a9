"""
dftx inside another Twisted application: the NB database on Redis
Cluster, a pub/sub driver, NbApi, the Redis HA watcher and the OVSDB port
monitor, wired together in one process.

    python doc/examples/embed.py REDIS_SEEDS OVSDB_ENDPOINT [--pubsub redis|redis_sharded|zmq]
                                 [--tenant NAME]

REDIS_SEEDS is one or more "host:port" of the Redis Cluster, comma-separated
(or set DFTX_REDIS); OVSDB_ENDPOINT a Twisted client endpoint string such
as "tcp:127.0.0.1:6640" or "unix:/run/openvswitch/db.sock" (or set
DFTX_OVSDB).  It runs one scenario and exits:

1. connect the NB DB, a publisher and a subscriber (topics "D", the
   tenant's, and "redis", where the HA watcher publishes the topology);
2. write a tenant row through NbApi: the subscriber receives it;
3. start the OVSDB monitor: each VM port online in ovsdb-server (an
   Interface with external_ids:iface-id) becomes a port_status row,
   written through NbApi, which the subscriber receives too;
4. delete what it wrote, close everything.

tests/test_docs.py runs it against the test suite's own servers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from twisted.internet import defer, task

from dftx.db.redis import RedisDbDriver
from dftx.ha import HA_TOPIC, ClusterWatcher
from dftx.nb import NbApi
from dftx.ovsdb.monitor import InterfaceMonitor
from dftx.pubsub.redis import RedisPubSub
from dftx.pubsub.zmq import ZmqPubSub
from dftx.update import DbUpdate


async def wait_for(reactor, check, timeout, what):
    """Poll C{check()} every 50 ms until it is true; give up after C{timeout} s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


class EmbeddedNode:
    """What an application holds: the driver, pub/sub, NbApi, watcher, monitor."""

    def __init__(self, reactor, seeds, ovsdb, pubsub="redis", tenant="tenant-1"):
        self.reactor = reactor
        self.seeds = seeds
        self.ovsdb = ovsdb
        self.driver = pubsub
        self.tenant = tenant
        self.received = []       # every row update the subscriber delivered
        self.port_writes = []    # Deferreds of the port_status writes

    # --- the subscriber's callback: row updates and control events ---------------

    def on_update(self, update: DbUpdate) -> None:
        if update.is_control:
            # dbrestart: the connection was recovered, anything may have been
            # missed; sync: resync update.topic (None: all).  An application
            # re-reads the NB DB here.
            print(f"control: {update.action} (topic {update.topic})")
            return
        self.received.append(update)
        if update.table == "probe":      # see joined()
            return
        value = update.value if update.table != "ha" else "<topology>"
        print(f"received: {update.action} {update.table}/{update.key} "
              f"topic {update.topic} {value}")

    # --- the OVSDB monitor's callback --------------------------------------------

    def on_port(self, event) -> None:
        if event.kind != "vm" or event.action == "update":
            return
        status = "up" if event.action == "online" else "down"
        print(f"port {event.action}: {event.name} iface-id {event.iface_id} "
              f"ofport {event.ofport}")
        row = json.dumps({"status": status, "chassis": "embed-example", "ofport": event.ofport})
        # NbApi: written to the NB DB, then published (on "D": no topic).
        self.port_writes.append(self.nb.create("port_status", event.iface_id, row))

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        # The NB database.  initialize() reads CLUSTER SHARDS from any seed.
        self.db = RedisDbDriver(hosts=self.seeds, retries=3)
        await self.db.initialize()
        masters = self.db.client.topology.masters
        print(f"NB DB: {len(masters)} masters")

        # Pub/sub: Redis (the NB DB's cluster is the broker) or ZeroMQ (no
        # broker: the publisher binds, subscribers connect to its uri).
        if self.driver == "zmq":
            pubsub = ZmqPubSub(bind="tcp://127.0.0.1:*")
        else:
            pubsub = RedisPubSub(hosts=self.seeds, sharded=self.driver == "redis_sharded")
        self.pub = pubsub.get_publisher()
        await self.pub.initialize()
        self.sub = pubsub.get_subscriber()
        await self.sub.register_topic(self.tenant)
        await self.sub.register_topic(HA_TOPIC)
        await self.sub.initialize(self.on_update)      # subscribes "D" as well
        if self.driver == "zmq":
            # With ZeroMQ the application finds publishers itself (dfpublisher
            # and dfcontroller read table "publisher": dftx.registry).
            await self.sub.register_listen_address(self.pub.uri)
        await self.joined()
        print(f"subscribed ({self.driver}): {', '.join(sorted(self.sub.topics))}")

        # Writes go through NbApi: NB DB first, then publish; undone if the
        # publish fails.  on_db_restart re-writes the rows a failover may lose.
        self.nb = NbApi(self.db, self.pub, on_db_restart=self.rewrite_rows)

        # The HA watcher (dfpublisher runs one): CLUSTER SHARDS every interval,
        # the topology published on "redis" when it changes, and
        # NbApi.db_restart (hook + "dbrestart" to every subscriber) on a failover.
        self.watcher = ClusterWatcher(self.db.client, self.pub, interval=3.0,
                                      on_failover=self.nb.db_restart)
        self.watcher.startService()                     # first check at once

    async def joined(self) -> None:
        """Wait until a probe sent now reaches the subscriber.  A Redis
        subscriber is subscribed once initialize() fires; a ZeroMQ SUB socket
        joins a moment after it connects, and what is sent before is lost
        (the subscriber then gets a seq gap or a sync and resyncs)."""
        probe = DbUpdate("probe", "p", "set", "x", self.tenant)

        def arrived():
            return any(u.table == "probe" for u in self.received)

        deadline = time.monotonic() + 10
        while not arrived():
            if time.monotonic() > deadline:
                raise TimeoutError("the subscriber never received a probe")
            await self.pub.send_event(probe)
            await task.deferLater(self.reactor, 0.1, lambda: None)

    async def rewrite_rows(self) -> None:
        """The on_db_restart hook: re-write the rows this application owns."""
        print("failover: re-writing our rows")

    async def scenario(self) -> None:
        # 1. A tenant row: the subscriber has registered the tenant's topic.
        value = json.dumps({"id": "net-1", "name": "private"})
        await self.nb.create("lswitch", "net-1", value, topic=self.tenant)
        await wait_for(self.reactor, lambda: self.got("lswitch", "net-1"), 10, "lswitch net-1")
        print(f"read back: lswitch/net-1 = {await self.nb.get('lswitch', 'net-1', self.tenant)}")

        # 2. The HA watcher's first topology.
        await wait_for(self.reactor, lambda: self.got("ha", "topology"), 10, "HA topology")

        # 3. The OVSDB monitor: every VM port online becomes a port_status row.
        synced = defer.Deferred()
        self.monitor = InterfaceMonitor(self.ovsdb, self.on_port,
                                        on_sync_end=lambda: synced.called or synced.callback(None))
        self.monitor.startService()
        await synced.addTimeout(10, self.reactor)
        vm_ports = [p for p in self.monitor.ports.values() if p.kind == "vm"]
        print(f"OVSDB: synced, {len(self.monitor.ports)} ports online, {len(vm_ports)} VM ports")
        await defer.gatherResults(self.port_writes, consumeErrors=True)
        for port in vm_ports:
            await wait_for(self.reactor, lambda p=port: self.got("port_status", p.iface_id),
                           10, f"port_status {port.iface_id}")

        # 4. Clean up what we wrote.
        await self.nb.delete("lswitch", "net-1", topic=self.tenant)
        for port in vm_ports:
            await self.nb.delete("port_status", port.iface_id)

    def got(self, table, key) -> bool:
        return any(u.table == table and u.key == key for u in self.received)

    async def stop(self) -> None:
        if getattr(self, "monitor", None) is not None:
            await self.monitor.stopService()
        await self.watcher.stopService()
        await self.sub.close()
        await self.pub.close()
        await self.db.close()
        print("closed")


async def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("redis", nargs="?", default=os.environ.get("DFTX_REDIS"),
                        help="Redis seed nodes, host:port[,host:port...] (or $DFTX_REDIS)")
    parser.add_argument("ovsdb", nargs="?", default=os.environ.get("DFTX_OVSDB"),
                        help="ovsdb-server, a Twisted client endpoint string (or $DFTX_OVSDB)")
    parser.add_argument("--pubsub", choices=("redis", "redis_sharded", "zmq"), default="redis")
    parser.add_argument("--tenant", default="tenant-1", help="the tenant topic to use")
    args = parser.parse_args(argv)
    if not args.redis or not args.ovsdb:
        parser.error("give REDIS_SEEDS and OVSDB_ENDPOINT (or DFTX_REDIS and DFTX_OVSDB)")

    node = EmbeddedNode(reactor, args.redis.split(","), args.ovsdb, args.pubsub, args.tenant)
    await node.start()
    try:
        await node.scenario()
    finally:
        await node.stop()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
