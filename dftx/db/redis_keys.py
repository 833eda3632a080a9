"""
What L{dftx.db.redis} stores in Redis, and the Lua scripts that write it:
rows at C{{table.topic}key} (C{{table.}key} without topic), plain strings;
each (table, topic)'s version at C{~v{table.topic}}, a counter in the rows'
slot (same hash tag) that no row pattern matches; the counters of
C{allocate_unique_key} at C{{unique_key.}table}.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "DELETE", "UNDO", "UNIQUE_KEY_TABLE", "WRITE", "glob", "parse", "row_key", "script_sha",
    "version_key",
]

UNIQUE_KEY_TABLE = "unique_key"
_GLOB = frozenset("*?[]\\")

# KEYS: row, version; ARGV: value, "XX" (write only over a row) or "".
# Returns the old value (nil: there was none).  The version moves only when
# the row changed.
WRITE = """
local old
if ARGV[2] == 'XX' then
  old = redis.call('SET', KEYS[1], ARGV[1], 'XX', 'GET')
  if old == false then return false end
else
  old = redis.call('SET', KEYS[1], ARGV[1], 'GET')
end
if old ~= ARGV[1] then redis.call('INCR', KEYS[2]) end
return old
"""
# KEYS: row, version.  Returns how many rows were deleted.
DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
"""
# Put the old value back only if the row still holds the value we wrote.
# KEYS: row, version; ARGV: our value, "1" and the old value (or "0", "").
UNDO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[3])
  else redis.call('DEL', KEYS[1]) end
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (WRITE, DELETE, UNDO)}


def script_sha(script: str) -> str:
    """The SHA1 of one of the scripts here, for EVALSHA."""
    return _SHA[script]


def row_key(table: str, key: str, topic: str | None) -> str:
    """The Redis key of a row: C{{table.topic}key}."""
    return f"{{{table}.{topic or ''}}}{key}"


def version_key(table: str, topic: str | None) -> str:
    """The Redis key of a (table, topic)'s version: C{~v{table.topic}}."""
    return f"~v{{{table}.{topic or ''}}}"


def glob(text: str) -> str:
    """C{text} with SCAN's glob characters escaped."""
    return "".join("\\" + c if c in _GLOB else c for c in text)


def parse(table: str, raw: bytes) -> tuple[str | None, str] | None:
    """(topic, key) of a row key of C{table}, or None if it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    prefix = "{" + table + "."
    if not text.startswith(prefix):
        return None
    end = text.find("}", len(prefix))
    if end < 0:
        return None
    return text[len(prefix):end] or None, text[end + 1:]
