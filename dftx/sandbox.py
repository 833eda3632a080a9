"""
A whole dftx deployment on loopback, for the sandbox, the tests and the
benchmarks: a Redis Cluster with replicas, one dfpublisher, and controllers
each with its own ovsdb-server, plus an NB API writer as the neutron-server
side would run it (L{Deployment.nb}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dftx.servers import DftxService, OvsdbServer, RedisCluster, poll


class Deployment:
    """
    @param cluster: a started L{RedisCluster} (the deployment does not own it).
    @param controllers: how many dfcontrollers (chassis C{compute1}, ...).
    @param pub_sub_driver: C{zmq} (through dfpublisher), C{redis} or
        C{redis_sharded}.
    """

    def __init__(self, base_dir: Path, cluster: RedisCluster, controllers: int = 2,
                 pub_sub_driver: str = "zmq", publisher_timeout: int = 6,
                 db_sync_time: float = 5, tables: str = "lport,lswitch,chassis") -> None:
        self.dir = Path(base_dir)
        self.cluster = cluster
        self.pub_sub_driver = pub_sub_driver
        seeds = cluster.seeds
        self.publisher = DftxService.publisher(
            self.dir / "dfpublisher", seeds, pub_sub_driver, publisher_timeout)
        self.ovsdbs = [OvsdbServer(self.dir / f"ovsdb{i + 1}") for i in range(controllers)]
        self.controllers = [
            DftxService.controller(
                self.dir / f"compute{i + 1}", seeds, f"compute{i + 1}", ovsdb.tcp,
                pub_sub_driver, publisher_timeout, tables, db_sync_time)
            for i, ovsdb in enumerate(self.ovsdbs)
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
        self.db = RedisDbDriver(hosts=self.cluster.seeds)
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
        return {key: _parsed(value) for _, key, value in await self.db.get_all_rows(table)}

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
        await poll(lambda: self.converged(table), timeout,
                   f"every controller's {table} equal to the NB DB")


def _parsed(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
