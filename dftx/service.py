"""
What the two services, dfcontroller (L{dftx.controller}) and dfpublisher
(L{dftx.publisher}), share: L{RoleService}, their life cycle and what they
both report, and the ZeroMQ addresses they bind and advertise.

Both run the same steps, in this order, with the settings of their role's
section ([df_local_controller] or [neutron_server]):

 1. serve C{/healthz}, C{/metrics} and C{/v1/...} on C{http_endpoint};
 2. connect the NB database;
 3. bind their own publisher on C{publisher_bind_address:publisher_port};
 4. their own step (L{RoleService._bound}): the controller writes its
    chassis row, the publisher service starts its ipc relay;
 5. register that publisher (L{dftx.registry});
 6. subscribe to the topics of their L{dftx.cache.Mirror} (and, with
    ZeroMQ, find the other role's publishers through the registry);
 7. load the mirror from the database, then their own step
    (L{RoleService._loaded}): the controller's periodic resync and OVSDB
    monitor, the publisher service's HA watcher.

Until the last step is done, C{/healthz} says which one is missing.  They
stop in the reverse order, their own things first.

Both have a C{prometheus_client} registry of their own (L{RoleService.registry}):
C{dftx_ready}, C{dftx_build_info}, the delivery lag of the updates they
receive (C{dftx_delivery_lag_seconds}, from the send time the publisher
stamped), the duration of their mirror's resyncs (C{dftx_resync_seconds}),
the process metrics and each service's own.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from prometheus_client import Histogram, Metric
from twisted.application import service
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dftx import __version__, http, pubsub
from dftx import config as dfconfig
from dftx.cache import Mirror
from dftx.deferreds import deferred, or_global_reactor
from dftx.db import from_config as db_from_config
from dftx.http import LATENCY_BUCKETS, IStatusSource, gauge
from dftx.registry import PUBLISHER_TABLE, Discovery, Registration
from dftx.update import DbUpdate

__all__ = ["RoleService", "advertised_uri", "curve_status", "zmq_address"]

log = Logger()


def zmq_address(host: str, port: int) -> str:
    """C{tcp://host:port}, an IPv6 host in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def advertised_uri(bind_address: str, port: int, management_ip: str) -> str:
    """
    The uri others connect to: the bind address, or C{management_ip} when
    it binds every address (0.0.0.0 or ::).
    """
    host = management_ip if bind_address in ("0.0.0.0", "::") else bind_address
    return zmq_address(host, port)


def curve_status(publisher: Any) -> dict[str, Any] | None:
    """What /v1/status says about CURVE (public data only); None without it."""
    settings = getattr(publisher, "curve", None)
    if settings is None:
        return None
    return {
        "public_key": publisher.public_key,
        "allowed_client_keys": len(settings.allowed),
        "trusted_server_keys": None if settings.servers is None else len(settings.servers),
        "clients": publisher.curve_counters,
    }


@implementer(IStatusSource)
class RoleService(service.Service):
    """
    A service of role L{role} for a loaded L{dftx.config.Config}, which
    runs the steps of the module docstring.  When starting fails, the
    reason is logged, the reactor stopped and L{exit_code} set to 1.
    L{ready} says what is still missing (None once ready), as C{/healthz}
    reports it; L{status} and L{metrics} what both services report, which
    each extends with its own.

    A subclass sets L{name}, L{role}, L{clean_stale} and L{extra_topics},
    and adds its own steps in L{_bound}, L{_loaded} and L{_stopping}.

    @param tables: the tables its L{mirror} keeps.
    @param topics: the tenant topics the mirror keeps beyond C{"D"}.
    @param reactor: the reactor it runs with (its clock, its listening
        ports); an embedding application may omit it (the global reactor).

    @ivar mirror: the L{Mirror} its subscriber keeps up to date.
    @ivar counters: the service's own counters (in C{/v1/status}).
    @ivar registry: its C{prometheus_client} registry (C{/metrics}).
    @ivar root: its HTTP resource; C{/v1/tables/<table>} serves the mirror.
    """

    name: str
    role: str
    clean_stale = False
    """Whether its registration also deletes stale publisher rows."""
    extra_topics: frozenset[str] = frozenset()
    """Topics it subscribes to that its mirror does not keep."""

    def __init__(self, config: dfconfig.Config, tables: Iterable[str],
                 topics: Iterable[str] = (), reactor: Any = None) -> None:
        reactor = or_global_reactor(reactor)  # an embedding application may omit it
        self.config = config
        self.reactor = reactor
        self.settings: Any = getattr(config, self.role)
        self.exit_code = 0
        self.missing: str | None = "starting"
        self.db = db_from_config(config, self.reactor)
        self.registry = http.registry_for(self)
        self.delivery_lag = Histogram(
            "dftx_delivery_lag_seconds", "From the publisher's send time (its clock) to the "
            "update's arrival here, for updates that carry one.", buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.resync_seconds = Histogram(
            "dftx_resync_seconds", "Resyncs of the local mirror with the NB DB, by result.",
            ["result"], buckets=LATENCY_BUCKETS, registry=self.registry)
        for result in ("ok", "error"):
            self.resync_seconds.labels(result)
        self.mirror = Mirror(self.db, tables, topics, reactor, on_resync=self._resynced)
        self.counters: Counter[str] = Counter()
        self.publisher: Any = None
        self.subscriber: Any = None
        self.registration: Registration | None = None
        self.discovery: Discovery | None = None
        self.root = http.StatusRoot(self)
        self.root.v1.putChild(b"tables", http.Tables(self.mirror.cache.values))
        self._http_port: Any = None

    # --- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._start().addErrback(self._fatal)

    @deferred
    async def _start(self) -> None:
        cfg, own = self.config, self.settings
        self._http_port = await http.listen(self.reactor, own.http_endpoint, self.root)
        self.missing = "NB database not connected"
        await self.db.initialize()
        self.missing = "publisher not bound"
        bind = zmq_address(own.publisher_bind_address, own.publisher_port)
        self.publisher = pubsub.from_config(cfg, bind=bind, reactor=self.reactor).get_publisher()
        await self.publisher.initialize()
        self.missing = "not registered"
        await self._bound()
        uri = advertised_uri(own.publisher_bind_address, own.publisher_port,
                             cfg.df.management_ip)
        self.registration = Registration(
            self.db, self.publisher.id, uri, self.role, cfg.df.publisher_timeout,
            publisher=self.publisher, clean_stale=self.clean_stale, clock=self.reactor,
            curve_public_key=getattr(self.publisher, "public_key", None))
        self.registration.startService()
        await self.registration.started
        self.missing = "not subscribed"
        self.subscriber = pubsub.from_config(cfg, reactor=self.reactor).get_subscriber()
        for topic in sorted(self.mirror.topics | self.extra_topics):
            await self.subscriber.register_topic(topic)
        await self.subscriber.initialize(self._delivered)
        if pubsub.needs_discovery(cfg):
            self.discovery = Discovery(self.db, self.subscriber, self.role,
                                       cfg.df.publisher_timeout, clock=self.reactor)
            self.discovery.startService()
            await self.discovery.ready
        self.missing = "initial load"
        await self.mirror.resync()
        await self._loaded()
        self.missing = None

    async def _bound(self) -> None:
        """The service's own step once its publisher is bound."""

    async def _loaded(self) -> None:
        """The service's own step once the mirror is loaded (the last)."""

    def _fatal(self, failure: Failure) -> None:
        log.critical("{name} cannot start: {error}", name=self.name,
                     error=failure.getErrorMessage())
        self.exit_code = 1
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    @deferred
    async def stopService(self) -> None:
        """@return: Deferred firing with None once everything is closed."""
        super().stopService()
        self.missing = "stopping"
        await self._stopping()
        if self.discovery is not None and self.discovery.running:
            await self.discovery.stopService()
        if self.subscriber is not None:
            await self.subscriber.close()
        await self.mirror.close()
        if self.registration is not None and self.registration.running:
            await self.registration.stopService()
        if self.publisher is not None:
            await self.publisher.close()
        if self._http_port is not None:
            await self._http_port.stopListening()
        await self.db.close()

    async def _stopping(self) -> None:
        """The service's own step when it stops (the first)."""

    def _delivered(self, update: DbUpdate) -> None:
        """What the subscriber delivers: its lag observed, then L{_received}."""
        if update.sent is not None:
            self.delivery_lag.observe(max(0.0, self.reactor.seconds() - update.sent))
        self._received(update)

    def _resynced(self, seconds: float, ok: bool) -> None:
        self.resync_seconds.labels("ok" if ok else "error").observe(seconds)

    def _received(self, update: DbUpdate) -> None:
        """What the subscriber delivers: to discovery (control events and
        table C{publisher}), then control events to L{_control} and the rest
        to the mirror."""
        if update.is_control:
            self._control(update)
            return
        if self.discovery is not None and update.table == PUBLISHER_TABLE:
            self.discovery.observe(update)
        self.mirror.received(update)

    def _control(self, update: DbUpdate) -> None:
        """A C{dbrestart} or C{sync}: discovery reads the registry again and
        the mirror resyncs, at once (the controller, one of a fleet, spreads
        both)."""
        if self.discovery is not None:
            self.discovery.observe(update)
        self.mirror.received(update)

    # --- IStatusSource ----------------------------------------------------------------

    def ready(self) -> str | None:
        """None when ready, otherwise what is missing."""
        return self.missing

    def degraded(self) -> str | None:
        """None while the NB DB answers; otherwise why not: the last refresh
        of its registration (every publisher_timeout / 3 s) failed.  The
        service keeps serving meanwhile (C{/healthz} 200 C{degraded: ...})."""
        reg = self.registration
        return None if reg is None or reg.failing is None else f"NB database: {reg.failing}"

    def status(self) -> dict[str, Any]:
        """C{GET /v1/status}: role, dftx's version, readiness, C{degraded}, its
        registration, CURVE, the cluster topology, subscriptions, counters
        (L{_counters})."""
        topology = getattr(getattr(self.db, "client", None), "topology", None)
        reg, sub = self.registration, self.subscriber
        return {
            "role": self.role,
            "version": __version__,
            "ready": self.missing is None,
            "not_ready": self.missing,
            "degraded": self.degraded(),
            "publisher": None if reg is None else {"id": reg.id, "uri": reg.uri},
            "curve": curve_status(self.publisher),
            "cluster": topology.as_dict() if topology is not None else None,
            "subscriptions": {
                "topics": sorted(sub.topics) if sub else [],
                "publishers": sorted(sub.addresses) if sub else [],
            },
            "counters": self._counters(),
        }

    def _counters(self) -> dict[str, int]:
        """L{counters} and the subscriber's (as C{subscriber_*})."""
        sub = self.subscriber.counters if self.subscriber is not None else {}
        return {**self.counters, **{f"subscriber_{k}": v for k, v in sub.items()}}

    def metrics(self) -> list[Metric]:
        """The current values in C{GET /metrics}: C{dftx_ready},
        C{dftx_build_info}."""
        return [
            gauge("dftx_ready", "1 once the service is ready.",
                  by=("role", {self.role: int(self.missing is None)})),
            gauge("dftx_build_info", "dftx's version, as a label; the value is 1.",
                  by=("version", {__version__: 1})),
        ]
