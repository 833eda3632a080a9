"""
The NB database on Redis Cluster (or one non-cluster Redis server).

Rows are plain Redis strings at C{{table.topic}key} (C{{table.}key} without
topic): the hash tag keeps one tenant's rows of a table in one slot, and
C{redis-cli -c GET} reads them.  Lookups without a topic, and the listing
and deleting of tables, SCAN every master for the table's pattern, then read
or delete in batches of keys that share a slot (MGET/DEL), all batches in
flight at once over the one connection per node.

Writes: C{create_key} is C{SET key value GET} and C{set_key} is C{SET key
value XX GET}; with C{wait_replicas = N} each write is followed by C{WAIT}.
A write whose connection is lost is sent again (up to C{retries} attempts);
a write that the master took but that did not reach N replicas is undone
(the previous value put back, unless someone changed the row since) and
reported as L{DBConnectionError}: a write is only ever reported done when it
was done.  A delete is not undone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from twisted.internet import defer
from zope.interface import implementer

from dftx.db.api import INbDbDriver, check_names, check_value
from dftx.deferreds import deferred, gather
from dftx.endpoints import TLSOptions, tls_from_config
from dftx.errors import (
    DBConnectionError, DBKeyAmbiguous, DBKeyNotFound, NotReplicated, ProtocolError, ReplyError,
)
from dftx.redis.cluster import ClusterClient
from dftx.redis.slots import key_slot

__all__ = ["UNIQUE_KEY_TABLE", "RedisDbDriver", "row_key"]

UNIQUE_KEY_TABLE = "unique_key"
_BATCH = 500
_GLOB = frozenset("*?[]\\")

# Put the old value back only if the row still holds the value we wrote.
_UNDO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[3])
  else redis.call('DEL', KEYS[1]) end
  return 1
end
return 0
"""


def row_key(table: str, key: str, topic: str | None) -> str:
    """The Redis key of a row: C{{table.topic}key}."""
    return f"{{{table}.{topic or ''}}}{key}"


def _glob(text: str) -> str:
    return "".join("\\" + c if c in _GLOB else c for c in text)


def _parse(table: str, raw: bytes) -> tuple[str | None, str] | None:
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


@implementer(INbDbDriver)
class RedisDbDriver:
    """
    L{INbDbDriver} over a L{ClusterClient}.

    @param hosts: seed nodes, C{"host:port"} or Twisted client endpoint
        strings (C{ssl:...} for TLS, see L{dftx.redis.endpoints}).
    @param retries: attempts per command before the error reaches the caller.
    @param wait_replicas: replicas each write must reach before it is
        acknowledged (0: do not wait).
    @param password: for AUTH (C{username} too, for an ACL user).
    @param tls: TLS settings for C{"host:port"} hosts.
    @param timeout: seconds a node may leave a command unanswered.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        retries: int = 3,
        *,
        wait_replicas: int = 0,
        password: str | None = None,
        username: str | None = None,
        tls: TLSOptions | None = None,
        timeout: float = 5.0,
        reactor: Any = None,
    ) -> None:
        self.client = ClusterClient(
            hosts, retries=retries, password=password, username=username,
            tls=tls, timeout=timeout, reactor=reactor,
        )
        self.wait_replicas = wait_replicas

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "RedisDbDriver":
        """A driver for a L{dftx.config.Config}: [df] remote_db_hosts and
        the [df_redis] section."""
        r = config.df_redis
        return cls(
            list(config.df.remote_db_hosts), r.retries,
            wait_replicas=r.wait_replicas, tls=tls_from_config(r),
            password=r.password or None, username=r.username or None, **kwargs,
        )

    def initialize(self) -> defer.Deferred[None]:
        return self.client.start().addCallback(lambda _: None)

    def close(self) -> defer.Deferred[None]:
        return self.client.close()

    # --- rows ------------------------------------------------------------------

    @deferred
    async def create_key(
        self, table: str, key: str, value: str, topic: str | None = None
    ) -> None:
        topic = check_names(table, key, topic)
        check_value(value)
        await self._write(row_key(table, key, topic), value, ())

    @deferred
    async def get_key(self, table: str, key: str, topic: str | None = None) -> str:
        rkey, topic = await self._find(table, key, topic)
        value = await self._command("GET", rkey, slot=key_slot(rkey))
        if value is None:
            raise DBKeyNotFound(table, key, topic)
        return self._text(value, rkey)

    @deferred
    async def set_key(self, table: str, key: str, value: str, topic: str | None = None) -> None:
        check_value(value)
        rkey, topic = await self._find(table, key, topic)
        if await self._write(rkey, value, ("XX",)) is None:
            raise DBKeyNotFound(table, key, topic)

    @deferred
    async def delete_key(self, table: str, key: str, topic: str | None = None) -> None:
        rkey, topic = await self._find(table, key, topic)
        # Not sent twice: a second DEL after a lost reply would say 0.
        deleted = await self._command(
            "DEL", rkey, slot=key_slot(rkey), resend=False, replicas=self.wait_replicas
        )
        if deleted == 0:
            raise DBKeyNotFound(table, key, topic)

    async def _write(self, rkey: str, value: str, flags: tuple[str, ...]) -> bytes | None:
        """SET with GET (and C{flags}); undo it if it did not replicate.
        @return: the previous value (None: there was none, nothing written
        with XX)."""
        slot = key_slot(rkey)
        try:
            old = await self._command(
                "SET", rkey, value, *flags, "GET", slot=slot, replicas=self.wait_replicas
            )
        except NotReplicated as e:
            undone = await self._undo(rkey, value, e.reply, slot)
            raise DBConnectionError(e.node, f"{e.reason}; {undone}", e.slot) from None
        if old is not None and not isinstance(old, bytes):
            raise ProtocolError(f"SET {rkey!r}: unexpected reply {old!r:.100}", self.client.owner(slot))
        return old

    async def _undo(self, rkey: str, value: str, old: Any, slot: int) -> str:
        restore = ("1", old) if isinstance(old, bytes) else ("0", "")
        try:
            done = await self._command("EVAL", _UNDO, 1, rkey, value, *restore, slot=slot)
        except Exception as e:
            return f"undoing it failed too ({e})"
        return "the write was undone" if done else "not undone: the row changed since"

    # --- lookups and listings ------------------------------------------------------

    async def _find(self, table: str, key: str, topic: str | None) -> tuple[str, str | None]:
        """The Redis key and topic of a row; a topic-less lookup SCANs."""
        topic = check_names(table, key, topic)
        if topic is not None:
            return row_key(table, key, topic), topic
        pattern = "{" + _glob(table) + ".*}" + _glob(key)
        found = {}
        for raw in await self.client.scan(pattern.encode("utf-8")):
            parsed = _parse(table, raw)
            if parsed is not None and parsed[1] == key:
                found[parsed[0]] = raw.decode("utf-8")
        if not found:
            raise DBKeyNotFound(table, key)
        if len(found) > 1:
            raise DBKeyAmbiguous(table, key, found)
        [(topic, rkey)] = found.items()
        return rkey, topic

    async def _rows(self, table: str, topic: str | None) -> list[tuple[str | None, str, bytes]]:
        """(topic, key, Redis key) of every row of C{table} (under C{topic})."""
        topic = check_names(table, topic=topic)
        pattern = "{" + _glob(table) + "." + (_glob(topic) + "}*" if topic else "*")
        rows = []
        for raw in await self.client.scan(pattern.encode("utf-8")):
            parsed = _parse(table, raw)
            if parsed is not None and (topic is None or parsed[0] == topic):
                rows.append((parsed[0], parsed[1], raw))
        return rows

    @deferred
    async def get_all_keys(self, table: str, topic: str | None = None) -> list[str]:
        return [key for _, key, _ in await self._rows(table, topic)]

    @deferred
    async def get_all_entries(self, table: str, topic: str | None = None) -> list[str]:
        return [value for _, _, value in await self.get_all_rows(table, topic)]

    @deferred
    async def get_all_rows(
        self, table: str, topic: str | None = None
    ) -> list[tuple[str | None, str, str]]:
        """SCAN, then MGET in batches of one slot; a row deleted in between
        is left out."""
        rows = {raw: (t, key) for t, key, raw in await self._rows(table, topic)}
        found = []
        for batch, replies in await self._per_slot("MGET", list(rows)):
            if not isinstance(replies, list) or len(replies) != len(batch):
                raise ProtocolError(f"MGET: unexpected reply {replies!r:.100}")
            found.extend(
                (*rows[k], self._text(v, k)) for k, v in zip(batch, replies) if v is not None
            )
        return found

    async def _per_slot(self, command: str, keys: list[bytes]) -> list[tuple[list[bytes], Any]]:
        """Run C{command} on C{keys} in batches of one slot each, all at once."""
        by_slot: defaultdict[int, list[bytes]] = defaultdict(list)
        for k in keys:
            by_slot[key_slot(k)].append(k)
        batches = [
            (slot, ks[i:i + _BATCH])
            for slot, ks in by_slot.items()
            for i in range(0, len(ks), _BATCH)
        ]
        replies = await gather(
            self._command(command, *batch, slot=slot) for slot, batch in batches
        )
        return [(batch, reply) for (_, batch), reply in zip(batches, replies)]

    # --- tables and counters -----------------------------------------------------

    @deferred
    async def create_table(self, table: str) -> None:
        # Tables exist through their rows; nothing to store.
        check_names(table)

    @deferred
    async def delete_table(self, table: str) -> None:
        await self._per_slot("DEL", [raw for _, _, raw in await self._rows(table, None)])

    @deferred
    async def allocate_unique_key(self, table: str) -> int:
        check_names(table)
        rkey = row_key(UNIQUE_KEY_TABLE, table, None)
        value = await self._command("INCR", rkey, slot=key_slot(rkey))
        if not isinstance(value, int):
            raise ProtocolError(f"INCR {rkey!r}: unexpected reply {value!r:.100}")
        return value

    # --- helpers ---------------------------------------------------------------------

    async def _command(self, *args: Any, slot: int, **kwargs: Any) -> Any:
        """A routed command; an error reply (WRONGTYPE...) is a ProtocolError."""
        try:
            return await self.client.execute(*args, slot=slot, **kwargs)
        except ReplyError as e:
            raise ProtocolError(f"{args[0]}: unexpected error reply {e.message!r}", e.node) from None

    def _text(self, value: Any, rkey: str | bytes) -> str:
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        raise ProtocolError(f"value of {rkey!r} is not UTF-8 text: {value!r:.100}")
