"""
L{Discovery}: a subscriber follows the publishers of the I{other} role.

It reads only their rows (L{dftx.registry.rows.read_rows}: a local
controller never reads another controller's row) at start and every
C{interval} seconds, connects to the uri of every live row and disconnects
from uris whose rows are stale.  A row that left the table unannounced
counts as stale only once its last timestamp is: when the database loses
rows (a failover, every node restarted without persistence), subscribers
stay connected to publishers that are alive, which re-write their rows
within C{timeout / 3}, and so still get the C{dbrestart} those publishers
send.  Nor are rows judged stale on time the table could not be read: for
C{timeout / 3} plus one C{interval} after reads work again, connections
are kept, so that a live publisher, which could not write its row either,
has the time to refresh it.  Nor is a stale row dropped while the
subscriber says its connection to the row's uri is up (C{is_connected},
which the ZeroMQ subscriber has: with heartbeats, a live connection proves
a live, reachable publisher): a publisher cut off from the NB DB cannot
refresh its row, but it still relays what its API workers hand it
(doc/reliability.md#network-partitions).

Between reads, the owner of the subscriber passes every update it receives
to L{Discovery.observe}.  A publisher announces its own row's creation and
deletion as an update of table C{publisher} (and Dragonflow's publisher
service relays the changes of that table): a deletion drops the row at once
(a clean stop); a row created or set is taken when its id is known or its
uri already connected, keeping the key it is known by (an update reaching
it over that connection proves the key), otherwise the rows are read again
(the key is not in the update); a C{dbrestart} or C{sync} reads them again
too.  A new publisher cannot announce itself to subscribers that are not
yet connected to it, so it is found by the periodic read, within
C{interval} seconds.

With CURVE, a row's C{curve_public_key} goes to
C{register_listen_address(uri, server_key=...)}, and a publisher that comes
back at the same uri with another key is reconnected (public keys are not
secret).  Trusting the row means trusting whoever can write the NB
database, who could inject updates anyway; C{[df] zmq_curve_server_keys}
narrows it to known keys.

Staleness compares the writer's wall clock with the reader's: hosts need
clocks that agree to well within C{timeout}.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import Joined, deferred, or_global_reactor
from dftx.errors import DftxError, ProtocolError
from dftx.registry.rows import PUBLISHER_TABLE, PublisherRow, other_role, read_rows
from dftx.update import CREATE, DELETE, SET, DbUpdate

__all__ = ["Discovery"]

log = Logger()


class Discovery(service.Service):
    """
    Connects C{subscriber} to every live publisher of the role other than
    C{role} and disconnects it from those that are gone (see the module
    docstring).  L{ready} fires after the first read of their rows.  Only
    addresses it connected are ever disconnected.  Once stopped, it
    connects nothing: updates given to L{observe} and reads still under
    way are ignored.

    @param interval: seconds between reads of the rows (default
        C{timeout / 3}).
    """

    def __init__(self, db: Any, subscriber: Any, role: str, timeout: float,
                 interval: float | None = None, clock: IReactorTime | None = None) -> None:
        clock = or_global_reactor(clock)  # an embedding application may omit it
        self.db = db
        self.subscriber = subscriber
        self.role = role
        self.follows = other_role(role)
        self.timeout = timeout
        self.interval = interval or timeout / 3
        self.clock = clock
        self.rows: dict[str, PublisherRow] = {}
        self.connected: set[str] = set()
        self.keys: dict[str, str | None] = {}
        """The CURVE server key each connected uri was registered with."""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self._loop: task.LoopingCall | None = None
        self._reads = Joined(lambda: self._read().addErrback(self._read_failed))
        # After reads failed: when they work again (rows are not judged
        # stale before a live publisher could refresh its row).
        self._readable_since: float | None = None
        self._unreadable = False

    def startService(self) -> None:
        super().startService()
        self.refresh().chainDeferred(self.ready)
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    @deferred
    async def stopService(self) -> None:
        """@return: Deferred firing with None once disconnected from what it
        connected."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        await self._sync({})

    def refresh(self) -> defer.Deferred[None]:
        """
        Read the rows of the publishers it follows now and connect/disconnect
        accordingly (a read already under way is joined).  A failed read is
        logged and leaves the connections as they are; once stopped, nothing
        is read.

        @return: Deferred firing with None once the read is done.
        """
        if not self.running:
            return defer.succeed(None)
        return self._reads()

    def _read_failed(self, failure: Failure) -> None:
        log.failure("reading the {role} publishers failed", failure, role=self.follows)

    @deferred
    async def _read(self) -> None:
        try:
            rows = await read_rows(self.db, self.follows)
        except DftxError as e:
            self._unreadable = True
            log.warn("reading the {role} publishers failed: {error}", role=self.follows,
                     error=e)
            return
        if not self.running:  # stopped during the read
            return
        if self._unreadable:
            self._unreadable = False
            self._readable_since = self.clock.seconds()
        read = {r.id: r for r in rows}
        # A row gone from the table without its publisher announcing it (the
        # database lost it: a failover, a restart without persistence) is
        # kept until it goes stale; a live publisher writes it again sooner.
        kept = {i: r for i, r in self.rows.items() if i not in read and not self._expired(r)}
        self.rows = {**kept, **read}
        await self._sync(self._live())

    def _live(self) -> dict[str, str | None]:
        """uri -> CURVE key of the live rows (the newest row of a uri wins)."""
        live = sorted((r for r in self.rows.values() if not self._expired(r)),
                      key=lambda r: r.last_activity_timestamp)
        return {r.uri: r.curve_public_key for r in live}

    def _expired(self, row: PublisherRow) -> bool:
        """Stale, unless its connection is up, or reads only just work again
        and it is connected."""
        now = self.clock.seconds()
        if not row.stale(now, self.timeout):
            return False
        is_connected = getattr(self.subscriber, "is_connected", None)
        if row.uri in self.connected and is_connected is not None and is_connected(row.uri):
            return False
        grace = (self._readable_since is not None
                 and now - self._readable_since < self.timeout / 3 + self.interval)
        return not (grace and row.uri in self.connected)

    @deferred
    async def _sync(self, wanted: dict[str, str | None]) -> None:
        for uri in sorted(self.connected):
            if uri in wanted and wanted[uri] != self.keys.get(uri):
                # Same address, another key: a restarted publisher.
                await self._disconnect(uri)
        for uri in sorted(set(wanted) - self.connected):
            if not self.running:
                break
            key = wanted[uri]
            try:
                if key is None:
                    await self.subscriber.register_listen_address(uri)
                else:
                    await self.subscriber.register_listen_address(uri, server_key=key)
            except DftxError as e:
                log.warn("cannot connect to publisher {uri}: {error}", uri=uri, error=e)
                continue
            self.connected.add(uri)
            self.keys[uri] = key
            log.info("connected to publisher {uri}", uri=uri)
        if not self.running:  # stopped while connecting: leave nothing connected
            wanted = {}
        for uri in sorted(self.connected - set(wanted)):
            await self._disconnect(uri)

    async def _disconnect(self, uri: str) -> None:
        await self.subscriber.unregister_listen_address(uri)
        self.connected.discard(uri)
        self.keys.pop(uri, None)
        log.info("disconnected from publisher {uri}", uri=uri)

    def observe(self, update: DbUpdate) -> defer.Deferred[None]:
        """
        Act on an update the subscriber received: a row of table
        C{publisher} deleted (disconnect now), created or set (taken with
        the key it is known by when its id is known or its uri connected,
        otherwise the rows are read again), or a C{dbrestart}/C{sync} (read
        again).  Anything else, and everything once stopped, is ignored.

        @return: Deferred firing with None once acted on.
        """
        if not self.running:
            return defer.succeed(None)
        if update.is_control:
            return self.refresh()
        if update.table != PUBLISHER_TABLE:
            return defer.succeed(None)
        if update.action == DELETE:
            self.rows.pop(update.key or "", None)
        elif update.action in (CREATE, SET) and update.value:
            try:
                row = PublisherRow.from_json(update.value, self.follows)
            except ProtocolError as e:
                log.warn("{error}", error=e)
                return defer.succeed(None)
            known = self.rows.get(row.id)
            if known is not None:
                key = known.curve_public_key
            elif row.uri in self.connected:
                key = self.keys[row.uri]
            else:  # a publisher it has not read: its key, if any, is in the table
                return self.refresh()
            self.rows[row.id] = replace(row, curve_public_key=key)
        return self._sync(self._live())
