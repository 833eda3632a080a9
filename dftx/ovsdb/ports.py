"""
What a row of the Interface table is, as the local controller sees it.

L{PortEvent} is what the monitor reports; L{port_state} derives its fields
from a row, L{transition} says which event (if any) a change from one
row state to another gives, and L{PortTable} folds a table's row changes
into those events (for the monitor and for L{dftx.testing}'s fake):

- bridge: C{type} internal (br-int, br-tun, br-ex's own interfaces);
- vm: C{external_ids:iface-id} set (C{attached-mac} with it);
- tunnel: C{type} vxlan, gre or geneve with C{options:remote_ip};
- patch: C{type} patch with C{options:peer};
- unknown: anything else.

A VM port is recognised before a bridge (an internal port can carry an
iface-id).  A port is online once its row exists, except that an ofport of
-1 (the attach failed) holds it back until the ofport is valid; it is
offline when the row goes (or its ofport turns -1), and any other change
of the event's fields is an update.

A row is a dict of the columns C{name}, C{type} (str), C{external_ids},
C{options} (dicts), C{ofport}, C{admin_state}, C{mac_in_use} (frozensets
of 0 or 1 value), as L{dftx.ovsdb.rows} decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

__all__ = [
    "OFFLINE", "ONLINE", "TUNNEL_TYPES", "UPDATE", "PortEvent", "PortTable", "Row", "classify",
    "port_state", "transition",
]

Row = dict[str, Any]

TUNNEL_TYPES = frozenset({"vxlan", "gre", "geneve"})
ONLINE, OFFLINE, UPDATE = "online", "offline", "update"


@dataclass(frozen=True, slots=True)
class PortEvent:
    """
    One port's change.  C{ofport} is None while nothing assigned one (no
    ovs-vswitchd); C{tunnel_type} is C{type} for tunnels and None
    otherwise.  An C{offline} event carries the last known fields.
    """

    kind: str
    action: str
    uuid: str
    name: str
    type: str
    ofport: int | None
    iface_id: str | None
    attached_mac: str | None
    remote_ip: str | None
    tunnel_type: str | None
    peer: str | None
    admin_state: str | None

    @property
    def online(self) -> bool:
        """Whether this state of the port counts as online."""
        return self.ofport != -1


def classify(type_: str, external_ids: Mapping[str, str], options: Mapping[str, str]) -> str:
    """The kind of an interface (see the module docstring)."""
    if type_ in TUNNEL_TYPES and options.get("remote_ip"):
        return "tunnel"
    if type_ == "patch" and options.get("peer"):
        return "patch"
    if external_ids.get("iface-id"):
        return "vm"
    if type_ == "internal":
        return "bridge"
    return "unknown"


def _one(values: Any) -> Any:
    """The element of an optional column (a set of 0 or 1), or None."""
    return next(iter(values), None) if values else None


def port_state(uuid: str, row: Mapping[str, Any]) -> PortEvent:
    """
    The fields of the port in C{row} (a row of the monitor's cache: maps as
    dicts, optional columns as frozensets), as an event whose action is
    still empty.
    """
    type_ = row["type"]
    external_ids = row["external_ids"]
    options = row["options"]
    ofport = _one(row["ofport"])
    kind = classify(type_, external_ids, options)
    return PortEvent(
        kind=kind,
        action="",
        uuid=uuid,
        name=row["name"],
        type=type_,
        ofport=ofport if isinstance(ofport, int) else None,
        iface_id=external_ids.get("iface-id"),
        attached_mac=external_ids.get("attached-mac"),
        remote_ip=options.get("remote_ip"),
        tunnel_type=type_ if kind == "tunnel" else None,
        peer=options.get("peer"),
        admin_state=_one(row["admin_state"]),
    )


def transition(old: PortEvent | None, new: PortEvent | None) -> PortEvent | None:
    """
    The event for a port going from state C{old} to C{new} (None: no
    row), or None when nothing a subscriber sees changed.
    """
    was = old is not None and old.online
    now = new is not None and new.online
    if now and not was:
        return replace(new, action=ONLINE)  # type: ignore[arg-type]
    if was and not now:
        return replace(new if new is not None else old, action=OFFLINE)  # type: ignore[arg-type]
    if now and old != new:
        return replace(new, action=UPDATE)  # type: ignore[arg-type]
    return None


class PortTable:
    """
    The fold of one Interface table's row changes into port events.

    @ivar rows: uuid -> the row of every interface, online or not.
    @ivar ports: uuid -> the ports currently online, each with its last
        event (action C{online} or C{update}).
    """

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.ports: dict[str, PortEvent] = {}
        self._states: dict[str, PortEvent] = {}  # every row's fields, action ""

    def set(self, uuid: str, row: Row | None) -> PortEvent | None:
        """
        The interface C{uuid} now has C{row} (None: its row is gone).

        @return: the event this gives (L{rows} and L{ports} already
            updated), or None when nothing a subscriber sees changed.
        """
        old = self._states.get(uuid)
        if row is None:
            self.rows.pop(uuid, None)
            self._states.pop(uuid, None)
            new = None
        else:
            self.rows[uuid] = row
            new = self._states[uuid] = port_state(uuid, row)
        event = transition(old, new)
        if event is not None:
            if event.action == OFFLINE:
                del self.ports[uuid]
            else:
                self.ports[uuid] = event
        return event
