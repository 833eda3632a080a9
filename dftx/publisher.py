"""
The publisher service, C{twistd -n dfpublisher --config FILE} (role
neutron_server), one per neutron-server host.

It reads [df], [df_redis] and [neutron_server]; with C{pub_sub_driver =
zmq} it binds a PUB socket on C{publisher_bind_address:publisher_port},
and, with C{pub_sub_use_multiproc}, a PULL socket on the ipc path
C{publisher_multiproc_socket} whose messages (from the API workers' PUSH
sockets) it re-publishes unchanged.  It registers itself in table
C{publisher} with role neutron_server, refreshes its row every
C{publisher_timeout / 3} seconds and deletes every publisher row not
refreshed for C{publisher_timeout}.  It serves C{/healthz}, C{/metrics} and
C{/v1/status} on C{http_endpoint}.

With the Redis NB driver it also runs the HA watcher (L{dftx.ha}): the
cluster topology is published on topic C{"redis"} when it changes, and a
change of masters is followed by a C{dbrestart} on C{"D"} so that every
controller resyncs.  It subscribes to the local controllers' publishers
(found through table C{publisher}, role df_local_controller) and mirrors
table C{port_status}, served at C{/v1/tables/port_status}; an embedding
application can observe it (C{service.port_status.add_observer}).

With C{[df] zmq_curve} the PUB socket is a CURVE server that serves only
the client keys of C{zmq_curve_allowed_keys}, the registration row carries
its public key, and the subscriber authenticates the controllers'
publishers (see doc/security.md).  The ipc relay is protected by its file's
permissions (0660), not by CURVE.

With C{pub_sub_driver = redis} or C{redis_sharded} there is nothing to
bind or relay: the watcher publishes and the mirror subscribes through
Redis.

On SIGTERM it deletes its row (announcing the deletion to its
subscribers), closes its sockets and removes the ipc file.  When it cannot
start (database unreachable, address in use), it logs why and exits with
status 1.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger

from dftx import config as dfconfig
from dftx import http, pubsub, runner
from dftx.cache import Mirror
from dftx.ha import ClusterWatcher
from dftx.http import Metric
from dftx import db as nb_db
from dftx.nb import NbApi
from dftx.pubsub.registry import PUBLISHER_TABLE, Discovery, Registration
from dftx.pubsub.zmq import ZmqPublisher, ZmqRelay
from dftx.update import PORT_STATUS_TABLE, DbUpdate

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


class PublisherService(runner.RoleService):
    """
    The dfpublisher service for a loaded L{dftx.config.Config}.
    L{exit_code} is 1 once starting failed.

    @ivar port_status: the L{Mirror} of table C{port_status}.
    """

    name = "dfpublisher"

    def __init__(self, config: dfconfig.Config) -> None:
        super().__init__(config)
        self.db = nb_db.from_config(config)
        self.port_status = Mirror(self.db, [PORT_STATUS_TABLE])
        self.publisher: Any = None
        self.relay: ZmqRelay | None = None
        self.registration: Registration | None = None
        self.subscriber: Any = None
        self.discovery: Discovery | None = None
        self.watcher: ClusterWatcher | None = None
        self.root = http.StatusRoot(self)
        self.root.v1.putChild(b"tables", http.Tables(self.port_status.cache.values))
        self._http_port: Any = None

    # --- lifecycle ---------------------------------------------------------------

    async def _start(self) -> None:
        cfg, ns = self.config, self.config.neutron_server
        self._http_port = await http.listen(ns.http_endpoint, self.root)
        self.missing = "NB database not connected"
        await self.db.initialize()
        self.missing = "publisher not bound"
        bind = zmq_address(ns.publisher_bind_address, ns.publisher_port)
        self.publisher = pubsub.from_config(cfg, bind=bind).get_publisher()
        await self.publisher.initialize()
        if isinstance(self.publisher, ZmqPublisher) and ns.pub_sub_use_multiproc:
            path = ns.publisher_multiproc_socket
            # A new directory: only the owner and its group reach the socket
            # (the relay then makes the socket file itself 0660).
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            self.relay = ZmqRelay(f"ipc://{path}", self.publisher)
            self.relay.start()
        self.missing = "not registered"
        uri = advertised_uri(ns.publisher_bind_address, ns.publisher_port, cfg.df.management_ip)
        self.registration = Registration(
            self.db, self.publisher.id, uri, dfconfig.NEUTRON_SERVER,
            cfg.df.publisher_timeout, publisher=self.publisher, clean_stale=True,
            curve_public_key=getattr(self.publisher, "public_key", None))
        self.registration.startService()
        await self.registration.started
        self.missing = "not subscribed"
        self.subscriber = pubsub.from_config(cfg).get_subscriber()
        await self.subscriber.register_topic("D")
        await self.subscriber.initialize(self._received)
        if pubsub.needs_discovery(cfg):
            self.discovery = Discovery(self.db, self.subscriber, dfconfig.NEUTRON_SERVER,
                                       cfg.df.publisher_timeout)
            self.discovery.startService()
            await self.discovery.ready
        self.missing = "initial load"
        await self.port_status.resync()
        client = getattr(self.db, "client", None)
        if client is not None:
            nb = NbApi(self.db, self.publisher)
            self.watcher = ClusterWatcher(client, self.publisher,
                                          cfg.df_redis.cluster_watch_interval,
                                          on_failover=nb.db_restart)
            self.watcher.startService()
        self.missing = None
        log.info("dfpublisher {id} publishing on {uri}{relay}", id=self.publisher.id, uri=uri,
                 relay=f", relaying ipc://{ns.publisher_multiproc_socket}" if self.relay else "")

    def _received(self, update: DbUpdate) -> None:
        if self.discovery is not None and (update.is_control or update.table == PUBLISHER_TABLE):
            self.discovery.observe(update)
        self.port_status.received(update)

    async def _stop(self) -> None:
        if self.watcher is not None and self.watcher.running:
            await self.watcher.stopService()
        if self.discovery is not None and self.discovery.running:
            await self.discovery.stopService()
        if self.subscriber is not None:
            await self.subscriber.close()
        await self.port_status.close()
        if self.registration is not None and self.registration.running:
            await self.registration.stopService()
        if self.relay is not None:
            await self.relay.close()
        if self.publisher is not None:
            await self.publisher.close()
        if self._http_port is not None:
            await self._http_port.stopListening()
        await self.db.close()

    # --- IStatusSource -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        topology = getattr(getattr(self.db, "client", None), "topology", None)
        reg = self.registration
        sub = self.subscriber
        return {
            "role": dfconfig.NEUTRON_SERVER,
            "ready": self.missing is None,
            "not_ready": self.missing,
            "publisher": None if reg is None else {
                "id": reg.id, "uri": reg.uri,
                "bound": getattr(self.publisher, "uri", None),
            },
            "relay": None if self.relay is None else self.relay.address,
            "curve": curve_status(self.publisher),
            "cluster": topology.as_dict() if topology is not None else None,
            "subscriptions": {
                "topics": sorted(sub.topics) if sub else [],
                "publishers": sorted(sub.addresses) if sub else [],
            },
            "port_status_rows": len(self.port_status.cache),
            "counters": self._counters(),
        }

    def _counters(self) -> dict[str, int]:
        counters: dict[str, int] = {}
        if self.relay is not None:
            counters.update({f"relay_{k}": v for k, v in self.relay.counters.items()})
        if self.registration is not None:
            counters["registry_refreshes"] = self.registration.refreshes
            counters["registry_stale_removed"] = len(self.registration.removed)
        if self.watcher is not None:
            counters.update({f"ha_{k}": v for k, v in self.watcher.counters.items()})
        if self.subscriber is not None:
            counters.update({f"subscriber_{k}": v for k, v in self.subscriber.counters.items()})
        counters.update({f"port_status_{k}": v for k, v in self.port_status.counters.items()})
        return counters

    def metrics(self) -> list[Metric]:
        relay = self.relay.counters if self.relay else {}
        reg = self.registration
        return [
            Metric("dftx_ready", "gauge", "1 once the service is ready.").add(
                int(self.missing is None), role=dfconfig.NEUTRON_SERVER),
            Metric("dftx_relay_messages_total", "counter",
                   "Messages the relay received over ipc, by outcome.")
            .add(relay.get("relayed", 0), result="relayed")
            .add(relay.get("malformed", 0), result="malformed")
            .add(relay.get("publish_errors", 0), result="publish_error"),
            Metric("dftx_publisher_queued_messages", "gauge",
                   "Messages waiting in the PUB socket's local queue.").add(
                getattr(self.publisher, "queued", 0)),
            Metric("dftx_ha_topologies_published_total", "counter",
                   "Redis topologies the HA watcher published.").add(
                self.watcher.counters["published"] if self.watcher else 0),
            Metric("dftx_port_status_rows", "gauge",
                   "Rows of table port_status mirrored here.").add(len(self.port_status.cache)),
            Metric("dftx_registry_refreshes_total", "counter",
                   "Refreshes of this publisher's row.").add(reg.refreshes if reg else 0),
            Metric("dftx_registry_stale_removed_total", "counter",
                   "Stale publisher rows this service deleted.").add(
                len(reg.removed) if reg else 0),
        ]


def makeService(options: runner.Options) -> PublisherService:
    """twistd's entry point (see L{dftx.runner.make_service})."""
    return runner.make_service(options, dfconfig.NEUTRON_SERVER, PublisherService)


Options = runner.Options
