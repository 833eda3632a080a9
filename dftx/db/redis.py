"""
The NB database on Redis Cluster (or one non-cluster Redis server).

Rows are plain Redis strings at C{{table.topic}key} (C{{table.}key} without
topic): the hash tag keeps one tenant's rows of a table in one slot, and
C{redis-cli -c GET} reads them.  A read of one topic's rows
(L{RedisDbDriver.get_topic_rows}, and C{get_all_*} given a topic) lists
that slot's keys and reads those of the topic (L{dftx.redis.slotread}), so
it costs what it returns, however large the database; with
C{read_from_replicas} it is served by a replica of the slot's master.
Lookups without a topic, and the listing and deleting of whole tables,
SCAN every master for the table's pattern, then read or delete in batches
of keys that share a slot (MGET/DEL), all batches in flight at once over
the one connection per node.

Each (table, topic) has a version, C{~v{table.topic}}: a counter in the
same slot as the rows, which every write of this driver that changes a row
increments in the same Lua script, atomically (L{get_topic_versions}).  Its
name does not start with C{{}, so no scan pattern of rows (dftx's or
Dragonflow's) matches it.  Writes by other clients do not change it.

Writes (the layout and scripts are in L{dftx.db.redis_keys}): C{create_key}
and C{set_key} run one script (GET the old value, SET the new one and
increment the version when the value changed; C{set_key} writes nothing
when there is no row), C{delete_key} another (DEL, then increment).  While
the slot is being migrated and its row and version are on different nodes
(TRYAGAIN), they are two commands: the row's, then the version's.  With
C{wait_replicas = N} each write is followed by C{WAIT}.
A write whose connection is lost is sent again (up to C{retries} attempts);
a write that the master took but that did not reach N replicas is undone
(the previous value put back, unless someone changed the row since) and
reported as L{DBConnectionError}: a write is only ever reported done when it
was done.  A delete is not undone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

from twisted.internet import defer
from zope.interface import implementer

from dftx.db.api import INbDbDriver, check_names, check_value
from dftx.db.redis_keys import (
    DELETE, UNDO, UNIQUE_KEY_TABLE, WRITE, glob, parse, row_key, script_sha, version_key,
)
from dftx.deferreds import deferred, gather
from dftx.endpoints import TLSOptions, tls_from_config
from dftx.errors import (
    ClusterDownError, DBConnectionError, DBKeyAmbiguous, DBKeyNotFound, NotReplicated, ProtocolError, ReplyError,
)
from dftx.redis.cluster import ClusterClient
from dftx.redis.slotread import SlotReader
from dftx.redis.slots import key_slot

__all__ = ["UNIQUE_KEY_TABLE", "RedisDbDriver", "row_key", "version_key"]

_BATCH = 500


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
    @param read_from_replicas: serve topic reads and version checks from a
        replica of the slot's master (READONLY), falling back to the master.
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
        read_from_replicas: bool = False,
        reactor: Any = None,
    ) -> None:
        self.client = ClusterClient(
            hosts, retries=retries, password=password, username=username,
            tls=tls, timeout=timeout, reactor=reactor,
        )
        self.wait_replicas = wait_replicas
        self.reader = SlotReader(self.client, replicas=read_from_replicas)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "RedisDbDriver":
        """A driver for a L{dftx.config.Config}: [df] remote_db_hosts and
        the [df_redis] section."""
        r = config.df_redis
        return cls(
            list(config.df.remote_db_hosts), r.retries,
            wait_replicas=r.wait_replicas, tls=tls_from_config(r),
            password=r.password or None, username=r.username or None,
            read_from_replicas=r.read_from_replicas, **kwargs,
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
        await self._write(table, key, topic, value, "")

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
        if await self._write(table, key, topic, value, "XX") is None:
            raise DBKeyNotFound(table, key, topic)

    @deferred
    async def delete_key(self, table: str, key: str, topic: str | None = None) -> None:
        rkey, topic = await self._find(table, key, topic)
        # Not sent twice: a second DEL after a lost reply would say 0.
        deleted = await self._script(
            DELETE, (rkey, version_key(table, topic)), (), resend=False,
            replicas=self.wait_replicas,
        )
        if deleted == 0:
            raise DBKeyNotFound(table, key, topic)

    async def _write(
        self, table: str, key: str, topic: str | None, value: str, xx: str
    ) -> bytes | None:
        """Write a row (over an existing one only, with C{xx} "XX"); undo it
        if it did not replicate.  @return: the previous value (None: there
        was none; nothing written with XX)."""
        keys = (row_key(table, key, topic), version_key(table, topic))
        try:
            old = await self._script(WRITE, keys, (value, xx), replicas=self.wait_replicas)
        except NotReplicated as e:
            undone = await self._undo(keys, value, e.reply)
            raise DBConnectionError(e.node, f"{e.reason}; {undone}", e.slot) from None
        if old is not None and not isinstance(old, bytes):
            raise ProtocolError(f"write of {keys[0]!r}: unexpected reply {old!r:.100}",
                                self.client.owner(key_slot(keys[0])))
        return old

    async def _undo(self, keys: tuple[str, str], value: str, old: Any) -> str:
        restore = ("1", old) if isinstance(old, bytes) else ("0", "")
        try:
            done = await self._script(UNDO, keys, (value, *restore))
        except Exception as e:
            return f"undoing it failed too ({e})"
        return "the write was undone" if done else "not undone: the row changed since"

    async def _script(
        self, script: str, keys: tuple[str, ...], args: tuple[Any, ...], **kwargs: Any
    ) -> Any:
        """EVALSHA of C{script} on the keys' slot (EVAL where the node does
        not have it yet: a new node, a restart)."""
        slot = key_slot(keys[0])
        try:
            return await self.client.execute(
                "EVALSHA", script_sha(script), len(keys), *keys, *args, slot=slot, **kwargs)
        except ClusterDownError as e:
            if not e.reason.startswith("TRYAGAIN") or script == UNDO:
                raise
            return await self._split(script, keys, args, **kwargs)
        except ReplyError as e:
            if e.kind != "NOSCRIPT":
                raise ProtocolError(f"script: unexpected error reply {e.message!r}", e.node) from None
        return await self._command("EVAL", script, len(keys), *keys, *args, slot=slot, **kwargs)

    async def _split(
        self, script: str, keys: tuple[str, ...], args: tuple[Any, ...], **kwargs: Any
    ) -> Any:
        """A write script as two commands, the row's, then the version's if
        the row changed: for a slot being migrated, where a command on both
        keys meets TRYAGAIN while one of them has moved and the other not."""
        (row, version), slot = keys, key_slot(keys[0])
        if script == DELETE:
            reply = await self._command("DEL", row, slot=slot, **kwargs)
            changed = reply == 1
        else:
            value, xx = args
            reply = await self._command("SET", row, value, *([xx] if xx else []), "GET",
                                        slot=slot, **kwargs)
            changed = reply != value.encode("utf-8") and not (xx and reply is None)
        if changed:
            await self._command("INCR", version, slot=slot)
        return reply

    # --- lookups and listings ------------------------------------------------------

    async def _find(self, table: str, key: str, topic: str | None) -> tuple[str, str | None]:
        """The Redis key and topic of a row; a topic-less lookup SCANs."""
        topic = check_names(table, key, topic)
        if topic is not None:
            return row_key(table, key, topic), topic
        pattern = "{" + glob(table) + ".*}" + glob(key)
        found = {}
        for raw in await self.client.scan(pattern.encode("utf-8")):
            parsed = parse(table, raw)
            if parsed is not None and parsed[1] == key:
                found[parsed[0]] = raw.decode("utf-8")
        if not found:
            raise DBKeyNotFound(table, key)
        if len(found) > 1:
            raise DBKeyAmbiguous(table, key, found)
        [(topic, rkey)] = found.items()
        return rkey, topic

    async def _rows(self, table: str) -> list[tuple[str | None, str, bytes]]:
        """(topic, key, Redis key) of every row of C{table}, by SCAN."""
        check_names(table)
        rows = []
        for raw in await self.client.scan(("{" + glob(table) + ".*").encode("utf-8")):
            parsed = parse(table, raw)
            if parsed is not None:
                rows.append((parsed[0], parsed[1], raw))
        return rows

    @deferred
    async def get_all_keys(self, table: str, topic: str | None = None) -> list[str]:
        if topic:
            return [key for key, _ in await self.get_topic_rows(table, topic)]
        return [key for _, key, _ in await self._rows(table)]

    @deferred
    async def get_all_entries(self, table: str, topic: str | None = None) -> list[str]:
        return [value for _, _, value in await self.get_all_rows(table, topic)]

    @deferred
    async def get_all_rows(
        self, table: str, topic: str | None = None
    ) -> list[tuple[str | None, str, str]]:
        """A topic's rows as L{get_topic_rows} reads them; every topic's by
        SCAN, then MGET in batches of one slot (a row deleted in between is
        left out)."""
        if topic:
            return [(topic, key, value) for key, value in await self.get_topic_rows(table, topic)]
        rows = {raw: (t, key) for t, key, raw in await self._rows(table)}
        return [(*rows[raw], value) for raw, value in (await self._values(list(rows))).items()]

    @deferred
    async def get_topic_rows(self, table: str, topic: str | None) -> list[tuple[str, str]]:
        """CLUSTER GETKEYSINSLOT on the topic's slot, the keys of exactly
        this topic kept (other hash tags can share the slot), then MGET:
        see L{dftx.redis.slotread}.  A non-cluster server keeps no index of
        its keys by slot: there it is a SCAN for the topic's pattern."""
        topic = check_names(table, topic=topic)
        prefix = row_key(table, "", topic).encode("utf-8")  # also a key that never exists
        topology = self.client.topology
        if topology is not None and not topology.cluster:
            keys = await self.client.scan(glob(prefix.decode("utf-8")).encode("utf-8") + b"?*")
            found = await self._values(sorted(keys))
        else:
            try:
                read = await self.reader.read(
                    key_slot(prefix), prefix, lambda k: k.startswith(prefix) and k != prefix)
            except ReplyError as e:
                raise ProtocolError(f"topic read: unexpected error reply {e.message!r}",
                                    e.node) from None
            found = {k: self._text(v, k) for k, v in read.items()}
        rows = []
        for raw, value in found.items():
            try:
                rows.append((raw[len(prefix):].decode("utf-8"), value))
            except UnicodeDecodeError:
                continue
        return rows

    async def _values(self, keys: list[bytes]) -> dict[bytes, str]:
        """The values of C{keys} (text), by MGET in batches of one slot;
        keys without a value are left out."""
        found = {}
        for batch, replies in await self._per_slot("MGET", keys):
            if not isinstance(replies, list) or len(replies) != len(batch):
                raise ProtocolError(f"MGET: unexpected reply {replies!r:.100}")
            found.update((k, self._text(v, k)) for k, v in zip(batch, replies) if v is not None)
        return found

    @deferred
    async def get_topic_versions(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        """One GET of C{~v{table.topic}} per pair, all at once (from a
        replica with C{read_from_replicas})."""
        pairs = list(pairs)
        keys = [version_key(t, check_names(t, topic=p)).encode("utf-8") for t, p in pairs]
        try:
            replies = await gather(self.reader.get(k, key_slot(k)) for k in keys)
        except ReplyError as e:
            raise ProtocolError(f"GET: unexpected error reply {e.message!r}", e.node) from None
        versions = {}
        for pair, k, v in zip(pairs, keys, replies):
            if v is not None and not (isinstance(v, bytes) and v.isdigit()):
                raise ProtocolError(f"version {k!r}: unexpected value {v!r:.100}")
            versions[pair] = int(v or 0)
        return versions

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
        """SCAN, DEL per slot batch, then increment the version of each
        topic that had rows."""
        rows = await self._rows(table)
        await self._per_slot("DEL", [raw for _, _, raw in rows])
        versions = {version_key(table, topic) for topic, _, _ in rows}
        await gather(self._command("INCR", v, slot=key_slot(v)) for v in versions)

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
