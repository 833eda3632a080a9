"""
A local copy of NB tables, kept up to date by a subscriber: L{LocalCache}
(the rows, and how updates and resyncs change them) and L{Mirror} (the
cache, the database it resyncs from, and the observers of its changes).
The local controller mirrors the tables it serves; the publisher service
mirrors C{port_status}.

Rows are kept by table, then by C{(topic, key)}; C{topic} is None for a row
without topic, which is also what the topic C{"D"} (L{SEND_ALL_TOPIC}) means
on the wire.  Two things change the copy:

- L{LocalCache.apply}, for each update the subscriber delivers.  It is
  idempotent (a create of a row that already has that value, a delete of a
  row that is not there, change nothing) and reports the change it made, or
  None.
- A resync: L{LocalCache.snapshot} starts one for a set of topics before the
  database is read, and L{LocalCache.reconcile} ends it with the rows read,
  making the copy equal to them and reporting only real differences.

Updates keep arriving while the database is read, and the read may see a
row before or after an update of it.  So a row that an update touched
after the snapshot began keeps the update's state, and reconcile leaves it
alone: if the read saw a newer write than that update, the write's own
update is still on its way.  Nothing is buffered and no row flaps back to
an older value.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import deferred, gather, or_global_reactor
from dftx.update import CREATE, DBRESTART, DELETE, SEND_ALL_TOPIC, SET, SYNC, DbUpdate

__all__ = ["LocalCache", "Mirror", "Observer", "Snapshot", "row_topic"]

log = Logger()
Observer = Callable[[DbUpdate], Any]

RowId = tuple[str | None, str]  # (topic, key)
Scope = frozenset[str | None]  # topics, None for rows without topic
Pair = tuple[str, str | None]  # (table, topic)
_CHANGED = object()  # in a resync's scope: check the other kept topics' versions


def row_topic(topic: str | None) -> str | None:
    """A topic as the cache files it: None for no topic and for C{"D"}."""
    return None if not topic or topic == SEND_ALL_TOPIC else topic


class Snapshot:
    """
    A resync in progress: the topics it covers and the rows that updates
    touched since it began.
    """

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.touched: set[tuple[str, str | None, str]] = set()


class LocalCache:
    """
    @param tables: the tables kept; updates of other tables are ignored.
    """

    def __init__(self, tables: Iterable[str]) -> None:
        self.tables = frozenset(tables)
        self._rows: dict[str, dict[RowId, str]] = {t: {} for t in self.tables}
        self._snapshots: list[Snapshot] = []

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def rows(self, table: str) -> dict[RowId, str]:
        """A copy of C{table}'s rows, C{(topic, key) -> value}."""
        return dict(self._rows.get(table, {}))

    def values(self, table: str) -> dict[str, str] | None:
        """C{table}'s rows as C{key -> value} (a key kept under two topics
        shows the value of the topic that sorts last); None for a table
        that is not kept."""
        if table not in self._rows:
            return None
        items = sorted(self._rows[table].items(), key=lambda i: (i[0][0] or "", i[0][1]))
        return {key: value for (_, key), value in items}

    def get(self, table: str, key: str, topic: str | None = None) -> str | None:
        """The value of one row, or None when the cache does not have it."""
        return self._rows.get(table, {}).get((row_topic(topic), key))

    def apply(self, update: DbUpdate) -> DbUpdate | None:
        """
        Apply a C{create}, C{set} or C{delete} of a kept table.

        @return: the change made, as a L{DbUpdate} (a C{set} that finds no
            row is reported as the C{create} it was); None when nothing
            changed or the update is not for the cache.
        """
        if update.table not in self.tables or update.key is None:
            return None
        topic = row_topic(update.topic)
        for snap in self._snapshots:
            if topic in snap.scope:
                snap.touched.add((update.table, topic, update.key))
        if update.action in (CREATE, SET) and update.value is not None:
            return self._put(update.table, topic, update.key, update.value)
        if update.action == DELETE:
            return self._remove(update.table, topic, update.key)
        return None

    def _put(self, table: str, topic: str | None, key: str, value: str) -> DbUpdate | None:
        rows = self._rows[table]
        old = rows.get((topic, key))
        if old == value:
            return None
        rows[(topic, key)] = value
        return DbUpdate(table, key, CREATE if old is None else SET, value, topic)

    def _remove(self, table: str, topic: str | None, key: str) -> DbUpdate | None:
        if self._rows[table].pop((topic, key), None) is None:
            return None
        return DbUpdate(table, key, DELETE, None, topic)

    def snapshot(self, topics: Iterable[str | None]) -> Snapshot:
        """
        Begin a resync of C{topics} (None or C{"D"}: rows without topic);
        call it before reading the database, then L{reconcile}.
        """
        snap = Snapshot(frozenset(row_topic(t) for t in topics))
        self._snapshots.append(snap)
        return snap

    def reconcile(
        self, snap: Snapshot, db_rows: dict[str, Iterable[tuple[str | None, str, str]]],
        read: Iterable[tuple[str, str | None]] | None = None,
    ) -> list[DbUpdate]:
        """
        End the resync C{snap}: make the rows of its topics equal to
        C{db_rows} (table -> C{(topic, key, value)} as
        L{dftx.db.api.INbDbDriver.get_all_rows} gives them; rows of other
        topics are ignored), except rows updated since the snapshot began.
        With C{read}, only those C{(table, topic)} pairs are made equal
        (the others were not read).

        @return: the changes made.
        """
        self._snapshots.remove(snap)
        pairs = None if read is None else {(t, row_topic(p)) for t, p in read}
        changes: list[DbUpdate | None] = []
        for table, found in db_rows.items():
            if table not in self.tables:
                continue
            scope = {t for t in snap.scope if pairs is None or (table, t) in pairs}
            wanted = {
                (t, key): value
                for t, key, value in ((row_topic(t), k, v) for t, k, v in found)
                if t in scope and (table, t, key) not in snap.touched
            }
            for (topic, key), value in wanted.items():
                changes.append(self._put(table, topic, key, value))
            for topic, key in [
                r for r in self._rows[table]
                if r[0] in scope and r not in wanted
                and (table, r[0], r[1]) not in snap.touched
            ]:
                changes.append(self._remove(table, topic, key))
        return [c for c in changes if c is not None]

    def abandon(self, snap: Snapshot) -> None:
        """End the resync C{snap} without changing anything (the read failed)."""
        self._snapshots.remove(snap)


class Mirror:
    """
    Keeps a L{LocalCache} of C{tables} equal to the database C{db} for the
    subscribed C{topics} (C{"D"} always among them).

    Feed it every update the subscriber delivers (L{received}): rows are
    applied, a C{dbrestart} resyncs everything and a C{sync} its topic.
    L{resync} reads each kept (table, topic) pair (L{get_topic_rows}: on
    Redis that topic's slot, never a SCAN) and applies only the differences;
    L{resync_changed}, the periodic one, reads only the pairs whose version
    (L{get_topic_versions}) moved since this mirror last read them.  Resync
    requests that arrive while one runs are merged into the next run; a
    resync that fails (the database unreachable during a failover) is
    retried after a delay that doubles up to C{max_delay} seconds.  Every
    real change goes to the observers.  C{clock} times the retries (default:
    the global reactor, for an embedding application that does not give one)
    and the resyncs: C{on_resync}, when given, is called after each one with
    its duration in seconds and whether it succeeded (metrics).

    @ivar counters: C{changes}, C{resyncs}, C{resync_errors},
        C{resync_changes}, C{observer_errors}; C{pairs_read} (topic reads
        done) and C{pairs_skipped} (pairs a periodic resync found unchanged).
    """

    def __init__(self, db: Any, tables: Iterable[str], topics: Iterable[str] = (),
                 clock: IReactorTime | None = None, max_delay: float = 5.0,
                 on_resync: Callable[[float, bool], object] | None = None) -> None:
        clock = or_global_reactor(clock)  # an embedding application may omit it
        self.clock = clock
        self.on_resync = on_resync
        self.db = db
        self.cache = LocalCache(tables)
        self.topics: set[str] = {SEND_ALL_TOPIC, *topics}
        self.counters: Counter[str] = Counter()
        self._observers: list[Observer] = []
        self._versions: dict[Pair, int] = {}  # as of the last read of each pair
        self._resync = _Coalesced(self._resync_once, clock, max_delay=max_delay)

    def add_observer(self, observer: Observer) -> None:
        """Call C{observer(update)} with every change made to the cache (a
        C{create}, C{set} or C{delete} L{DbUpdate}); a Deferred it returns
        is not waited for, and its errors are logged and counted."""
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def received(self, update: DbUpdate) -> None:
        """Act on an update from the subscriber (see the class docstring)."""
        if update.action == DBRESTART:
            self.resync()
        elif update.action == SYNC:
            self.resync(None if update.topic is None else [update.topic])
        elif row_topic(update.topic) in {row_topic(t) for t in self.topics}:
            change = self.cache.apply(update)
            if change is not None:
                self._changed([change])

    def add_topic(self, topic: str) -> defer.Deferred[None]:
        """Keep C{topic}'s rows too.  @return: Deferred firing once loaded."""
        self.topics.add(topic)
        return self.resync([topic])

    def remove_topic(self, topic: str) -> None:
        """Drop C{topic}'s rows (observers see them deleted)."""
        if topic == SEND_ALL_TOPIC:
            raise ValueError(f"topic {SEND_ALL_TOPIC!r} is always kept")
        self.topics.discard(topic)
        for table in self.cache.tables:
            self._versions.pop((table, topic), None)
        self._changed(self.cache.reconcile(self.cache.snapshot([topic]), {
            t: [] for t in self.cache.tables}))

    def resync(self, topics: Iterable[str] | None = None) -> defer.Deferred[None]:
        """
        Make the cache equal to the database for C{topics} (None: every kept
        topic).

        @return: Deferred firing once a resync that began after this call
            has ended (it never fails: a failed read is retried).
        """
        return self._resync.request(None if topics is None else {row_topic(t) for t in topics})

    def resync_changed(self) -> defer.Deferred[None]:
        """
        The periodic safety resync: check the version of every kept (table,
        topic) pair and read only those whose version moved since this
        mirror last read them (pairs asked for by a L{resync} meanwhile are
        read anyway).

        @return: Deferred firing once a run that began after this call has
            ended (it never fails: a failed read is retried).
        """
        return self._resync.request({_CHANGED})

    def close(self) -> defer.Deferred[None]:
        """Stop resyncing.  @return: Deferred firing once none runs."""
        return self._resync.idle()

    async def _resync_once(self, scope: set[Any] | None) -> None:
        kept = {row_topic(t) for t in self.topics}
        full = kept if scope is None else scope & kept
        checked = kept - full if scope is not None and _CHANGED in scope else set()
        topics = sorted(full | checked, key=lambda t: (t is not None, t or ""))
        pairs = [(table, topic) for table in sorted(self.cache.tables) for topic in topics]
        if not pairs:
            return
        snap = self.cache.snapshot(full | checked)
        started = self.clock.seconds()
        try:
            versions = await self.db.get_topic_versions(pairs)
            read = [p for p in pairs if p[1] in full or versions[p] != self._versions.get(p)]
            found = await gather(self.db.get_topic_rows(*p) for p in read)
        except Exception:
            self.cache.abandon(snap)
            self.counters["resync_errors"] += 1
            self._timed(started, False)
            raise
        db_rows: dict[str, list[tuple[str | None, str, str]]] = {}
        for (table, topic), rows in zip(read, found):
            db_rows.setdefault(table, []).extend((topic, k, v) for k, v in rows)
        changes = self.cache.reconcile(snap, db_rows, read)
        self._versions.update((p, versions[p]) for p in read)
        self.counters.update(resyncs=1, resync_changes=len(changes), pairs_read=len(read),
                             pairs_skipped=len(pairs) - len(read))
        if changes:
            log.info("resync of {topics}: {n} changes", n=len(changes),
                     topics=sorted({t or SEND_ALL_TOPIC for _, t in read}))
        self._timed(started, True)
        self._changed(changes)

    def _timed(self, started: float, ok: bool) -> None:
        if self.on_resync is not None:
            self.on_resync(self.clock.seconds() - started, ok)

    def _changed(self, changes: list[DbUpdate]) -> None:
        self.counters["changes"] += len(changes)
        for change in changes:
            for observer in list(self._observers):
                try:
                    result = observer(change)
                except Exception:
                    self._observer_failed(Failure(), change)
                    continue
                if isinstance(result, defer.Deferred):
                    result.addErrback(self._observer_failed, change)

    def _observer_failed(self, failure: Failure, change: DbUpdate) -> None:
        self.counters["observer_errors"] += 1
        log.failure("observer failed on {change!r}", failure, change=change)


class _Coalesced:
    """
    Runs C{work(scope)} one at a time.  Requests that arrive while it runs
    are merged (a scope of None means everything) into the next run; a run
    that fails is retried, merged with what came in meanwhile, after a
    delay that doubles up to C{max_delay}.
    """

    def __init__(self, work: Callable[[Any], Any], clock: IReactorTime,
                 delay: float = 0.2, max_delay: float = 5.0) -> None:
        self._work = work
        self._clock = clock
        self._delay = delay
        self._max_delay = max_delay
        self._scope: set[Any] | None = set()
        self._wanted = False
        self._waiters: list[defer.Deferred[None]] = []
        self._running: defer.Deferred[None] | None = None
        self._sleeping: defer.Deferred[None] | None = None

    def request(self, scope: set[Any] | None) -> defer.Deferred[None]:
        """@return: Deferred firing once a run that covers C{scope} and
        began after this call has succeeded."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._merge(scope, [waiter])
        if self._running is None:
            running = self._loop()
            if not running.called:  # a run that ended at once has cleared it
                self._running = running
        return waiter

    def _merge(self, scope: set[Any] | None, waiters: list[defer.Deferred[None]]) -> None:
        self._scope = None if scope is None or self._scope is None else self._scope | scope
        self._waiters = waiters + self._waiters
        self._wanted = True

    @deferred
    async def _loop(self) -> None:
        delay = self._delay
        try:
            while self._wanted:
                scope, waiters = self._scope, self._waiters
                self._scope, self._waiters, self._wanted = set(), [], False
                try:
                    await defer.maybeDeferred(self._work, scope)
                except Exception as e:
                    log.warn("resync failed (retrying in {delay}s): {error}", delay=delay,
                             error=e)
                    self._merge(scope, waiters)
                    self._sleeping = task.deferLater(self._clock, delay, lambda: None)
                    try:
                        await self._sleeping
                    except defer.CancelledError:
                        return
                    finally:
                        self._sleeping = None
                    delay = min(delay * 2, self._max_delay)
                    continue
                delay = self._delay
                for waiter in waiters:
                    waiter.callback(None)
        finally:
            self._running = None

    def idle(self) -> defer.Deferred[None]:
        """
        Stop: drop pending requests (their Deferreds fire), cancel a retry
        wait.  @return: Deferred firing once no run is under way.
        """
        self._wanted = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._sleeping is not None:
            self._sleeping.cancel()
        if self._running is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._running.addBoth(lambda _: done.callback(None))
        return done
