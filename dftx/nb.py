"""
The northbound API an application (a Neutron plugin, say) writes through:
each write goes to the NB database and then, as a L{DbUpdate}, to the
subscribers of the row's topic.

A write is reported done only when both happened.  When publishing fails,
the database write is undone (a create deletes the row, an update puts the
previous value back, a delete re-creates the row) and the caller gets the
publish error, so the database and what subscribers were told do not drift
apart.  Two writers racing on one key can still interleave (an undo puts
back the value this call read); the NB DB has no transactions to prevent it.

Every write takes the row's C{topic} as it is stored (None for a row without
topic, published on C{"D"}): the update is published on it and an undo
writes under it.  Give it for tenant rows, as Dragonflow's objects carry
theirs; the NB DB's topic-less lookup would find such a row but could not
say which topic to publish on.

Reads go to the database.

After a database failover, writes acknowledged shortly before it may be
gone: L{NbApi.db_restart} runs the application's hook that re-writes its
authoritative rows, then tells every subscriber to resync (a C{dbrestart}
control event on C{"D"}).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dftx.deferreds import Joined, deferred, or_global_reactor
from dftx.update import CREATE, DBRESTART, DELETE, SEND_ALL_TOPIC, SET, DbUpdate

__all__ = ["NbApi", "RestartHook", "WriteTimer"]

RestartHook = Callable[[], Awaitable[Any] | Any]
WriteTimer = Callable[[float, float], object]
"""Called after each write that was published, with the seconds from the
start of the database write to the publish being acknowledged, and from the
database write being acknowledged to the same (metrics)."""


class NbApi:
    """
    @param db: an L{dftx.db.api.INbDbDriver}, initialized.
    @param publisher: an L{dftx.pubsub.api.IPublisher}, initialized.
    @param on_db_restart: called by L{db_restart} with no argument; may
        return a Deferred or be a coroutine function.
    @param on_written: a L{WriteTimer}, timed with C{clock} (the global
        reactor when omitted), or None.
    """

    log = Logger()

    def __init__(self, db: Any, publisher: Any, on_db_restart: RestartHook | None = None,
                 *, on_written: WriteTimer | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.db = db
        self.publisher = publisher
        self.on_db_restart = on_db_restart
        self.on_written = on_written
        self.clock = None if on_written is None else or_global_reactor(clock)
        self._restart = Joined(self._db_restart)

    @deferred
    async def create(self, table: str, key: str, value: str, topic: str | None = None) -> None:
        """
        Write the row (creating or overwriting it), then publish C{create}.

        @return: Deferred firing with None; errbacks with the database's
            error, or with L{dftx.errors.PublishError} after deleting the row.
        """
        await self._write(
            CREATE, table, key, value, topic,
            lambda: self.db.create_key(table, key, value, topic),
            lambda: self.db.delete_key(table, key, topic))

    @deferred
    async def update(self, table: str, key: str, value: str, topic: str | None = None) -> None:
        """
        Overwrite an existing row, then publish C{set}.

        @return: Deferred firing with None; errbacks with
            L{dftx.errors.DBKeyNotFound} when there is no such row, the
            database's error, or L{dftx.errors.PublishError} after putting
            the previous value back.
        """
        previous = await self.db.get_key(table, key, topic)
        await self._write(
            SET, table, key, value, topic,
            lambda: self.db.set_key(table, key, value, topic),
            lambda: self.db.set_key(table, key, previous, topic))

    @deferred
    async def delete(self, table: str, key: str, topic: str | None = None) -> None:
        """
        Delete an existing row, then publish C{delete}.

        @return: Deferred firing with None; errbacks with
            L{dftx.errors.DBKeyNotFound} when there is no such row, the
            database's error, or L{dftx.errors.PublishError} after
            re-creating the row.
        """
        previous = await self.db.get_key(table, key, topic)
        await self._write(
            DELETE, table, key, None, topic,
            lambda: self.db.delete_key(table, key, topic),
            lambda: self.db.create_key(table, key, previous, topic))

    async def _write(self, action: str, table: str, key: str, value: str | None,
                     topic: str | None, write: Callable, undo: Callable) -> None:
        clock, timer = self.clock, self.on_written
        started = clock.seconds() if clock is not None else 0.0
        await write()
        written = clock.seconds() if clock is not None else 0.0
        try:
            await self.publisher.send_event(DbUpdate(table, key, action, value, topic))
        except Exception as e:
            try:
                await undo()
            except Exception:
                self.log.failure(
                    "publishing {action} of {table}/{key} failed and undoing the "
                    "database write failed too: the NB DB and subscribers disagree "
                    "until the next resync", action=action, table=table, key=key)
            raise e
        if clock is not None and timer is not None:
            now = clock.seconds()
            timer(now - started, now - written)

    def get(self, table: str, key: str, topic: str | None = None) -> defer.Deferred[str]:
        """@return: Deferred firing with the value (see C{get_key})."""
        return self.db.get_key(table, key, topic)

    def get_all(self, table: str, topic: str | None = None) -> defer.Deferred[list[str]]:
        """@return: Deferred firing with every value of C{table} (of C{topic})."""
        return self.db.get_all_entries(table, topic)

    def get_all_keys(self, table: str, topic: str | None = None) -> defer.Deferred[list[str]]:
        """@return: Deferred firing with every key of C{table} (of C{topic})."""
        return self.db.get_all_keys(table, topic)

    def db_restart(self) -> defer.Deferred[None]:
        """
        The database failed over (the embedding application learnt it from
        a C{dbrestart} control event or the cluster watcher): run the
        C{on_db_restart} hook, then publish a C{dbrestart} control event on
        C{"D"} so that every subscriber resyncs.  Calls made while one is
        running join it.

        @return: Deferred firing with None when done; errbacks with the
            hook's error (nothing is published then) or the publish error.
        """
        return self._restart()

    @deferred
    async def _db_restart(self) -> None:
        if self.on_db_restart is not None:
            await defer.maybeDeferred(self.on_db_restart)
        await self.publisher.send_event(DbUpdate.control(DBRESTART), topic=SEND_ALL_TOPIC)
