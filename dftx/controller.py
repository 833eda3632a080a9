"""
The local controller, C{twistd -n dfcontroller --config FILE} (role
df_local_controller): what a compute node runs.

At start it connects to the NB database, binds its own publisher, writes
its chassis row (table C{chassis}, key C{chassis_name}, value JSON
C{{"id", "ip"}}), registers that publisher (with ZeroMQ, also finding the
publisher services through table C{publisher}), subscribes to C{"D"}, the
configured tenant topics and the HA topic, and loads every table it serves
into its L{LocalCache} (per table, one read of each topic's slot: "D" and
its tenant topics).  It is
ready (C{/healthz} 200) once subscribed and loaded.

Updates are applied to the cache in the order they arrive (per publisher
and topic, the order they were sent) and each real change is passed to the
observers (L{ControllerService.add_observer}), the in-process API of the
applications running on the node.

A resync diffs the cache against the database and reports only real
differences.  It runs on a C{dbrestart} (everything, or only the topics on
the slots it says lost data: L{dftx.ha.restart_slots}), a C{sync} or a seq
gap (that topic, or everything), an HA topology message (the topics on the
slots that changed owner, after moving the database connections to the new
masters: none when nothing of this node moved), every C{db_sync_time}
seconds (everything), and when a topic is registered (that topic).  The
first three reach every controller at once, so each waits a random delay
within a window that grows with the fleet before it reads (L{dftx.spread};
C{resync_spread}, C{fleet_resync_rate}); updates are applied meanwhile.
Requests that arrive while one runs are merged into the next run; a resync
that fails (database unreachable during a failover) is retried with a
growing delay.

The OVSDB monitor turns VM ports into rows of table C{port_status} (key
the iface-id, value JSON C{{"status": "up"|"down", "chassis", "ofport"}}),
written through L{dftx.nb.NbApi} and so published on the controller's own
publisher, where the neutron-server side receives them.  After each
initial OVSDB sync, rows of this chassis that say C{up} for ports no
longer present are set C{down}; writes that fail are retried.  On a
C{dbrestart} (one whose lost slots hold them), with its resync, the chassis
row and the rows of online ports are written again.

With C{[df] zmq_curve}, the controller's publisher is a CURVE server (only
C{zmq_curve_allowed_keys} may subscribe) and its subscriber a CURVE client
that authenticates each publisher service by the key in its registration
row (or C{zmq_curve_server_keys}); see doc/security.md.
"""

from __future__ import annotations

import json
import random
from typing import Any, Iterable

from prometheus_client import Histogram, Metric
from twisted.internet import defer, task
from twisted.logger import Logger

from dftx import config as dfconfig
from dftx import http, runner
from dftx.cache import Observer
from dftx.config_values import check_tenant_topic
from dftx.deferreds import deferred
from dftx.ha import HA_TOPIC, restart_slots, topology_from_update
from dftx.http import LATENCY_BUCKETS, counter, gauge
from dftx.nb import NbApi
from dftx.own_rows import OwnRows
from dftx.registry import DFTX_PUBLISHER_TABLE, PUBLISHER_TABLE
from dftx.redis.slots import SLOTS
from dftx.service import RoleService
from dftx.spread import Scope, Spread, spread_window, topics_on_slots
from dftx.update import (
    DBRESTART, LOCAL_CONTROLLER, NEUTRON_SERVER, PORT_STATUS_TABLE, SEND_ALL_TOPIC, DbUpdate,
)

__all__ = ["CHASSIS_TABLE", "ControllerService", "Options", "makeService", "port_fields"]

log = Logger()

CHASSIS_TABLE = "chassis"


class ControllerService(RoleService):
    """
    The dfcontroller service for a loaded L{dftx.config.Config}, run with
    C{reactor} (an embedding application may omit it: the global reactor);
    C{rng} (a C{random.Random}, default one seeded by the operating system)
    draws the delays of spread resyncs.

    @ivar mirror: the L{dftx.cache.Mirror} of the tables in
        [df_local_controller] tables; C{mirror.cache} (also L{cache}) is the
        L{dftx.cache.LocalCache}.
    @ivar ports: the online ports (the OVSDB monitor's C{ports}), by uuid.
    @ivar counters: updates, port_status_writes, port_status_errors,
        chassis_writes, chassis_errors, ha_topologies, resync_triggers
        (dbrestart, sync and HA messages that asked for a spread resync),
        resync_triggers_skipped (those that touched nothing of this node),
        spread_resyncs (spread resyncs run); the mirror has its own.
    @ivar nb_write_seconds: histogram of its own rows' writes through
        L{NbApi}, from the database write to the publish acknowledged.
    @ivar nb_publish_seconds: histogram of the same, from the database
        write acknowledged to the publish acknowledged.
    """

    name = "dfcontroller"
    role = LOCAL_CONTROLLER
    extra_topics = frozenset({HA_TOPIC})

    def __init__(self, config: dfconfig.Config, reactor: Any = None,
                 rng: random.Random | None = None) -> None:
        lc = config.df_local_controller
        super().__init__(config, lc.tables, lc.topics, reactor)
        self._spread = Spread(self._spread_resync, self.resync_window, self.reactor, rng)
        self._reannounce_due = False
        self._rediscover_due = False
        self.chassis = lc.chassis_name
        self.cache = self.mirror.cache
        self.nb: NbApi | None = None
        self.monitor: Any = None
        self.root.v1.putChild(b"ports", http.JsonLeaf(self.online_ports))
        self.nb_write_seconds = Histogram(
            "dftx_nb_write_seconds", "This node's own rows (port_status, chassis) written "
            "through NbApi: from the NB DB write to the publish acknowledged.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.nb_publish_seconds = Histogram(
            "dftx_nb_publish_seconds", "The same writes, from the NB DB write acknowledged to "
            "the publish acknowledged.", buckets=LATENCY_BUCKETS, registry=self.registry)
        self._sync_loop: task.LoopingCall | None = None
        self.own_rows = OwnRows(self.reactor, self.counters)

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
        self.nb = NbApi(self.db, self.publisher, on_written=self._nb_written,
                        clock=self.reactor)
        await self.nb.create(CHASSIS_TABLE, self.chassis, self._chassis_row())
        self.own_rows.start(self.nb)

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
        self._spread.cancel()
        if self._sync_loop is not None and self._sync_loop.running:
            self._sync_loop.stop()
        self.own_rows.stop()
        if self.monitor is not None:
            await self.monitor.stopService()

    # --- updates ----------------------------------------------------------------------

    def _received(self, update: DbUpdate) -> None:
        """HA topologies are applied; everything else goes to discovery and
        the mirror, control events through L{_control}."""
        self.counters["updates"] += 1
        if update.topic == HA_TOPIC:
            self._ha_message(update)
            return
        super()._received(update)

    def _control(self, update: DbUpdate) -> None:
        """A C{dbrestart} resyncs the topics on the slots it says lost data
        (all without that), and writes this node's rows again and reads the
        publisher registry again when theirs are among them; a C{sync}
        resyncs its topic (None: all) and reads the registry again.  Spread
        (see L{resync_window})."""
        if update.action != DBRESTART:
            self._trigger(None if update.topic is None else {update.topic} & self.mirror.topics,
                          rediscover=True)
            return
        lost = restart_slots(update)
        if lost is None:
            self._trigger(None, own_rows=True, rediscover=True)
        else:
            own = topics_on_slots((CHASSIS_TABLE, PORT_STATUS_TABLE), [SEND_ALL_TOPIC], lost)
            registry = (topics_on_slots([PUBLISHER_TABLE], [SEND_ALL_TOPIC], lost)
                        | topics_on_slots([DFTX_PUBLISHER_TABLE], [NEUTRON_SERVER], lost))
            self._trigger(topics_on_slots(self.cache.tables, self.mirror.topics, lost),
                          own_rows=bool(own), rediscover=bool(registry))

    def _ha_message(self, update: DbUpdate) -> None:
        """Route by the new topology at once; resync (spread) the topics on
        the slots whose master changed."""
        topology = topology_from_update(update)
        client = getattr(self.db, "client", None)
        if topology is None or client is None:
            return
        self.counters["ha_topologies"] += 1
        old = client.topology
        if topology == old:
            moved: set[int] = set()
        else:
            log.info("HA: Redis topology {topology}", topology=topology)
            moved = set(range(SLOTS) if old is None else old.moved_slots(topology))
            client.apply_topology(topology)
        self._trigger(topics_on_slots(self.cache.tables, self.mirror.topics, moved))

    def _trigger(self, scope: Scope, own_rows: bool = False, rediscover: bool = False) -> None:
        """Resync C{scope} (write this node's own rows again, read the
        publisher registry again) after a random delay, merged with any
        already waiting; nothing when the trigger touched nothing of this
        node."""
        if scope is not None and not scope and not own_rows and not rediscover:
            self.counters["resync_triggers_skipped"] += 1
            return
        self.counters["resync_triggers"] += 1
        self._reannounce_due |= own_rows
        self._rediscover_due |= rediscover
        self._spread.request(scope)

    def _spread_resync(self, scope: Scope) -> None:
        """The delay is over: write own rows again if asked, resync C{scope}."""
        self.counters["spread_resyncs"] += 1
        if self._reannounce_due:
            self._reannounce_due = False
            self._reannounce()
        if self._rediscover_due:
            self._rediscover_due = False
            if self.discovery is not None:
                self.discovery.refresh()
        if scope is None or scope:
            self.mirror.resync(scope)

    def resync_window(self) -> float:
        """
        Seconds over which the fleet spreads a resync it is told to make at
        once: C{fleet / fleet_resync_rate}, at least C{resync_spread}, where
        the fleet is the rows of the cached table C{chassis} (each
        controller writes one; 1 when the table is not cached).
        """
        lc = self.settings
        fleet = len(self.cache.rows(CHASSIS_TABLE)) if CHASSIS_TABLE in self.cache.tables else 1
        return spread_window(lc.resync_spread, fleet, lc.fleet_resync_rate)

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
        self.own_rows.write(CHASSIS_TABLE, self.chassis, self._chassis_row())
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
        for key, value in await self.db.get_topic_rows(PORT_STATUS_TABLE, None):
            try:
                row = json.loads(value)
            except ValueError:
                continue
            if (isinstance(row, dict) and row.get("chassis") == self.chassis
                    and row.get("status") == "up" and key not in present
                    and (PORT_STATUS_TABLE, key) not in self.own_rows.pending):
                self._set_port_status(key, "down", row.get("ofport"))

    def _set_port_status(self, iface_id: str, status: str, ofport: Any) -> None:
        self.own_rows.write(PORT_STATUS_TABLE, iface_id, json.dumps(
            {"status": status, "chassis": self.chassis, "ofport": ofport}, sort_keys=True))

    # --- IStatusSource --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "chassis": self.chassis,
            "cache": {t: len(self.cache.rows(t)) for t in sorted(self.cache.tables)},
            "ports_online": len(self.ports),
            "resync_spread": {"window": self.resync_window(), "due": self._spread.due},
        }

    def _counters(self) -> dict[str, int]:
        return {**super()._counters(), **self.mirror.counters}

    def _nb_written(self, seconds: float, publish_seconds: float) -> None:
        self.nb_write_seconds.observe(seconds)
        self.nb_publish_seconds.observe(publish_seconds)

    def metrics(self) -> list[Metric]:
        sub = self.subscriber.counters if self.subscriber else {}
        outcomes = ("delivered", "filtered", "undecodable", "duplicates", "gaps", "restarts",
                    "callback_errors")
        return [
            *super().metrics(),
            gauge("dftx_cache_rows", "Rows in the local cache, by table.",
                  by=("table", {t: len(self.cache.rows(t)) for t in sorted(self.cache.tables)})),
            counter("dftx_subscriber_messages_total",
                    "Messages the subscriber received, by outcome.",
                    by=("outcome", {o: sub.get(o, 0) for o in outcomes})),
            counter("dftx_resyncs_total", "Resyncs with the NB DB, by result.",
                    by=("result", {"ok": self.mirror.counters["resyncs"],
                                   "error": self.mirror.counters["resync_errors"]})),
            counter("dftx_cache_changes_total",
                    "Changes made to the cache (updates and resyncs).",
                    self.mirror.counters["changes"]),
            gauge("dftx_ports_online", "Ports the OVSDB monitor reports online.",
                  len(self.ports)),
            counter("dftx_port_status_writes_total", "port_status rows written, by result.",
                    by=("result", {"ok": self.counters["port_status_writes"],
                                   "error": self.counters["port_status_errors"]})),
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
