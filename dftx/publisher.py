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

On SIGTERM it deletes its row (announcing the deletion to its
subscribers), closes its sockets and removes the ipc file.  When it cannot
start (database unreachable, address in use), it logs why and exits with
status 1.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from dftx import config as dfconfig
from dftx import http
from dftx.errors import ConfigError
from dftx.http import Metric
from dftx.nb import db_from_config
from dftx.pubsub.registry import Registration
from dftx.pubsub.zmq import ZmqPubSub, ZmqPublisher, ZmqRelay

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


class PublisherService(service.Service):
    """
    The dfpublisher service for a loaded L{dftx.config.Config}.
    L{exit_code} is 1 once starting failed.
    """

    name = "dfpublisher"

    def __init__(self, config: dfconfig.Config) -> None:
        self.config = config
        self.db: Any = None
        self.publisher: ZmqPublisher | None = None
        self.relay: ZmqRelay | None = None
        self.registration: Registration | None = None
        self.root = http.StatusRoot(self)
        self.exit_code = 0
        self._http_port: Any = None
        self._missing: str | None = "starting"

    # --- lifecycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        from twisted.internet import defer

        defer.ensureDeferred(self._start()).addErrback(self._fatal)

    async def _start(self) -> None:
        cfg, ns = self.config, self.config.neutron_server
        self._http_port = await http.listen(ns.http_endpoint, self.root)
        self._missing = "NB database not connected"
        self.db = db_from_config(cfg)
        await self.db.initialize()
        if cfg.df.pub_sub_driver != "zmq":
            log.info("pub_sub_driver = {driver}: nothing to relay or register",
                     driver=cfg.df.pub_sub_driver)
            self._missing = None
            return
        self._missing = "publisher not bound"
        self.publisher = ZmqPubSub(
            bind=zmq_address(ns.publisher_bind_address, ns.publisher_port)).get_publisher()
        await self.publisher.initialize()
        if ns.pub_sub_use_multiproc:
            path = ns.publisher_multiproc_socket
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.relay = ZmqRelay(f"ipc://{path}", self.publisher)
            self.relay.start()
        self._missing = "not registered"
        uri = advertised_uri(ns.publisher_bind_address, ns.publisher_port, cfg.df.management_ip)
        self.registration = Registration(
            self.db, self.publisher.id, uri, dfconfig.NEUTRON_SERVER,
            cfg.df.publisher_timeout, publisher=self.publisher, clean_stale=True)
        self.registration.startService()
        await self.registration.started
        self._missing = None
        log.info("dfpublisher {id} publishing on {uri}{relay}", id=self.publisher.id, uri=uri,
                 relay=f", relaying ipc://{ns.publisher_multiproc_socket}" if self.relay else "")

    def _fatal(self, failure: Any) -> None:
        from twisted.internet import reactor

        log.critical("dfpublisher cannot start: {error}", error=failure.getErrorMessage())
        self.exit_code = 1
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> Any:
        """@return: Deferred firing once the row is deleted and everything is closed."""
        from twisted.internet import defer

        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._missing = "stopping"
        if self.registration is not None and self.registration.running:
            await self.registration.stopService()
        if self.relay is not None:
            await self.relay.close()
        if self.publisher is not None:
            await self.publisher.close()
        if self._http_port is not None:
            await self._http_port.stopListening()
        if self.db is not None:
            await self.db.close()

    # --- IStatusSource -------------------------------------------------------------

    def ready(self) -> str | None:
        return self._missing

    def status(self) -> dict[str, Any]:
        topology = getattr(getattr(self.db, "client", None), "topology", None)
        reg = self.registration
        return {
            "role": dfconfig.NEUTRON_SERVER,
            "ready": self._missing is None,
            "not_ready": self._missing,
            "publisher": None if reg is None else {
                "id": reg.id, "uri": reg.uri, "bound": self.publisher.uri if self.publisher else None,
            },
            "relay": None if self.relay is None else self.relay.address,
            "cluster": topology.as_dict() if topology is not None else None,
            "subscriptions": [],
            "counters": self._counters(),
        }

    def _counters(self) -> dict[str, int]:
        counters: dict[str, int] = {}
        if self.relay is not None:
            counters.update({f"relay_{k}": v for k, v in self.relay.counters.items()})
        if self.registration is not None:
            counters["registry_refreshes"] = self.registration.refreshes
            counters["registry_stale_removed"] = len(self.registration.removed)
        return counters

    def metrics(self) -> list[Metric]:
        relay = self.relay.counters if self.relay else {}
        reg = self.registration
        return [
            Metric("dftx_ready", "gauge", "1 once the service is ready.").add(
                int(self._missing is None), role=dfconfig.NEUTRON_SERVER),
            Metric("dftx_relay_messages_total", "counter",
                   "Messages the relay received over ipc, by outcome.")
            .add(relay.get("relayed", 0), result="relayed")
            .add(relay.get("malformed", 0), result="malformed")
            .add(relay.get("publish_errors", 0), result="publish_error"),
            Metric("dftx_publisher_queued_messages", "gauge",
                   "Messages waiting in the PUB socket's local queue.").add(
                self.publisher.queued if self.publisher else 0),
            Metric("dftx_registry_refreshes_total", "counter",
                   "Refreshes of this publisher's row.").add(reg.refreshes if reg else 0),
            Metric("dftx_registry_stale_removed_total", "counter",
                   "Stale publisher rows this service deleted.").add(
                len(reg.removed) if reg else 0),
        ]


class Options(usage.Options):
    optParameters = [["config", "c", None, "The INI file ([df], [df_redis], [neutron_server])."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def makeService(options: Options) -> PublisherService:
    """
    twistd's entry point.  A configuration that cannot be used ends the
    process with status 1 and a message naming the file, section and key.
    """
    from twisted.internet import reactor

    try:
        cfg = dfconfig.load(options["config"], dfconfig.NEUTRON_SERVER)
    except ConfigError as e:
        raise SystemExit(f"dfpublisher: bad configuration: {e}") from None
    svc = PublisherService(cfg)
    reactor.addSystemEventTrigger("after", "shutdown", _exit_if_failed, svc)
    return svc


def _exit_if_failed(svc: PublisherService) -> None:
    """After shutdown: end with the service's failure status (twistd has none)."""
    if svc.exit_code:
        os._exit(svc.exit_code)
