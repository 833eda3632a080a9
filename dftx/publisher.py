"""
The publisher service, C{twistd -n dfpublisher --config FILE} (role
neutron_server), one per neutron-server host.

It reads [df], [df_redis] and [neutron_server]; with C{pub_sub_driver =
zmq} it binds a PUB socket on C{publisher_bind_address:publisher_port},
and, with C{pub_sub_use_multiproc}, a PULL socket on the ipc path
C{publisher_multiproc_socket} whose messages (from the API workers' PUSH
sockets) it re-publishes unchanged.  It registers itself (role
neutron_server: in table C{dftx_publisher}, and in Dragonflow's table
C{publisher}, where Dragonflow's controllers find it; L{dftx.registry}),
refreshes its rows every C{publisher_timeout / 3} seconds and deletes every
registry row not refreshed for C{publisher_timeout}.  It serves
C{/healthz}, C{/metrics} and C{/v1/status} on C{http_endpoint}.

With the Redis NB driver it also runs the HA watcher (L{dftx.ha}): the
cluster topology is published on topic C{"redis"} when it changes, and a
change of masters or a master's restart is followed by a C{dbrestart} on
C{"D"} that names the slots lost, so that every controller resyncs what
lives there.  It subscribes to the local controllers' publishers
(found in table C{dftx_publisher}, topic df_local_controller) and mirrors
table C{port_status}, served at C{/v1/tables/port_status}; an embedding
application can observe it (C{service.port_status.add_observer}).

With C{[df] zmq_curve} the PUB socket is a CURVE server that serves only
the client keys of C{zmq_curve_allowed_keys}, its registry row carries
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

from prometheus_client import Metric
from twisted.logger import Logger

from dftx import config as dfconfig
from dftx import runner
from dftx.ha import ClusterWatcher
from dftx.http import counter, gauge
from dftx.pubsub.zmq import ZmqPublisher
from dftx.pubsub.zmq_relay import ZmqRelay
from dftx.service import RoleService
from dftx.update import NEUTRON_SERVER, PORT_STATUS_TABLE

__all__ = ["Options", "PublisherService", "makeService"]

log = Logger()


class PublisherService(RoleService):
    """
    The dfpublisher service for a loaded L{dftx.config.Config}, run with
    C{reactor} (an embedding application may omit it: the global reactor).
    L{exit_code} is 1 once starting failed.

    @ivar port_status: the L{dftx.cache.Mirror} of table C{port_status}
        (its L{mirror}).
    """

    name = "dfpublisher"
    role = NEUTRON_SERVER
    clean_stale = True

    def __init__(self, config: dfconfig.Config, reactor: Any = None) -> None:
        super().__init__(config, [PORT_STATUS_TABLE], reactor=reactor)
        self.port_status = self.mirror
        self.relay: ZmqRelay | None = None
        self.watcher: ClusterWatcher | None = None

    # --- lifecycle ---------------------------------------------------------------

    async def _bound(self) -> None:
        """With ZeroMQ and pub_sub_use_multiproc, relay the ipc socket."""
        ns = self.settings
        if isinstance(self.publisher, ZmqPublisher) and ns.pub_sub_use_multiproc:
            path = ns.publisher_multiproc_socket
            # A new directory: only the owner and its group reach the socket
            # (the relay then makes the socket file itself 0660).
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            self.relay = ZmqRelay(f"ipc://{path}", self.publisher, reactor=self.reactor)
            self.relay.start()

    async def _loaded(self) -> None:
        """With the Redis NB driver, start the HA watcher."""
        client = getattr(self.db, "client", None)
        if client is not None:
            self.watcher = ClusterWatcher(client, self.publisher,
                                          self.config.df_redis.cluster_watch_interval,
                                          clock=self.reactor, restart_event=True)
            self.watcher.startService()
        log.info("dfpublisher {id} publishing on {uri}{relay}", id=self.publisher.id,
                 uri=self.registration.uri if self.registration else None,
                 relay=f", relaying {self.relay.address}" if self.relay else "")

    async def _stopping(self) -> None:
        if self.watcher is not None and self.watcher.running:
            await self.watcher.stopService()
        if self.relay is not None:
            await self.relay.close()

    # --- IStatusSource -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        status = super().status()
        if status["publisher"] is not None:
            status["publisher"]["bound"] = getattr(self.publisher, "uri", None)
        return {
            **status,
            "relay": None if self.relay is None else self.relay.address,
            "port_status_rows": len(self.port_status.cache),
        }

    def _counters(self) -> dict[str, int]:
        counters = super()._counters()
        if self.relay is not None:
            counters.update({f"relay_{k}": v for k, v in self.relay.counters.items()})
        if self.registration is not None:
            counters["registry_refreshes"] = self.registration.refreshes
            counters["registry_stale_removed"] = len(self.registration.removed)
        if self.watcher is not None:
            counters.update({f"ha_{k}": v for k, v in self.watcher.counters.items()})
        counters.update({f"port_status_{k}": v for k, v in self.port_status.counters.items()})
        return counters

    def metrics(self) -> list[Metric]:
        relay = self.relay.counters if self.relay else {}
        reg = self.registration
        return [
            *super().metrics(),
            counter("dftx_relay_messages_total",
                    "Messages the relay received over ipc, by outcome.",
                    by=("result", {"relayed": relay.get("relayed", 0),
                                   "malformed": relay.get("malformed", 0),
                                   "publish_error": relay.get("publish_errors", 0)})),
            gauge("dftx_publisher_queued_messages",
                  "Messages waiting in the PUB socket's local queue.",
                  getattr(self.publisher, "queued", 0)),
            counter("dftx_ha_topologies_published_total",
                    "Redis topologies the HA watcher published.",
                    self.watcher.counters["published"] if self.watcher else 0),
            gauge("dftx_port_status_rows", "Rows of table port_status mirrored here.",
                  len(self.port_status.cache)),
            counter("dftx_registry_refreshes_total", "Refreshes of this publisher's row.",
                    reg.refreshes if reg else 0),
            counter("dftx_registry_stale_removed_total",
                    "Stale publisher rows this service deleted.",
                    len(reg.removed) if reg else 0),
        ]


def makeService(options: runner.Options, reactor: Any) -> PublisherService:
    """twistd's entry point (see L{dftx.runner.make_service})."""
    return runner.make_service(options, reactor, PublisherService)


Options = runner.Options
