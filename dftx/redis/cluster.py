"""
The Redis Cluster client: routes each command to the master of its slot over
one shared connection per node, and follows the cluster as it changes.

- MOVED: the slot is routed to the named node at once, and one refresh of
  the whole map is started (concurrent MOVEDs share it, and refreshes are
  at least C{min_refresh_interval} apart, so a burst of redirects never
  becomes a burst of CLUSTER SHARDS).
- ASK: C{ASKING} and the command go to the named node; the map is unchanged.
- TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN: retried after a backoff.
- A node that cannot be reached, or a connection lost with the command in
  flight: the map is refreshed from any node that answers, and the command
  retried after a backoff.
- After C{retries} attempts the caller gets L{ClusterDownError} (the
  cluster kept saying it cannot serve) or L{DBConnectionError} (no
  connection), each naming the node and the slot.

A non-cluster server (one that answers CLUSTER SHARDS with "cluster support
disabled") is served as one shard owning every slot.

The client is made of two parts it drives: L{dftx.redis.nodes} (the
connections, and what is done on one node: a command sent once, with WAIT;
a SCAN) and L{dftx.redis.slotmap} (reading and installing topologies, and
when refreshes run).  This module routes and retries.

For other layers (pub/sub, the HA watcher) the client offers the pieces it
is made of: L{ClusterClient.owner} (which node serves a slot),
L{ClusterClient.connection} (the shared connection to a node),
L{ClusterClient.new_connection} (a dedicated one, e.g. for SUBSCRIBE),
L{ClusterClient.refresh} (re-read the map now),
L{ClusterClient.on_topology_changed}, and for reads that route themselves
(L{dftx.redis.slotread}) L{ClusterClient.follow_moved} and
L{ClusterClient.retry_pause}.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.python.failure import Failure

from dftx.deferreds import deferred, gather, or_global_reactor
from dftx.endpoints import TLSOptions
from dftx.errors import (
    ClusterDownError, ConnectionClosed, DBConnectionError, NodeUnreachable, NotReplicated,
    ProtocolError, ReplyError,
)
from dftx.redis.connection import NodeConnection, ProtocolClass
from dftx.redis.nodes import Nodes
from dftx.redis.resp import RespProtocol
from dftx.redis.slotmap import SlotMap, TopologyListener
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Topology

__all__ = ["MAX_REDIRECTS", "ClusterClient", "TopologyListener"]

MAX_REDIRECTS = 16
_BUSY = frozenset({"TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"})


class ClusterClient:
    """
    A client of one Redis Cluster (or one non-cluster server).

    @param hosts: seed nodes: C{"host:port"} or Twisted client endpoint
        strings (see L{dftx.redis.endpoints}); any reachable one will do.
    @param retries: attempts per command before the error reaches the caller.
    @param password: sent with AUTH on every new connection
        (C{username} too, for a Redis 6 ACL user).
    @param tls: TLS settings for C{"host:port"} hosts.
    @param timeout: seconds a node may leave commands unanswered before its
        connection is dropped (and the commands retried or failed).
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        retries: int = 3,
        password: str | None = None,
        username: str | None = None,
        tls: TLSOptions | None = None,
        timeout: float = 5.0,
        backoff: float = 0.1,
        max_backoff: float = 1.0,
        min_refresh_interval: float = 0.1,
        reactor: Any = None,
    ) -> None:
        reactor = or_global_reactor(reactor)
        if retries < 1:
            raise ValueError("retries must be >= 1")
        self.retries = retries
        self._reactor = reactor
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._closed = False
        #: counters: refreshes, moved, ask, retries, busy
        self.stats: Counter[str] = Counter()
        self._nodes = Nodes(
            hosts, reactor, self._connection_lost, password=password, username=username,
            tls=tls, timeout=timeout, max_backoff=max_backoff,
        )
        self._map = SlotMap(reactor, self._nodes, self.stats, min_refresh_interval)

    @property
    def topology(self) -> Topology | None:
        """The topology routed by (None before the first is known)."""
        return self._map.topology

    # --- life cycle ---------------------------------------------------------

    @deferred
    async def start(self) -> Topology:
        """
        Learn the topology from the first seed that answers, trying all of
        them up to C{retries} times.

        @return: Deferred firing with the L{Topology}; failing with
            L{DBConnectionError} (or L{ProtocolError} when the only answers
            were not Redis).
        """
        for attempt in range(1, self.retries + 1):
            try:
                return await self.refresh()
            except DBConnectionError:
                if attempt == self.retries:
                    raise
                await self._sleep(attempt + 1)
        raise AssertionError("unreachable")

    def close(self) -> defer.Deferred[None]:
        """Close every connection (after their replies are in)."""
        self._closed = True
        self._map.close()
        return self._nodes.close()

    # --- nodes ----------------------------------------------------------------

    def owner(self, slot: int) -> str | None:
        """The node commands for C{slot} go to now (None: no node serves it)."""
        return self._map.owners[slot]

    def connection(self, address: str, readonly: bool = False) -> NodeConnection:
        """
        The shared connection to the node at C{address} (made on first use);
        with C{readonly}, the shared one that sent READONLY (a replica serves
        reads of its master's slots on it).

        @raise NodeUnreachable: once the client is closed.
        """
        return self._nodes.connection(address, readonly)

    def new_connection(
        self, address: str, protocol_class: ProtocolClass = RespProtocol
    ) -> NodeConnection:
        """
        A new connection of its own to the node at C{address}, with this
        client's endpoint, TLS, AUTH and timeout settings (for commands that
        take over a connection, such as SUBSCRIBE), started.  The caller
        closes it.
        """
        return self._nodes.new_connection(address, protocol_class)

    def _connection_lost(self, conn: NodeConnection, reason: Failure) -> None:
        if not self._closed:
            self._map.refresh_soon()

    # --- topology (see dftx.redis.slotmap) ----------------------------------------

    def on_topology_changed(self, listener: TopologyListener) -> None:
        """Call C{listener(old, new)} whenever a refresh finds a different
        topology (C{old} is None the first time)."""
        self._map.on_changed(listener)

    def remove_topology_listener(self, listener: TopologyListener) -> None:
        """Undo L{on_topology_changed}."""
        self._map.remove_listener(listener)

    def apply_topology(self, topology: Topology) -> None:
        """
        Route by C{topology}, learnt elsewhere (the HA watcher's message),
        without asking any node: connections to nodes not in it are
        closed and listeners told, as after a refresh.  Should it be out of
        date, the first MOVED or lost connection corrects it.
        """
        if not self._closed:
            self._map.install(topology)

    def refresh(self) -> defer.Deferred[Topology]:
        """
        Read the topology now (or join the read already under way).

        @return: Deferred firing with the new L{Topology}; failing with
            L{DBConnectionError} (or L{ProtocolError} when the only answers
            were not Redis).
        """
        return self._map.refresh()

    # --- commands -----------------------------------------------------------------

    def execute(
        self,
        *args: bytes | str | int | float,
        slot: int,
        resend: bool = True,
        replicas: int = 0,
    ) -> defer.Deferred[Any]:
        """
        Run a command on the master of C{slot}, following redirects and
        retrying as the module docstring says.

        @param resend: when False, a command whose connection was lost after
            it was sent is not sent again (for commands that must not run
            twice); the caller gets L{DBConnectionError}.
        @param replicas: wait (Redis WAIT) until this many replicas have the
            write; L{NotReplicated} when they do not within half the timeout.
        @return: Deferred firing with the reply (bytes, int, list, None);
            failing with L{ReplyError} for an error reply other than those
            handled here, L{DBConnectionError}/L{ClusterDownError}, or
            L{ProtocolError}.
        """
        address = self._map.owners[slot]
        if self._closed:
            return defer.fail(DBConnectionError(address, "client closed", slot))
        if address is None or replicas:
            return self._run(args, slot, resend, replicas, None, None)
        conn = self._nodes.connection(address)
        extra = (args, slot, resend, address)
        return conn.execute(*args).addCallbacks(
            self._first_reply, self._first_failure, callbackArgs=extra, errbackArgs=extra
        )

    def _first_reply(self, reply: Any, args: tuple, slot: int, resend: bool, node: str) -> Any:
        if isinstance(reply, ReplyError):
            return self._run(args, slot, resend, 0, node, reply)
        return reply

    def _first_failure(
        self, failure: Failure, args: tuple, slot: int, resend: bool, node: str
    ) -> defer.Deferred[Any]:
        return self._run(args, slot, resend, 0, node, failure)

    @deferred
    async def _run(
        self,
        args: tuple,
        slot: int,
        resend: bool,
        replicas: int,
        node: str | None,
        outcome: Any,
    ) -> Any:
        """The slow path: send (again) until a usable reply or out of
        attempts.  @return: Deferred firing as L{execute}'s does."""
        attempt = 1
        redirects = 0
        ask: str | None = None
        applied: list[Any] = []  # replies of writes done but not replicated
        while True:
            if outcome is None:
                node = ask or self._map.owners[slot]
                if node is None:
                    outcome = Failure(ClusterDownError(None, "no node serves the slot", slot))
                else:
                    outcome = await self._nodes.send(
                        node, args, ask is not None, replicas, slot, applied)
                ask = None
            if isinstance(outcome, ReplyError):
                if outcome.kind in ("MOVED", "ASK"):
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise DBConnectionError(
                            node, f"more than {MAX_REDIRECTS} redirections ({outcome.message})", slot
                        )
                    if outcome.kind == "MOVED":
                        self.follow_moved(outcome, node)
                    else:
                        self.stats["ask"] += 1
                        ask = self.redirect_target(outcome, node)[1]
                    outcome = None
                    continue
                if outcome.kind not in _BUSY:
                    raise outcome
                self.stats["busy"] += 1
                error: DBConnectionError = ClusterDownError(node, outcome.message, slot)
            elif isinstance(outcome, Failure):
                error = self._retryable(outcome, node, slot, resend)
            else:
                return outcome
            if attempt >= self.retries:
                if applied:
                    raise NotReplicated(node, error.reason, slot, applied[0])
                raise error
            attempt += 1
            await self.retry_pause(attempt)
            outcome = None

    def _retryable(
        self, failure: Failure, node: str | None, slot: int, resend: bool
    ) -> DBConnectionError:
        """The error to retry (or give up with) for a failed send; raise
        at once for what must not be retried."""
        err = failure.value
        if isinstance(err, NodeUnreachable) or (resend and isinstance(err, ConnectionClosed)):
            return DBConnectionError(node, err.reason, slot)
        if isinstance(err, ConnectionClosed):
            raise DBConnectionError(
                node, f"{err.reason}; the command may or may not have run", slot
            )
        failure.raiseException()
        raise AssertionError("unreachable")

    def follow_moved(self, reply: ReplyError, node: str | None) -> str:
        """
        Route the slot of the C{MOVED slot host:port} reply that C{node}
        sent to its new node from now on, and refresh the map soon.

        @return: the new node.
        @raise ProtocolError: when the reply is not a redirection.
        """
        slot, target = self.redirect_target(reply, node)
        self.stats["moved"] += 1
        self._map.owners[slot] = target
        self._map.refresh_soon()
        return target

    def retry_pause(self, attempt: int) -> defer.Deferred[None]:
        """Before attempt C{attempt} (2 or more) of something that failed:
        counted in C{stats["retries"]}, a backoff, then a map refresh unless
        one just ran.  @return: Deferred firing with None: try again."""
        self.stats["retries"] += 1
        return self._sleep(attempt).addCallback(lambda _: self._map.refresh_recent())

    def redirect_target(self, reply: ReplyError, node: str | None) -> tuple[int, str]:
        """
        The slot and node of a C{MOVED slot host:port} / C{ASK ...} reply
        that C{node} sent.

        @raise ProtocolError: when the reply is not a redirection.
        """
        parts = reply.message.split()
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= SLOTS:
            raise ProtocolError(f"bad redirection {reply.message!r}", node)
        target = parts[2]
        if target.startswith(":"):  # unknown endpoint: same host, that port
            target = (node or "").rpartition(":")[0] + target
        return int(parts[1]), target

    def _sleep(self, attempt: int) -> defer.Deferred[None]:
        delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 2))
        delay *= random.uniform(0.5, 1.0)
        return task.deferLater(self._reactor, delay, lambda: None)

    # --- keyless commands ------------------------------------------------------

    def execute_on(self, address: str, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """
        Run a keyless command on one node, once (no redirects, no retries).

        @return: Deferred firing with the reply; failing with L{ReplyError}
            for an error reply, L{DBConnectionError} or L{ProtocolError}.
        """
        return self._nodes.execute_on(address, *args)

    @deferred
    async def scan(self, match: bytes, count: int = 1000) -> set[bytes]:
        """
        Every key matching the SCAN pattern C{match}, on every master.  A
        node that fails makes the whole scan start over (after a refresh),
        up to C{retries} times, as does a topology change seen during the
        scan.

        @return: Deferred firing with a set of keys (bytes).
        """
        attempt = 1
        while True:
            topology = self.topology
            if self._closed:
                raise DBConnectionError(None, "client closed")
            if topology is None:
                raise DBConnectionError(None, "client not started")
            node: str | None = None
            try:
                pages = await gather(
                    self._nodes.scan(n, match, count) for n in topology.masters
                )
                if self.topology == topology:
                    return set().union(*pages)
                error: DBConnectionError = DBConnectionError(
                    None, "topology kept changing during SCAN")
            except DBConnectionError as e:
                node, error = e.node, e
            if attempt >= self.retries:
                raise DBConnectionError(node, f"SCAN: {error.reason}")
            attempt += 1
            await self.retry_pause(attempt)

