"""
The local controller's copy of the NB tables it serves.

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

from typing import Iterable

from dftx.update import CREATE, DELETE, SEND_ALL_TOPIC, SET, DbUpdate

RowId = tuple[str | None, str]  # (topic, key)
Scope = frozenset[str | None]  # topics, None for rows without topic


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

    def values(self, table: str) -> dict[str, str]:
        """C{table}'s rows as C{key -> value} (a key kept under two topics
        shows the value of the topic that sorts last)."""
        items = sorted(self._rows.get(table, {}).items(), key=lambda i: (i[0][0] or "", i[0][1]))
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
        self, snap: Snapshot, db_rows: dict[str, Iterable[tuple[str | None, str, str]]]
    ) -> list[DbUpdate]:
        """
        End the resync C{snap}: make the rows of its topics equal to
        C{db_rows} (table -> C{(topic, key, value)} as
        L{dftx.db.api.INbDbDriver.get_all_rows} gives them; rows of other
        topics are ignored), except rows updated since the snapshot began.

        @return: the changes made.
        """
        self._snapshots.remove(snap)
        changes: list[DbUpdate | None] = []
        for table, found in db_rows.items():
            if table not in self.tables:
                continue
            wanted = {
                (t, key): value
                for t, key, value in ((row_topic(t), k, v) for t, k, v in found)
                if t in snap.scope and (table, t, key) not in snap.touched
            }
            for (topic, key), value in wanted.items():
                changes.append(self._put(table, topic, key, value))
            for topic, key in [
                r for r in self._rows[table]
                if r[0] in snap.scope and r not in wanted
                and (table, r[0], r[1]) not in snap.touched
            ]:
                changes.append(self._remove(table, topic, key))
        return [c for c in changes if c is not None]

    def abandon(self, snap: Snapshot) -> None:
        """End the resync C{snap} without changing anything (the read failed)."""
        self._snapshots.remove(snap)
