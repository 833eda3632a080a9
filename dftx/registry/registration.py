"""
L{Registration}: a publisher's rows in the registry (L{dftx.registry.rows}).

They are written at start (the C{dftx_publisher} row first, so that a
reader that sees the C{publisher} row finds the key), refreshed every
C{timeout / 3} seconds and deleted on a clean stop (in the reverse order).
The C{publisher} row is topic-less, so deleting it looks for it in every
topic (a SCAN, once per stop of a publisher service).  With a publisher,
the creation and the deletion are announced as a L{DbUpdate} of table
C{publisher} on C{"D"} with Dragonflow's fields, which Dragonflow's
controllers act on too.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dftx.deferreds import deferred, or_global_reactor
from dftx.errors import DBKeyNotFound, DftxError
from dftx.registry.rows import (
    DFTX_PUBLISHER_TABLE, PUBLISHER_TABLE, PublisherRow, other_role, remove_stale,
)
from dftx.update import CREATE, DELETE, NEUTRON_SERVER, DbUpdate

__all__ = ["Registration"]

log = Logger()


class Registration(service.Service):
    """
    Keeps this publisher's rows: written at start (L{started} fires once
    they are), refreshed every C{timeout / 3} seconds, deleted at stop.
    With C{publisher}, the creation and the deletion are also published on
    C{"D"}.  With C{clean_stale} (the publisher service), every refresh
    also runs L{remove_stale}.  A failed refresh is logged and retried at
    the next one; until one succeeds, L{failing} says why (the periodic
    write is the service's probe of the NB DB: see L{dftx.service}).
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
        self.failing: str | None = None
        self.removed: list[str] = []
        self.started: defer.Deferred[None] = defer.Deferred()
        self._loop: task.LoopingCall | None = None

    def row(self) -> PublisherRow:
        """This publisher's row, stamped now."""
        return PublisherRow(self.id, self.uri, self.role, self.clock.seconds(),
                            self.curve_public_key)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._refresh)
        self._loop.clock = self.clock
        self._loop.start(self.timeout / 3, now=False)
        self._first().chainDeferred(self.started)

    def _tables(self) -> list[tuple[str, str | None]]:
        """(table, topic) of its rows, in the order they are written."""
        tables: list[tuple[str, str | None]] = [(DFTX_PUBLISHER_TABLE, self.role)]
        if self.role == NEUTRON_SERVER:
            tables.append((PUBLISHER_TABLE, None))
        return tables

    async def _write(self) -> PublisherRow:
        row = self.row()
        for table, topic in self._tables():
            value = row.to_json() if table == DFTX_PUBLISHER_TABLE else row.dragonflow_json()
            await self.db.create_key(table, self.id, value, topic=topic)
        return row

    @deferred
    async def _first(self) -> None:
        row = await self._write()
        await self._announce(CREATE, row.dragonflow_json())
        if self.clean_stale:
            await self._clean()

    @deferred
    async def _refresh(self) -> None:
        try:
            await self._write()
            self.refreshes += 1
            self.failing = None
        except DftxError as e:
            self.failing = f"refreshing publisher row {self.id} failed: {e}"
            log.warn("refreshing publisher rows {id} failed: {error}", id=self.id, error=e)
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
        """@return: Deferred firing with None once the rows are deleted (or
        that failed, which is logged: the rows then go stale)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for table, topic in reversed(self._tables()):  # as written, backwards
            try:
                await self.db.delete_key(table, self.id, topic=topic)
            except DBKeyNotFound:
                pass
            except DftxError as e:
                log.warn("deleting publisher row {id} from {table} failed: {error}",
                         id=self.id, table=table, error=e)
        await self._announce(DELETE, None)


