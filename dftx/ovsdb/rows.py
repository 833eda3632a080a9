"""
The monitored columns of the Interface table, from their RFC 7047 JSON to
the rows the monitor caches (see L{dftx.ovsdb.ports} for their shape):
maps as dicts, optional columns as frozensets of 0 or 1 value.
"""

from __future__ import annotations

from typing import Any, Mapping

from dftx.errors import ProtocolError
from dftx.ovsdb.ports import Row

__all__ = ["COLUMNS", "EMPTY_ROW", "TABLE", "apply_diff", "datum", "full_row"]

TABLE = "Interface"
COLUMNS = ("name", "type", "external_ids", "options", "ofport", "admin_state", "mac_in_use")
MAPS = frozenset({"external_ids", "options"})
SETS = frozenset({"ofport", "admin_state", "mac_in_use"})  # optional: 0 or 1 value
EMPTY_ROW: Row = {
    "name": "", "type": "", "external_ids": {}, "options": {},
    "ofport": frozenset(), "admin_state": frozenset(), "mac_in_use": frozenset(),
}


def _atom(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 2 and value[0] in ("uuid", "named-uuid"):
        return value[1]
    return value


def datum(column: str, value: Any) -> Any:
    """A column's JSON value (RFC 7047 section 5.1) as the cache keeps it."""
    if column in MAPS:
        if not (isinstance(value, list) and len(value) == 2 and value[0] == "map"):
            raise ProtocolError(f"{TABLE}.{column}: not a map: {value!r:.80}")
        return {_atom(k): _atom(v) for k, v in value[1]}
    if column in SETS:
        if isinstance(value, list) and len(value) == 2 and value[0] == "set":
            return frozenset(_atom(v) for v in value[1])
        return frozenset([_atom(value)])
    return _atom(value)


def full_row(columns: Mapping[str, Any]) -> Row:
    """A row from a full (possibly default-omitting) column set."""
    row = dict(EMPTY_ROW)
    for column, value in columns.items():
        if column in row:
            row[column] = datum(column, value)
    return row


def apply_diff(row: Row, diff: Mapping[str, Any]) -> Row:
    """
    Apply an update2 C{modify}.  Columns that hold at most one value
    (scalars, and optional columns such as ofport) get the new value, as
    ovsdb-server sends it; in maps a key given with its current value is
    removed, with another value replaced, and a new key is added.  (Sets of
    more than one value would toggle the elements given; this table's
    monitored columns have none.)
    """
    new = dict(row)
    for column, value in diff.items():
        if column not in new:
            continue
        change = datum(column, value)
        if column in MAPS:
            merged = dict(new[column])
            for k, v in change.items():
                if merged.get(k) == v:
                    del merged[k]
                else:
                    merged[k] = v
            new[column] = merged
        else:
            new[column] = change
    return new
