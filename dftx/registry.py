"""
How publishers find each other: table C{publisher} of the NB database.

Every publisher (either role) keeps a row there (L{Registration}): key its
id, value the JSON text of C{{id, uri, role, last_activity_timestamp}}
(seconds since the epoch).  The row is written at start, refreshed every
C{timeout / 3} seconds and deleted on a clean stop; the publisher service
also deletes rows that were not refreshed for C{timeout} seconds
(L{remove_stale}), which is what is left of a publisher that was killed.

A subscriber follows the publishers of the I{other} role (L{Discovery}): it
reads the table at start and every C{interval} seconds, connects to the
uri of every live row of that role and disconnects from uris whose rows are
stale.  A row that left the table unannounced counts as stale only once its
last timestamp is: when the database loses rows (a failover, every node
restarted without persistence), subscribers stay connected to publishers
that are alive, which re-write their rows within C{timeout / 3}, and so
still get the C{dbrestart} those publishers send.  Nor are rows judged
stale on time the table could not be read: for C{timeout / 3} plus one
C{interval} after reads work again, connections are kept, so that a live
publisher, which could not write its row either, has the time to refresh
it.  Between reads, two things make it react sooner: a publisher
announces its own row's creation and deletion as a L{DbUpdate} of table
C{publisher} on C{"D"} (so its subscribers drop it at once on a clean
stop), and the owner of the subscriber passes every update it receives to
L{Discovery.observe}, which acts on those and re-reads the table on a
C{dbrestart} or C{sync}.  A new publisher cannot announce itself to
subscribers that are not yet connected to it, so it is found by the
periodic read, within C{interval} seconds.

With ZeroMQ CURVE, a row also has C{curve_public_key}, the publisher's
public key (z85; public keys are not secret): L{Discovery} passes it to
C{register_listen_address(uri, server_key=...)}, and reconnects when a
publisher at the same uri comes back with another key.  Trusting the row
means trusting whoever can write the NB database, who could inject
updates anyway; C{[df] zmq_curve_server_keys} narrows it to known keys.

Staleness compares the writer's wall clock with the reader's: hosts need
clocks that agree to well within C{timeout}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import Joined, deferred, or_global_reactor
from dftx.errors import DBKeyNotFound, DftxError, ProtocolError
from dftx.update import CREATE, DELETE, LOCAL_CONTROLLER, NEUTRON_SERVER, ROLES, SET, DbUpdate

__all__ = [
    "PUBLISHER_TABLE", "Discovery", "PublisherRow", "Registration", "other_role", "read_rows",
    "remove_stale",
]

PUBLISHER_TABLE = "publisher"

log = Logger()


def other_role(role: str) -> str:
    """The role whose publishers a subscriber of C{role} follows."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    return LOCAL_CONTROLLER if role == NEUTRON_SERVER else NEUTRON_SERVER


@dataclass(frozen=True)
class PublisherRow:
    """One row of table C{publisher}."""

    id: str
    uri: str
    role: str
    last_activity_timestamp: float
    curve_public_key: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if data["curve_public_key"] is None:
            del data["curve_public_key"]  # rows without CURVE are as before
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PublisherRow:
        """@raise ProtocolError: for anything but such a row."""
        try:
            data = json.loads(text)
            key = data.get("curve_public_key")
            row = cls(str(data["id"]), str(data["uri"]), str(data["role"]),
                      float(data["last_activity_timestamp"]),
                      None if key is None else str(key))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ProtocolError(f"bad {PUBLISHER_TABLE} row {text[:80]!r}: {e!r}") from None
        return row

    def stale(self, now: float, timeout: float) -> bool:
        """Not refreshed for more than C{timeout} seconds at C{now}."""
        return now - self.last_activity_timestamp > timeout


async def read_rows(db: Any) -> list[PublisherRow]:
    """Every well-formed row of table C{publisher}; bad rows are logged and skipped."""
    rows = []
    for text in await db.get_all_entries(PUBLISHER_TABLE):
        try:
            rows.append(PublisherRow.from_json(text))
        except ProtocolError as e:
            log.warn("{error}", error=e)
    return rows


async def remove_stale(db: Any, timeout: float, now: float) -> list[str]:
    """
    Delete the rows of table C{publisher} not refreshed for C{timeout}
    seconds at C{now}.  @return: the ids deleted (a row another cleaner
    deleted first is not an error).
    """
    removed = []
    for row in await read_rows(db):
        if row.stale(now, timeout):
            try:
                await db.delete_key(PUBLISHER_TABLE, row.id)
            except DBKeyNotFound:
                continue
            log.info("removed stale publisher {id} ({role}, {uri})",
                     id=row.id, role=row.role, uri=row.uri)
            removed.append(row.id)
    return removed


class Registration(service.Service):
    """
    Keeps this publisher's row: written at start (L{started} fires once it
    is), refreshed every C{timeout / 3} seconds, deleted at stop.  With
    C{publisher}, the creation and the deletion are also published on
    C{"D"}.  With C{clean_stale} (the publisher service), every refresh
    also runs L{remove_stale}.  A failed refresh is logged and retried at
    the next one.
    """

    def __init__(self, db: Any, publisher_id: str, uri: str, role: str, timeout: float,
                 publisher: Any = None, clean_stale: bool = False,
                 clock: IReactorTime | None = None,
                 curve_public_key: str | None = None) -> None:
        other_role(role)  # validates
        clock = or_global_reactor(clock)  # an embedding application may omit it
        self.db = db
        self.id = publisher_id
        self.uri = uri
        self.role = role
        self.timeout = timeout
        self.publisher = publisher
        self.clean_stale = clean_stale
        self.clock = clock
        self.curve_public_key = curve_public_key
        self.refreshes = 0
        self.removed: list[str] = []
        self.started: defer.Deferred[None] = defer.Deferred()
        self._loop: task.LoopingCall | None = None

    def row(self) -> PublisherRow:
        return PublisherRow(self.id, self.uri, self.role, self.clock.seconds(),
                            self.curve_public_key)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._refresh)
        self._loop.clock = self.clock
        self._loop.start(self.timeout / 3, now=False)
        self._first().chainDeferred(self.started)

    @deferred
    async def _first(self) -> None:
        row = self.row()
        await self.db.create_key(PUBLISHER_TABLE, self.id, row.to_json())
        await self._announce(CREATE, row.to_json())
        if self.clean_stale:
            await self._clean()

    @deferred
    async def _refresh(self) -> None:
        try:
            await self.db.create_key(PUBLISHER_TABLE, self.id, self.row().to_json())
            self.refreshes += 1
        except DftxError as e:
            log.warn("refreshing publisher row {id} failed: {error}", id=self.id, error=e)
        if self.clean_stale:
            await self._clean()

    async def _clean(self) -> None:
        try:
            self.removed += await remove_stale(self.db, self.timeout, self.clock.seconds())
        except DftxError as e:
            log.warn("stale publisher cleanup failed: {error}", error=e)

    async def _announce(self, action: str, value: str | None) -> None:
        if self.publisher is None:
            return
        try:
            await self.publisher.send_event(DbUpdate(PUBLISHER_TABLE, self.id, action, value))
        except DftxError as e:
            log.warn("announcing publisher {id} failed: {error}", id=self.id, error=e)

    @deferred
    async def stopService(self) -> None:
        """@return: Deferred firing with None once the row is deleted (or
        that failed, which is logged: the row then goes stale)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        try:
            await self.db.delete_key(PUBLISHER_TABLE, self.id)
        except DBKeyNotFound:
            pass
        except DftxError as e:
            log.warn("deleting publisher row {id} failed: {error}", id=self.id, error=e)
        await self._announce(DELETE, None)


class Discovery(service.Service):
    """
    Connects C{subscriber} to every live publisher of the role other than
    C{role} and disconnects it from those that are gone (see the module
    docstring).  L{ready} fires after the first read of the table.  Only
    addresses it connected are ever disconnected.  Once stopped, it
    connects nothing: updates given to L{observe} and reads still under
    way are ignored.

    @param interval: seconds between reads of the table (default
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
        Read the table now and connect/disconnect accordingly (a read
        already under way is joined).  A failed read is logged and leaves
        the connections as they are; once stopped, nothing is read.

        @return: Deferred firing with None once the read is done.
        """
        if not self.running:
            return defer.succeed(None)
        return self._reads()

    def _read_failed(self, failure: Failure) -> None:
        log.failure("reading table {table} failed", failure, table=PUBLISHER_TABLE)

    @deferred
    async def _read(self) -> None:
        try:
            rows = await read_rows(self.db)
        except DftxError as e:
            self._unreadable = True
            log.warn("reading table {table} failed: {error}", table=PUBLISHER_TABLE, error=e)
            return
        if not self.running:  # stopped during the read
            return
        if self._unreadable:
            self._unreadable = False
            self._readable_since = self.clock.seconds()
        read = {r.id: r for r in rows if r.role == self.follows}
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
        """Stale, unless reads only just work again and it is connected."""
        now = self.clock.seconds()
        if not row.stale(now, self.timeout):
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
        C{publisher} created, set or deleted (connect or disconnect now),
        or a C{dbrestart}/C{sync} (read the table again).  Anything else,
        and everything once stopped, is ignored.

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
                row = PublisherRow.from_json(update.value)
            except ProtocolError as e:
                log.warn("{error}", error=e)
                return defer.succeed(None)
            if row.role == self.follows:
                self.rows[row.id] = row
        return self._sync(self._live())
