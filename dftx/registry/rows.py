"""
The rows of the publisher registry and the reads of them.

Every publisher keeps a row in table C{dftx_publisher} under its role as
topic: the JSON text of C{{id, last_activity_timestamp, uri}} (seconds
since the epoch, a float) and, with ZeroMQ CURVE, C{curve_public_key}
(sorted keys).  A publisher of role neutron_server also keeps a row in
Dragonflow's table C{publisher}, no topic, with the fields of Dragonflow's
C{Publisher} model only (id, name, uri, last_activity_timestamp; dftx
writes no name), sorted and spaced as Dragonflow's C{jsonutils.dumps}
writes them: byte for byte what its df-publisher-service writes for
itself.  Dragonflow's controllers read every row of table C{publisher},
of every topic, and refuse a row with a field their model lacks ("TypeError:
role is not a field of Publisher"): so nothing else goes there, and the
controllers' rows, which Dragonflow has no use for, stay out of it.  A row
Dragonflow wrote has no role: its publisher service is the only writer of
the table, so such a row is a neutron_server publisher.

L{read_rows} of one role reads only that role's rows: C{{publisher.}} and
C{{dftx_publisher.neutron_server}}, or C{{dftx_publisher.df_local_controller}},
each one slot.  L{remove_stale} (run by the publisher service) reads every
row and deletes those not refreshed for C{timeout}, of either table: what
is left of a killed publisher, dftx's or Dragonflow's.  Dragonflow's
publisher service refreshes its row every C{publisher_timeout / 2}: dftx's
C{publisher_timeout} must be at least Dragonflow's, or dftx takes its rows
for stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from dftx.errors import DBKeyNotFound, ProtocolError
from dftx.update import LOCAL_CONTROLLER, NEUTRON_SERVER, ROLES

__all__ = [
    "DFTX_PUBLISHER_TABLE", "PUBLISHER_TABLE", "PublisherRow", "other_role", "read_rows",
    "remove_stale",
]

PUBLISHER_TABLE = "publisher"
"""Dragonflow's table: the rows of the neutron_server publishers, no topic."""
DFTX_PUBLISHER_TABLE = "dftx_publisher"
"""dftx's rows of every publisher, under its role as topic."""

log = Logger()


def other_role(role: str) -> str:
    """The role whose publishers a subscriber of C{role} follows."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    return LOCAL_CONTROLLER if role == NEUTRON_SERVER else NEUTRON_SERVER


@dataclass(frozen=True)
class PublisherRow:
    """One publisher's registration (its role is where the row is)."""

    id: str
    uri: str
    role: str
    last_activity_timestamp: float
    curve_public_key: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {"id": self.id, "uri": self.uri,
                "last_activity_timestamp": float(self.last_activity_timestamp)}

    def dragonflow_json(self) -> str:
        """The value in table C{publisher}: Dragonflow's fields only."""
        return json.dumps(self._fields(), sort_keys=True)

    def to_json(self) -> str:
        """The value in table C{dftx_publisher}: with the CURVE key, if any."""
        fields = self._fields()
        if self.curve_public_key is not None:
            fields["curve_public_key"] = self.curve_public_key
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, role: str) -> PublisherRow:
        """
        A row of either table, of publishers of C{role}; fields it does not
        know (Dragonflow's optional C{name}) are ignored.

        @raise ProtocolError: for anything but such a row.
        """
        try:
            data = json.loads(text)
            row = cls(data["id"], data["uri"], role, data["last_activity_timestamp"],
                      data.get("curve_public_key"))
            if not (isinstance(row.id, str) and isinstance(row.uri, str)
                    and isinstance(row.curve_public_key, (str, type(None)))
                    and isinstance(row.last_activity_timestamp, (int, float))
                    and not isinstance(row.last_activity_timestamp, bool)):
                raise TypeError("a field has the wrong type")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ProtocolError(f"bad publisher row {text[:80]!r}: {e!r}") from None
        return row

    def stale(self, now: float, timeout: float) -> bool:
        """Not refreshed for more than C{timeout} seconds at C{now}."""
        return now - self.last_activity_timestamp > timeout


def _parsed(texts: list[str], role: str) -> list[PublisherRow]:
    """The well-formed rows of C{texts}; bad rows are logged and skipped."""
    rows = []
    for text in texts:
        try:
            rows.append(PublisherRow.from_json(text, role))
        except ProtocolError as e:
            log.warn("{error}", error=e)
    return rows


async def _dragonflow_rows(db: Any) -> list[PublisherRow]:
    """The rows of table C{publisher} (no topic)."""
    rows = await db.get_topic_rows(PUBLISHER_TABLE, None)
    return _parsed([value for _, value in rows], NEUTRON_SERVER)


async def _dftx_rows(db: Any, role: str) -> list[PublisherRow]:
    return _parsed(await db.get_all_entries(DFTX_PUBLISHER_TABLE, topic=role), role)


async def read_rows(db: Any, role: str) -> list[PublisherRow]:
    """
    The registrations of the publishers of C{role} (one row per id): for
    neutron_server, those of table C{publisher} and then those of
    C{dftx_publisher}, which win; for df_local_controller, those of
    C{dftx_publisher}.  Bad rows are logged and skipped.
    """
    other_role(role)  # validates
    # Table publisher first: a dftx publisher writes its dftx_publisher row
    # (with its key) before, so the key is there once its row is.
    rows = await _dragonflow_rows(db) if role == NEUTRON_SERVER else []
    rows += await _dftx_rows(db, role)
    return list({r.id: r for r in rows}.values())


async def remove_stale(db: Any, timeout: float, now: float) -> list[str]:
    """
    Delete the rows, of both tables and both roles, not refreshed for
    C{timeout} seconds at C{now}.  @return: the ids deleted (a row another
    cleaner deleted first is not an error).
    """
    # Table publisher first: a row is deleted before the dftx_publisher row
    # that holds its key (the reverse of the order they are written in).
    found = [(PUBLISHER_TABLE, None, row) for row in await _dragonflow_rows(db)]
    found += [(DFTX_PUBLISHER_TABLE, role, row)
              for role in ROLES for row in await _dftx_rows(db, role)]
    removed: dict[str, None] = {}
    for table, topic, row in found:
        if row.stale(now, timeout):
            try:
                await db.delete_key(table, row.id, topic=topic)
            except DBKeyNotFound:
                continue
            log.info("removed stale publisher {id} ({role}, {uri}) from {table}",
                     id=row.id, role=row.role, uri=row.uri, table=table)
            removed[row.id] = None
    return list(removed)


