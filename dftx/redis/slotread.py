"""
One slot's keys and their values, at a cost that grows with the keys of
that slot and not with the database's: C{CLUSTER GETKEYSINSLOT} on the
slot's master, then C{MGET} of the keys the caller keeps, in batches.

Every MGET batch also names a I{probe}: a key of the slot that never exists
(the caller chooses it).  On the master of a stable slot it reads as nil;
a node that no longer serves the slot (a stale map) answers the batch with
MOVED, and a master migrating the slot with ASK or TRYAGAIN.  The batches
are sent once the listing is in, so a batch that is served means the
listing saw every key: a migration begun before it would still be under way
(ASK, TRYAGAIN) or over (MOVED).

- MOVED: the slot is routed to the new node and the read starts over.
- ASK / TRYAGAIN, a migration under way: the source's keys are listed, then
  the target's (in that order: keys only move from source to target, so
  none is missed), and each key is read with a GET routed as any command
  (ASK followed).
- A lost connection, a node that does not answer, CLUSTERDOWN, LOADING...:
  the read starts over after the client's backoff and map refresh, up to
  its C{retries} attempts; then L{DBConnectionError} naming node and slot.

With C{replicas}, the listing and the MGETs go to a replica of the slot's
master on a READONLY connection (a reader picks one of the master's
replicas at random, so a fleet spreads over them), and one C{EXISTS} of the
probe on the master, after the listing, checks that the slot is not being
migrated (a replica cannot tell).  Whatever goes wrong there (no replica,
a replica that does not answer or redirects, a migration) falls back to
the master.  A replica lags its master by its replication delay; see
doc/design.md ("Reads that cost what they return") for what that means for
a mirror.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from dftx.deferreds import deferred, gather
from dftx.errors import ClusterDownError, DBConnectionError, ProtocolError, ReplyError
from dftx.redis.cluster import MAX_REDIRECTS, ClusterClient
from dftx.redis.connection import NodeConnection

__all__ = ["SlotReader"]

# GETKEYSINSLOT's count: Redis 6.2+ and Valkey clamp it to the keys the slot
# holds before allocating or walking anything (checked in their sources).
_ALL = 2 ** 31 - 1
_BATCH = 500
_BUSY = frozenset({"CLUSTERDOWN", "LOADING", "MASTERDOWN"})

Keep = Callable[[bytes], bool]


class SlotReader:
    """
    Reads of one slot's keys through C{client} (see the module docstring).

    @param replicas: read from a replica of the slot's master when there is
        one that answers.
    """

    def __init__(self, client: ClusterClient, replicas: bool = False) -> None:
        self.client = client
        self.replicas = replicas
        self._pick = random.randrange(1 << 16)

    @deferred
    async def read(
        self, slot: int, probe: bytes, keep: Keep, extra: Sequence[bytes] = ()
    ) -> dict[bytes, Any]:
        """
        The values of every key of C{slot} that C{keep} accepts, and of the
        C{extra} keys (of the same slot); keys without a value are left out.

        @param probe: a key of C{slot} that never exists.
        @return: Deferred firing with C{{key: value}} (values as the node
            sent them: bytes for strings); failing with
            L{DBConnectionError} (L{dftx.errors.ClusterDownError}) when out
            of attempts, L{ReplyError} for an unexpected error reply, or
            L{ProtocolError}.
        """
        if self.replicas:
            found = await self._from_replica(slot, probe, keep, extra)
            if found is not None:
                return found
        attempt, redirects = 1, 0
        while True:
            node = self.client.owner(slot)
            try:
                outcome = await self._attempt(node, slot, probe, keep, extra)
            except DBConnectionError as e:
                outcome = e
            if isinstance(outcome, dict):
                return outcome
            if isinstance(outcome, ReplyError):
                if outcome.kind in ("MOVED", "ASK", "TRYAGAIN"):
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise DBConnectionError(node, f"more than {MAX_REDIRECTS} "
                                                f"redirections ({outcome.message})", slot)
                    if outcome.kind == "MOVED":
                        self.client.follow_moved(outcome, node)
                    continue
                if outcome.kind not in _BUSY:
                    raise outcome
                outcome = ClusterDownError(node, outcome.message, slot)
            if attempt >= self.client.retries:
                raise type(outcome)(outcome.node or node, outcome.reason, slot)
            attempt += 1
            await self.client.retry_pause(attempt)

    @deferred
    async def get(self, key: bytes, slot: int) -> Any:
        """
        GET C{key} (of C{slot}): from a replica of its master with
        C{replicas} when one answers, else routed as any command.

        @return: Deferred firing with the reply; failing as
            L{ClusterClient.execute} does.
        """
        replica = self._replica(slot) if self.replicas else None
        if replica is not None:
            try:
                reply = await self.client.connection(replica, readonly=True).execute("GET", key)
            except DBConnectionError:
                reply = None
            else:
                if not isinstance(reply, ReplyError):
                    self.client.stats["replica_reads"] += 1
                    return reply
        if self.replicas:
            self.client.stats["replica_fallbacks"] += 1
        return await self.client.execute("GET", key, slot=slot)

    # --- the steps ----------------------------------------------------------------

    async def _attempt(
        self, node: str | None, slot: int, probe: bytes, keep: Keep, extra: Sequence[bytes]
    ) -> dict[bytes, Any] | ReplyError:
        """One read from the master C{node}, through a migration if one is
        under way: the values, or the error reply that stopped it."""
        if node is None:
            raise ClusterDownError(None, "no node serves the slot", slot)
        outcome = await self._from_master(node, slot, probe, keep, extra)
        if isinstance(outcome, ReplyError) and outcome.kind in ("ASK", "TRYAGAIN"):
            found = await self._migrating(node, slot, probe, keep, extra)
            return outcome if found is None else found
        return outcome

    async def _from_master(
        self, node: str, slot: int, probe: bytes, keep: Keep, extra: Sequence[bytes]
    ) -> dict[bytes, Any] | ReplyError:
        """List on C{node}, then MGET there: the values, or the error reply
        that stopped it."""
        conn = self.client.connection(node)
        keys = await self._list(conn, slot, keep)
        if isinstance(keys, ReplyError):
            return keys
        return await self._mget(conn, probe, [*extra, *keys])

    async def _migrating(
        self, source: str, slot: int, probe: bytes, keep: Keep, extra: Sequence[bytes]
    ) -> dict[bytes, Any] | None:
        """The read while C{slot} moves from C{source} to the node its ASK
        names; None when it has stopped moving (start over)."""
        conn = self.client.connection(source)
        reply = await conn.execute("EXISTS", probe)
        if not isinstance(reply, ReplyError) or reply.kind != "ASK":
            return None
        target = self.client.redirect_target(reply, source)[1]
        keys = set()
        for node in (source, target):  # in this order: see the module docstring
            listed = await self._list(self.client.connection(node), slot, keep)
            if isinstance(listed, ReplyError):
                return None
            keys.update(listed)
        wanted = [*extra, *keys]
        values = await gather(self.client.execute("GET", k, slot=slot) for k in wanted)
        return {k: v for k, v in zip(wanted, values) if v is not None}

    async def _from_replica(
        self, slot: int, probe: bytes, keep: Keep, extra: Sequence[bytes]
    ) -> dict[bytes, Any] | None:
        """The read from a replica, checked on the master; None to fall back."""
        master, replica = self.client.owner(slot), self._replica(slot)
        if master is None or replica is None:
            self.client.stats["replica_fallbacks"] += 1
            return None
        try:
            conn = self.client.connection(replica, readonly=True)
            keys = await self._list(conn, slot, keep)
            if not isinstance(keys, ReplyError):
                found, check = await gather([
                    self._mget(conn, probe, [*extra, *keys]),
                    self.client.connection(master).execute("EXISTS", probe),
                ])
                if isinstance(found, dict) and check == 0:
                    self.client.stats["replica_reads"] += 1
                    return found
        except (DBConnectionError, ProtocolError):
            pass
        self.client.stats["replica_fallbacks"] += 1
        return None

    def _replica(self, slot: int) -> str | None:
        """The replica this reader reads C{slot} from (None: none known)."""
        master, topology = self.client.owner(slot), self.client.topology
        replicas = topology.replicas_of(master) if master and topology else []
        return replicas[self._pick % len(replicas)] if replicas else None

    async def _list(self, conn: NodeConnection, slot: int, keep: Keep) -> list[bytes] | ReplyError:
        reply = await conn.execute("CLUSTER", "GETKEYSINSLOT", slot, _ALL)
        if isinstance(reply, ReplyError):
            return reply
        if not isinstance(reply, list) or not all(isinstance(k, bytes) for k in reply):
            raise ProtocolError(f"CLUSTER GETKEYSINSLOT: unexpected reply {reply!r:.100}",
                                conn.address)
        return [k for k in reply if keep(k)]

    async def _mget(
        self, conn: NodeConnection, probe: bytes, keys: list[bytes]
    ) -> dict[bytes, Any] | ReplyError:
        batches = [keys[i:i + _BATCH] for i in range(0, len(keys), _BATCH)] or [[]]
        replies = await gather(conn.execute("MGET", probe, *b) for b in batches)
        found: dict[bytes, Any] = {}
        for batch, reply in zip(batches, replies):
            if isinstance(reply, ReplyError):
                return reply
            if not isinstance(reply, list) or len(reply) != len(batch) + 1:
                raise ProtocolError(f"MGET: unexpected reply {reply!r:.100}", conn.address)
            found.update((k, v) for k, v in zip(batch, reply[1:]) if v is not None)
        return found
