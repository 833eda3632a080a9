"""
The unit of change that travels from NB API writers to subscribers.
"""

from __future__ import annotations

import functools
import time
from typing import Any

__all__ = [
    "CONTROL_ACTIONS", "CREATE", "DBRESTART", "DELETE", "LOCAL_CONTROLLER", "LOG",
    "NEUTRON_SERVER", "PORT_STATUS_TABLE", "ROLES", "ROW_ACTIONS", "SEND_ALL_TOPIC", "SET",
    "SYNC", "DbUpdate",
]

SEND_ALL_TOPIC = "D"
"""The topic every subscriber listens to; a row update without topic goes here."""

CREATE = "create"
SET = "set"
DELETE = "delete"
LOG = "log"
ROW_ACTIONS = frozenset({CREATE, SET, DELETE, LOG})

DBRESTART = "dbrestart"
"""Control: the connection to the database or broker was recovered; resubscribe
and resync everything."""
SYNC = "sync"
"""Control: resync one topic (C{topic}), or everything (C{topic} None)."""
CONTROL_ACTIONS = frozenset({DBRESTART, SYNC})

NEUTRON_SERVER = "neutron_server"
"""The role of the API servers' side: NbApi writers and C{dfpublisher}."""
LOCAL_CONTROLLER = "df_local_controller"
"""The role of a compute node's C{dfcontroller}."""
ROLES = (NEUTRON_SERVER, LOCAL_CONTROLLER)

PORT_STATUS_TABLE = "port_status"
"""The table of VM port states a controller writes (key: iface-id, no topic)."""

_VALUE_REPR_LIMIT = 60


@functools.total_ordering
class DbUpdate:
    """
    A change to one NB row (C{table}, C{key}, C{action}, C{value}, C{topic}),
    or a control event (C{table} None, C{action} L{DBRESTART} or L{SYNC}).

    A row update's C{topic} defaults to L{SEND_ALL_TOPIC}; a control event's
    stays None ("all topics") unless given.  C{timestamp} (seconds since the
    epoch) defaults to now.  C{publisher} and C{seq} are set on updates that
    arrived from a publisher that stamps them, and C{sent} (seconds since
    the epoch, the publisher's clock) on those from a publisher that stamps
    its send time (see L{dftx.codec}); like the timestamp, it does not count
    in equality.

    Two updates are equal when their row fields, publisher and seq are;
    the timestamp is local and does not count.  Updates that are not equal
    order by timestamp, then key, then those other fields (None first), so
    of two updates exactly one of C{<}, C{==}, C{>} holds, and C{a > b} is
    C{b < a}.  Equal updates are neither less nor greater whatever their
    timestamps: the order is total on updates that differ, which is what
    sorting a list of distinct updates needs.
    """

    __slots__ = ("table", "key", "action", "value", "topic", "timestamp", "publisher", "seq",
                 "sent")

    def __init__(
        self,
        table: str | None,
        key: str | None,
        action: str,
        value: str | None,
        topic: str | None = None,
        timestamp: float | None = None,
        publisher: str | None = None,
        seq: int | None = None,
        sent: float | None = None,
    ) -> None:
        self.table = table
        self.key = key
        self.action = action
        self.value = value
        self.topic = SEND_ALL_TOPIC if topic is None and table is not None else topic
        self.timestamp = time.time() if timestamp is None else timestamp
        self.publisher = publisher
        self.seq = seq
        self.sent = sent

    @classmethod
    def control(cls, action: str, topic: str | None = None) -> DbUpdate:
        """A control event: L{DBRESTART}, or L{SYNC} of C{topic} (None: all)."""
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"not a control action: {action!r}")
        return cls(None, None, action, None, topic)

    @property
    def is_control(self) -> bool:
        return self.table is None

    def to_dict(self) -> dict[str, Any]:
        """The fields Dragonflow puts on the wire: table, key, action, value, topic."""
        return {
            "table": self.table,
            "key": self.key,
            "action": self.action,
            "value": self.value,
            "topic": self.topic,
        }

    def _identity(self) -> tuple:
        return (self.table, self.key, self.action, self.value, self.topic,
                self.publisher, self.seq)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DbUpdate):
            return NotImplemented
        return self._identity() == other._identity()

    __hash__ = None  # type: ignore[assignment]  # mutable value object

    def _order(self) -> tuple:
        """Timestamp, key, then the fields equality compares (None first)."""
        return (self.timestamp, self.key or "",
                tuple((v is not None, v) for v in self._identity()))

    def __lt__(self, other: DbUpdate) -> bool:
        if not isinstance(other, DbUpdate):
            return NotImplemented
        if self == other:
            return False
        return self._order() < other._order()

    def __repr__(self) -> str:
        value = self.value
        if isinstance(value, str) and len(value) > _VALUE_REPR_LIMIT:
            value = value[:_VALUE_REPR_LIMIT] + f"...({len(self.value)} chars)"
        parts = [
            f"table={self.table!r}", f"key={self.key!r}", f"action={self.action!r}",
            f"topic={self.topic!r}", f"value={value!r}",
        ]
        if self.publisher is not None:
            parts.append(f"publisher={self.publisher!r} seq={self.seq!r}")
        return f"DbUpdate({', '.join(parts)})"
