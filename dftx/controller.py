"""
The local controller, C{twistd -n dfcontroller --config FILE} (role
df_local_controller): what a compute node runs.

At start it connects to the NB database, binds its own publisher, writes
its chassis row (table C{chassis}, key C{chassis_name}, value JSON
C{{"id", "ip"}}), registers that publisher (with ZeroMQ, also finding the
publisher services through table C{publisher}), subscribes to C{"D"}, the
configured tenant topics and the HA topic, and loads every table it serves
into its L{LocalCache} (one SCAN and per-slot batches per table).  It is
ready (C{/healthz} 200) once subscribed and loaded.

Updates are applied to the cache in the order they arrive (per publisher
and topic, the order they were sent) and each real change is passed to the
observers (L{ControllerService.add_observer}), the in-process API of the
applications running on the node.

A resync diffs the cache against the database and reports only real
differences.  It runs on a C{dbrestart} (everything), a C{sync} or a seq
gap (that topic), an HA topology message (everything, after moving the
database connections to the new masters), every C{db_sync_time} seconds
(everything), and when a topic is registered (that topic).  Requests that
arrive while one runs are merged into the next run; a resync that fails
(database unreachable during a failover) is retried with a growing delay.

The OVSDB monitor turns VM ports into rows of table C{port_status} (key
the iface-id, value JSON C{{"status": "up"|"down", "chassis", "ofport"}}),
written through L{dftx.nb.NbApi} and so published on the controller's own
publisher, where the neutron-server side receives them.  After each
initial OVSDB sync, rows of this chassis that say C{up} for ports no
longer present are set C{down}; writes that fail are retried.  On a
C{dbrestart} the chassis row and the rows of online ports are written again.

With C{[df] zmq_curve}, the controller's publisher is a CURVE server (only
C{zmq_curve_allowed_keys} may subscribe) and its subscriber a CURVE client
that authenticates each publisher service by the key in its registration
row (or C{zmq_curve_server_keys}); see doc/security.md.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from twisted.internet import defer, task
from twisted.logger import Logger

from dftx import config as dfconfig
from dftx import http, runner
from dftx.cache import Observer
from dftx.config_values import check_tenant_topic
from dftx.deferreds import deferred
from dftx.errors import DftxError
from dftx.ha import HA_TOPIC, topology_from_update
from dftx.http import Metric
from dftx.nb import NbApi
from dftx.service import RoleService
from dftx.update import DBRESTART, LOCAL_CONTROLLER, PORT_STATUS_TABLE, DbUpdate

__all__ = ["CHASSIS_TABLE", "ControllerService", "Options", "makeService", "port_fields"]

log = Logger()

CHASSIS_TABLE = "chassis"


class ControllerService(RoleService):
    """
    The dfcontroller service for a loaded L{dftx.config.Config}, run with
    C{reactor} (an embedding application may omit it: the global reactor).

    @ivar mirror: the L{dftx.cache.Mirror} of the tables in
        [df_local_controller] tables; C{mirror.cache} (also L{cache}) is the
        L{dftx.cache.LocalCache}.
    @ivar ports: the online ports (the OVSDB monitor's C{ports}), by uuid.
    @ivar counters: updates, port_status_writes, port_status_errors,
        chassis_writes, chassis_errors, ha_topologies (the mirror has its
        own).
    """

    name = "dfcontroller"
    role = LOCAL_CONTROLLER
    extra_topics = frozenset({HA_TOPIC})

    def __init__(self, config: dfconfig.Config, reactor: Any = None) -> None:
        lc = config.df_local_controller
        super().__init__(config, lc.tables, lc.topics, reactor)
        self.chassis = lc.chassis_name
        self.cache = self.mirror.cache
        self.nb: NbApi | None = None
        self.monitor: Any = None
        self.root.v1.putChild(b"ports", http.JsonLeaf(self.online_ports))
        self._sync_loop: task.LoopingCall | None = None
        # This node's own rows waiting to be written: (table, key) -> value.
        self._own_writes: dict[tuple[str, str], str] = {}
        self._own_flush: defer.Deferred[None] | None = None
        self._own_retry: Any = None

    # --- the in-process API for local applications ----------------------------------

    def add_observer(self, observer: Observer) -> None:
        """Call C{observer(update)} with every change made to the cache
        (see L{dftx.cache.Mirror.add_observer})."""
        self.mirror.add_observer(observer)

    def remove_observer(self, observer: Observer) -> None:
        self.mirror.remove_observer(observer)

    @deferred
    async def register_topic(self, topic: str) -> None:
        """
        Subscribe to a tenant topic and load its rows (before start: it is
        subscribed at start).

        @return: Deferred firing with None once they are in the cache;
            failing with L{dftx.errors.InvalidNameError} for a reserved
            topic (C{"D"}, or C{"redis"}, the HA topic) or one the NB DB
            cannot store.
        """
        check_tenant_topic(topic)
        if self.subscriber is None:
            self.mirror.topics.add(topic)
            return
        await self.subscriber.register_topic(topic)
        await self.mirror.add_topic(topic)

    @deferred
    async def unregister_topic(self, topic: str) -> None:
        """
        Unsubscribe from a tenant topic and drop its rows (observers see
        their deletion; before start, it is only not subscribed at start).

        @return: Deferred firing with None once done; failing with
            L{dftx.errors.InvalidNameError} for a reserved topic.
        """
        check_tenant_topic(topic)
        if self.subscriber is not None:
            await self.subscriber.unregister_topic(topic)
        self.mirror.remove_topic(topic)

    def resync(self, topics: Iterable[str] | None = None) -> defer.Deferred[None]:
        """Make the cache equal to the database (see L{dftx.cache.Mirror.resync}).
        @return: Deferred firing with None once a resync has run."""
        return self.mirror.resync(topics)

    def online_ports(self) -> list[dict[str, Any]]:
        """The fields of every port online now (C{GET /v1/ports})."""
        return [port_fields(e) for e in self.ports.values()]

    @property
    def ports(self) -> dict[str, Any]:
        """The ports the OVSDB monitor reports online, by uuid."""
        return self.monitor.ports if self.monitor is not None else {}

    # --- life cycle -----------------------------------------------------------------

    async def _bound(self) -> None:
        """Write this node's chassis row through its own publisher."""
        self.nb = NbApi(self.db, self.publisher)
        await self.nb.create(CHASSIS_TABLE, self.chassis, self._chassis_row())

    async def _loaded(self) -> None:
        """Start the periodic resync and the OVSDB monitor."""
        lc = self.settings
        self._sync_loop = task.LoopingCall(self.mirror.resync_changed)
        self._sync_loop.clock = self.reactor
        self._sync_loop.start(lc.db_sync_time, now=False)
        self._start_monitor(lc.ovsdb_connection)
        log.info("dfcontroller {chassis} ready: {rows} rows of {tables}, topics {topics}",
                 chassis=self.chassis, rows=len(self.cache), tables=sorted(self.cache.tables),
                 topics=sorted(self.mirror.topics))

    def _start_monitor(self, endpoint: str) -> None:
        from dftx.ovsdb.monitor import InterfaceMonitor

        self.monitor = InterfaceMonitor(endpoint, self._port_event,
                                        on_sync_end=self._ovsdb_synced, reactor=self.reactor)
        self.monitor.startService()

    async def _stopping(self) -> None:
        if self._sync_loop is not None and self._sync_loop.running:
            self._sync_loop.stop()
        if self._own_retry is not None and self._own_retry.active():
            self._own_retry.cancel()
        if self.monitor is not None:
            await self.monitor.stopService()

    # --- updates ----------------------------------------------------------------------

    def _received(self, update: DbUpdate) -> None:
        """HA topologies are applied; everything else goes to discovery and
        the mirror, and a C{dbrestart} also makes it write its own rows again."""
        self.counters["updates"] += 1
        if update.topic == HA_TOPIC:
            self._ha_message(update)
            return
        if update.action == DBRESTART:
            self._reannounce()
        super()._received(update)

    def _ha_message(self, update: DbUpdate) -> None:
        topology = topology_from_update(update)
        client = getattr(self.db, "client", None)
        if topology is None or client is None:
            return
        self.counters["ha_topologies"] += 1
        if topology != client.topology:
            log.info("HA: Redis topology {topology}", topology=topology)
            client.apply_topology(topology)
        self.mirror.resync()

    # --- ports --------------------------------------------------------------------------

    def _port_event(self, event: Any) -> None:
        if event.kind == "vm" and event.iface_id:
            status = "down" if event.action == "offline" else "up"
            self._set_port_status(event.iface_id, status, event.ofport)

    def _chassis_row(self) -> str:
        return json.dumps({"id": self.chassis, "ip": self.config.df.management_ip},
                          sort_keys=True)

    def _reannounce(self) -> None:
        """Write this node's own rows again, its chassis row and every online
        VM port's row: a database failover may have lost the last writes,
        and a restart without persistence all of them."""
        self._write_own(CHASSIS_TABLE, self.chassis, self._chassis_row())
        for event in self.ports.values():
            if event.kind == "vm" and event.iface_id:
                self._set_port_status(event.iface_id, "up", event.ofport)

    def _ovsdb_synced(self) -> None:
        """After each initial OVSDB sync: rows of this chassis that say up
        for ports that are gone are set down."""
        self._mark_gone_ports_down().addErrback(
            lambda f: log.failure("checking port_status after OVSDB sync failed", f))

    @deferred
    async def _mark_gone_ports_down(self) -> None:
        present = {e.iface_id for e in self.ports.values() if e.kind == "vm" and e.iface_id}
        for _, key, value in await self.db.get_all_rows(PORT_STATUS_TABLE):
            try:
                row = json.loads(value)
            except ValueError:
                continue
            if (isinstance(row, dict) and row.get("chassis") == self.chassis
                    and row.get("status") == "up" and key not in present
                    and (PORT_STATUS_TABLE, key) not in self._own_writes):
                self._set_port_status(key, "down", row.get("ofport"))

    def _set_port_status(self, iface_id: str, status: str, ofport: Any) -> None:
        self._write_own(PORT_STATUS_TABLE, iface_id, json.dumps(
            {"status": status, "chassis": self.chassis, "ofport": ofport}, sort_keys=True))

    def _write_own(self, table: str, key: str, value: str) -> None:
        """Write one of this node's own rows through the NB API, soon and
        until it succeeds (only the latest value of a row is written)."""
        self._own_writes[table, key] = value
        if self._own_flush is None:
            self._own_flush = self._flush_own()

    @deferred
    async def _flush_own(self) -> None:
        """Write pending rows one at a time; on a failure, retry them all a
        second later."""
        try:
            while self._own_writes and self.running:
                row = next(iter(self._own_writes))
                table, key = row
                value = self._own_writes[row]
                try:
                    await self.nb.create(table, key, value)  # type: ignore[union-attr]
                except DftxError as e:
                    self.counters[f"{table}_errors"] += 1
                    log.warn("writing {table} {key} failed (retrying): {error}",
                             table=table, key=key, error=e)
                    self._own_retry = self.reactor.callLater(1.0, self._retry_own)
                    return
                self.counters[f"{table}_writes"] += 1
                if self._own_writes.get(row) == value:
                    del self._own_writes[row]
        finally:
            self._own_flush = None

    def _retry_own(self) -> None:
        if self._own_flush is None and self.running:
            self._own_flush = self._flush_own()

    # --- IStatusSource --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "chassis": self.chassis,
            "cache": {t: len(self.cache.rows(t)) for t in sorted(self.cache.tables)},
            "ports_online": len(self.ports),
        }

    def _counters(self) -> dict[str, int]:
        return {**super()._counters(), **self.mirror.counters}

    def metrics(self) -> list[Metric]:
        sub = self.subscriber.counters if self.subscriber else {}
        rows = Metric("dftx_cache_rows", "gauge", "Rows in the local cache, by table.")
        for table in sorted(self.cache.tables):
            rows.add(len(self.cache.rows(table)), table=table)
        subscriber = Metric("dftx_subscriber_messages_total", "counter",
                            "Messages the subscriber received, by outcome.")
        for outcome in ("delivered", "filtered", "undecodable", "duplicates", "gaps",
                        "restarts", "callback_errors"):
            subscriber.add(sub.get(outcome, 0), outcome=outcome)
        return [
            *super().metrics(),
            rows,
            subscriber,
            Metric("dftx_resyncs_total", "counter", "Resyncs with the NB DB, by result.")
            .add(self.mirror.counters["resyncs"], result="ok")
            .add(self.mirror.counters["resync_errors"], result="error"),
            Metric("dftx_cache_changes_total", "counter",
                   "Changes made to the cache (updates and resyncs).").add(
                self.mirror.counters["changes"]),
            Metric("dftx_ports_online", "gauge", "Ports the OVSDB monitor reports online.").add(
                len(self.ports)),
            Metric("dftx_port_status_writes_total", "counter",
                   "port_status rows written, by result.")
            .add(self.counters["port_status_writes"], result="ok")
            .add(self.counters["port_status_errors"], result="error"),
        ]


PORT_FIELDS = ("kind", "action", "uuid", "name", "type", "ofport", "iface_id", "attached_mac",
               "remote_ip", "tunnel_type", "peer", "admin_state")


def port_fields(event: Any) -> dict[str, Any]:
    """The fields of a PortEvent as a JSON-ready dict."""
    return {f: getattr(event, f) for f in PORT_FIELDS}


def makeService(options: runner.Options, reactor: Any) -> ControllerService:
    """twistd's entry point (see L{dftx.runner.make_service})."""
    return runner.make_service(options, reactor, ControllerService)


Options = runner.Options
