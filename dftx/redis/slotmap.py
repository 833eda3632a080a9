"""
Which node serves each slot, and keeping that current: the half of the
cluster client (L{dftx.redis.cluster}) that reads and installs topologies.

A refresh reads the topology from the first node that answers (the nodes
up first, then the rest of the known nodes, then the seeds), and closes the
shared connections to nodes that are no longer in the cluster; refreshes
asked for while one is under way share it.  It reads CLUSTER SHARDS (Redis
7+, Valkey); a node that answers it with an error but answers CLUSTER
SLOTS (deprecated since Redis 7.0, the only one before) makes every later
refresh read CLUSTER SLOTS: one command per refresh either way, and two
only once on a server without CLUSTER SHARDS.  L{SlotMap.refresh_soon} (after
a MOVED or a lost connection) refreshes at once unless one ran less than
C{min_refresh_interval} ago, in which case it runs once that long after the
last, so that a burst of redirects never becomes a burst of topology reads.
Each topology installed (read here or learnt elsewhere) replaces the slot
map; listeners hear of it when it differs from the one before.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import Joined, deferred
from dftx.errors import DBConnectionError, ProtocolError, ReplyError
from dftx.redis.nodes import Nodes
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Topology, parse_cluster_shards, parse_cluster_slots

__all__ = ["SlotMap", "TopologyListener"]

log = Logger()

TopologyListener = Callable[[Topology | None, Topology], object]


class SlotMap:
    """
    The slot map of the cluster C{nodes} reach (see the module docstring).

    @param stats: counts C{refreshes}.

    @ivar topology: the topology installed last (None before the first).
    @ivar owners: the master of each slot (None: no node serves it); a
        MOVED reply changes one in place.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        nodes: Nodes,
        stats: Counter[str],
        min_refresh_interval: float = 0.1,
    ) -> None:
        self._reactor = reactor
        self._nodes = nodes
        self._stats = stats
        self._min_refresh_interval = min_refresh_interval
        self.topology: Topology | None = None
        self.owners: list[str | None] = [None] * SLOTS
        self._listeners: list[TopologyListener] = []
        self._refreshes = Joined(self._timed_refresh)
        self._last_refresh = -math.inf
        self._scheduled: IDelayedCall | None = None
        self._closed = False
        # False once a node refused CLUSTER SHARDS and answered CLUSTER SLOTS.
        self._shards = True

    def close(self) -> None:
        """Refresh no more on L{refresh_soon}."""
        self._closed = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()

    def on_changed(self, listener: TopologyListener) -> None:
        """Call C{listener(old, new)} whenever a different topology is
        installed (C{old} is None the first time)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TopologyListener) -> None:
        """Undo L{on_changed}."""
        self._listeners.remove(listener)

    def install(self, topology: Topology) -> None:
        """Route by C{topology} from now on; close the connections to
        nodes not in it."""
        old, self.topology = self.topology, topology
        self.owners = topology.owners()
        self._nodes.keep_only(topology.nodes)
        if old != topology:
            log.info("Redis topology: {topology}", topology=topology)
            for listener in list(self._listeners):
                try:
                    listener(old, topology)
                except Exception:
                    log.failure("topology listener {listener} failed", listener=listener)

    def refresh(self) -> defer.Deferred[Topology]:
        """
        Read the topology now (or join the read already under way), and
        install it.

        @return: Deferred firing with the new L{Topology}; failing with
            L{DBConnectionError} (or L{ProtocolError} when the only answers
            were not Redis).
        """
        return self._refreshes()

    def _timed_refresh(self) -> defer.Deferred[Topology]:
        return self._refresh().addBoth(self._refreshed)

    def _refreshed(self, result: Any) -> Any:
        self._last_refresh = self._reactor.seconds()
        return result

    def refresh_soon(self) -> None:
        """Refresh once, soon: at once unless one ran very recently."""
        if self._refreshes.running or self._closed:
            return
        if self._scheduled is not None and self._scheduled.active():
            return
        wait = self._last_refresh + self._min_refresh_interval - self._reactor.seconds()
        if wait > 0:
            self._scheduled = self._reactor.callLater(wait, self._refresh_quietly)
        else:
            self._refresh_quietly()

    def _refresh_quietly(self) -> defer.Deferred[None]:
        self._scheduled = None
        if self._closed:
            return defer.succeed(None)
        return self.refresh().addErrback(self._refresh_failed)

    def _refresh_failed(self, failure: Failure) -> None:
        log.warn("topology refresh failed: {error}", error=failure.getErrorMessage())

    @deferred
    async def refresh_recent(self) -> None:
        """After a connection failure: a refresh (its errors logged), unless
        one just ran.  @return: Deferred firing with None when it is done."""
        if not self._refreshes.running:
            if self._reactor.seconds() - self._last_refresh < self._min_refresh_interval:
                return
        await self._refresh_quietly()

    @deferred
    async def _refresh(self) -> Topology:
        self._stats["refreshes"] += 1
        errors: list[Exception] = []
        for address in self._candidates():
            try:
                topology = await self._read(address)
            except (DBConnectionError, ProtocolError) as e:
                errors.append(e)
                continue
            self.install(topology)
            return topology
        if errors and all(isinstance(e, ProtocolError) for e in errors):
            raise errors[0]
        command = "CLUSTER SHARDS" if self._shards else "CLUSTER SLOTS"
        raise DBConnectionError(
            None, f"no node answered {command}: " + "; ".join(map(str, errors))
        )

    def _candidates(self) -> list[str]:
        known = self.topology.nodes if self.topology else []
        ordered = dict.fromkeys([*known, *self._nodes.seeds])
        up = [a for a in ordered if self._nodes.is_up(a)]
        return list(dict.fromkeys([*up, *ordered]))

    async def _read(self, address: str) -> Topology:
        conn = self._nodes.connection(address)
        if self._shards:
            reply = await conn.execute("CLUSTER", "SHARDS")
            if not isinstance(reply, ReplyError) or _cluster_disabled(reply):
                return _topology(reply, address, "CLUSTER SHARDS", parse_cluster_shards)
            slots = await conn.execute("CLUSTER", "SLOTS")
            if isinstance(slots, ReplyError):
                raise DBConnectionError(address, f"CLUSTER SHARDS: {reply.message}")
            log.info("{node} refuses CLUSTER SHARDS ({error}): reading CLUSTER SLOTS from now on",
                     node=address, error=reply.message)
            self._shards = False
            return _topology(slots, address, "CLUSTER SLOTS", parse_cluster_slots)
        reply = await conn.execute("CLUSTER", "SLOTS")
        return _topology(reply, address, "CLUSTER SLOTS", parse_cluster_slots)


def _cluster_disabled(reply: ReplyError) -> bool:
    return "cluster support disabled" in reply.message


def _topology(
    reply: Any, address: str, command: str, parse: Callable[[Any, str], Topology]
) -> Topology:
    """The topology in C{reply} to C{command} from C{address}."""
    if isinstance(reply, ReplyError):
        if _cluster_disabled(reply):
            return Topology.single(address)
        raise DBConnectionError(address, f"{command}: {reply.message}")
    topology = parse(reply, address)
    if not topology.shards:
        raise DBConnectionError(address, f"{command}: no slot is assigned")
    return topology
