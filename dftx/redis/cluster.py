"""
The Redis Cluster client: routes each command to the master of its slot over
one shared connection per node, and follows the cluster as it changes.

- MOVED: the slot is routed to the named node at once, and one refresh of
  the whole map is started (concurrent MOVEDs share it, and refreshes are
  at least C{min_refresh_interval} apart, so a burst of redirects never
  becomes a burst of CLUSTER SLOTS).
- ASK: C{ASKING} and the command go to the named node; the map is unchanged.
- TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN: retried after a backoff.
- A node that cannot be reached, or a connection lost with the command in
  flight: the map is refreshed from any node that answers, and the command
  retried after a backoff.
- After C{retries} attempts the caller gets L{ClusterDownError} (the
  cluster kept saying it cannot serve) or L{DBConnectionError} (no
  connection), each naming the node and the slot.

A non-cluster server (one that answers CLUSTER SLOTS with "cluster support
disabled") is served as one shard owning every slot.

For other layers (pub/sub, the HA watcher) the client offers the pieces it
is made of: L{ClusterClient.owner} (which node serves a slot),
L{ClusterClient.connection} (the shared connection to a node),
L{ClusterClient.new_connection} (a dedicated one, e.g. for SUBSCRIBE),
L{ClusterClient.refresh} (re-read the map now) and
L{ClusterClient.on_topology_changed}.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Callable, Sequence

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.endpoints import TLSOptions
from dftx.errors import (
    ClusterDownError, ConnectionClosed, DBConnectionError, NodeUnreachable, NotReplicated,
    ProtocolError, ReplyError,
)
from dftx.deferreds import Shared, gather
from dftx.redis.connection import NodeConnection, ProtocolClass
from dftx.redis.endpoints import NodeEndpoints
from dftx.redis.resp import RespProtocol
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Topology, parse_cluster_slots

log = Logger()

MAX_REDIRECTS = 16
_BUSY = frozenset({"TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"})

TopologyListener = Callable[[Topology | None, Topology], object]



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
        if reactor is None:
            from twisted.internet import reactor
        if retries < 1:
            raise ValueError("retries must be >= 1")
        self.retries = retries
        self._reactor = reactor
        self._endpoints = NodeEndpoints(hosts, reactor, tls, timeout)
        self._password = password
        self._username = username
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._min_refresh_interval = min_refresh_interval
        self._conns: dict[str, NodeConnection] = {}
        self._owners: list[str | None] = [None] * SLOTS
        self.topology: Topology | None = None
        self._refreshing: Shared | None = None
        self._last_refresh = -math.inf
        self._scheduled: IDelayedCall | None = None
        self._listeners: list[TopologyListener] = []
        self._closed = False
        #: counters: refreshes, moved, ask, retries, busy
        self.stats: Counter[str] = Counter()

    # --- life cycle ---------------------------------------------------------

    def start(self) -> defer.Deferred[Topology]:
        """
        Learn the topology from the first seed that answers, trying all of
        them up to C{retries} times.

        @return: Deferred firing with the L{Topology}; failing with
            L{DBConnectionError} (or L{ProtocolError} when the only answers
            were not Redis).
        """
        return defer.ensureDeferred(self._start())

    async def _start(self) -> Topology:
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
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        conns, self._conns = list(self._conns.values()), {}
        return defer.DeferredList(
            [c.close() for c in conns], consumeErrors=True
        ).addCallback(lambda _: None)

    # --- nodes ----------------------------------------------------------------

    def owner(self, slot: int) -> str | None:
        """The node commands for C{slot} go to now (None: no node serves it)."""
        return self._owners[slot]

    def connection(self, address: str) -> NodeConnection:
        """
        The shared connection to the node at C{address} (made on first use).

        @raise NodeUnreachable: once the client is closed.
        """
        conn = self._conns.get(address)
        if conn is None:
            if self._closed:
                raise NodeUnreachable(address, "client closed")
            conn = self._conns[address] = self.new_connection(address)
            conn.on_lost(self._connection_lost)
        return conn

    def new_connection(
        self, address: str, protocol_class: ProtocolClass = RespProtocol
    ) -> NodeConnection:
        """
        A new connection of its own to the node at C{address}, with this
        client's endpoint, TLS, AUTH and timeout settings (for commands that
        take over a connection, such as SUBSCRIBE), started.  The caller
        closes it.
        """
        conn = NodeConnection(
            address,
            self._endpoints.endpoint(address),
            self._reactor,
            password=self._password,
            username=self._username,
            timeout=self._timeout,
            max_backoff=self._max_backoff,
            protocol_class=protocol_class,
        )
        conn.start()
        return conn

    def _connection_lost(self, conn: NodeConnection, reason: Failure) -> None:
        if not self._closed:
            self._refresh_soon()

    # --- topology ---------------------------------------------------------------

    def on_topology_changed(self, listener: TopologyListener) -> None:
        """Call C{listener(old, new)} whenever a refresh finds a different
        topology (C{old} is None the first time)."""
        self._listeners.append(listener)

    def remove_topology_listener(self, listener: TopologyListener) -> None:
        """Undo L{on_topology_changed}."""
        self._listeners.remove(listener)

    def apply_topology(self, topology: Topology) -> None:
        """
        Route by C{topology}, learnt elsewhere (the HA watcher's message),
        without asking any node: connections to nodes not in it are
        closed and listeners told, as after a refresh.  Should it be out of
        date, the first MOVED or lost connection corrects it.
        """
        if not self._closed:
            self._install(topology)

    def refresh(self) -> defer.Deferred[Topology]:
        """
        Read CLUSTER SLOTS now (or join the read already under way).

        @return: Deferred firing with the new L{Topology}.
        """
        if self._refreshing is not None:
            return self._refreshing.wait()
        shared = self._refreshing = Shared()
        waiter = shared.wait()  # before starting: the refresh may end at once
        defer.ensureDeferred(self._refresh()).addBoth(self._refreshed, shared)
        return waiter

    def _refreshed(self, result: Any, shared: Shared) -> None:
        self._refreshing = None
        self._last_refresh = self._reactor.seconds()
        shared.fire(result)

    def _refresh_soon(self) -> None:
        """Refresh once, soon: at once unless one ran very recently."""
        if self._refreshing is not None or self._closed:
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

    async def _refresh_recent(self) -> None:
        """After a connection failure: a refresh, unless one just ran."""
        if self._refreshing is None:
            if self._reactor.seconds() - self._last_refresh < self._min_refresh_interval:
                return
        await self._refresh_quietly()

    async def _refresh(self) -> Topology:
        self.stats["refreshes"] += 1
        errors: list[Exception] = []
        for address in self._refresh_candidates():
            try:
                topology = await self._read_topology(address)
            except (DBConnectionError, ProtocolError) as e:
                errors.append(e)
                continue
            self._install(topology)
            return topology
        if errors and all(isinstance(e, ProtocolError) for e in errors):
            raise errors[0]
        raise DBConnectionError(
            None, "no node answered CLUSTER SLOTS: " + "; ".join(map(str, errors))
        )

    def _refresh_candidates(self) -> list[str]:
        known = self.topology.nodes if self.topology else []
        ordered = dict.fromkeys([*known, *self._endpoints.seeds])
        up = [a for a in ordered if a in self._conns and self._conns[a].connected]
        return list(dict.fromkeys([*up, *ordered]))

    async def _read_topology(self, address: str) -> Topology:
        reply = await self.connection(address).execute("CLUSTER", "SLOTS")
        if isinstance(reply, ReplyError):
            if "cluster support disabled" in reply.message:
                return Topology.single(address)
            raise DBConnectionError(address, f"CLUSTER SLOTS: {reply.message}")
        topology = parse_cluster_slots(reply, address)
        if not topology.shards:
            raise DBConnectionError(address, "CLUSTER SLOTS: no slot is assigned")
        return topology

    def _install(self, topology: Topology) -> None:
        old, self.topology = self.topology, topology
        self._owners = topology.owners()
        keep = set(topology.nodes)
        for address in [a for a in self._conns if a not in keep]:
            self._conns.pop(address).close()
        if old != topology:
            log.info("Redis topology: {topology}", topology=topology)
            for listener in list(self._listeners):
                try:
                    listener(old, topology)
                except Exception:
                    log.failure("topology listener {listener} failed", listener=listener)

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
        address = self._owners[slot]
        if address is None or replicas:
            return defer.ensureDeferred(self._run(args, slot, resend, replicas, None, None))
        conn = self._conns.get(address) or self.connection(address)
        extra = (args, slot, resend, address)
        return conn.execute(*args).addCallbacks(
            self._first_reply, self._first_failure, callbackArgs=extra, errbackArgs=extra
        )

    def _first_reply(self, reply: Any, args: tuple, slot: int, resend: bool, node: str) -> Any:
        if isinstance(reply, ReplyError):
            return defer.ensureDeferred(self._run(args, slot, resend, 0, node, reply))
        return reply

    def _first_failure(
        self, failure: Failure, args: tuple, slot: int, resend: bool, node: str
    ) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._run(args, slot, resend, 0, node, failure))

    async def _run(
        self,
        args: tuple,
        slot: int,
        resend: bool,
        replicas: int,
        node: str | None,
        outcome: Any,
    ) -> Any:
        """The slow path: send (again) until a usable reply or out of attempts."""
        attempt = 1
        redirects = 0
        ask: str | None = None
        applied: list[Any] = []  # replies of writes done but not replicated
        while True:
            if outcome is None:
                node = ask or self._owners[slot]
                if node is None:
                    outcome = Failure(ClusterDownError(None, "no node serves the slot", slot))
                else:
                    outcome = await self._send(node, args, ask is not None, replicas, slot, applied)
                ask = None
            if isinstance(outcome, ReplyError):
                if outcome.kind in ("MOVED", "ASK"):
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise DBConnectionError(
                            node, f"more than {MAX_REDIRECTS} redirections ({outcome.message})", slot
                        )
                    moved_slot, target = self._redirect(outcome, node)
                    if outcome.kind == "MOVED":
                        self.stats["moved"] += 1
                        self._owners[moved_slot] = target
                        self._refresh_soon()
                    else:
                        self.stats["ask"] += 1
                        ask = target
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
            self.stats["retries"] += 1
            await self._sleep(attempt)
            await self._refresh_recent()
            outcome = None

    async def _send(
        self,
        node: str,
        args: tuple,
        asking: bool,
        replicas: int,
        slot: int,
        applied: list[Any],
    ) -> Any:
        """Send once; return the reply or a Failure (raise only
        L{NotReplicated}, and L{DBConnectionError} once closed)."""
        if self._closed:
            raise DBConnectionError(node, "client closed", slot)
        conn = self.connection(node)
        try:
            reply = await (conn.execute_asking(*args) if asking else conn.execute(*args))
        except Exception:
            return Failure()
        if not replicas or isinstance(reply, ReplyError):
            return reply
        wait_timeout = self._timeout / 2
        try:
            acked = await conn.wait_replicas(replicas, wait_timeout)
        except Exception:
            applied.append(reply)
            return Failure()
        if isinstance(acked, int) and acked >= replicas:
            return reply
        what = acked.message if isinstance(acked, ReplyError) else f"{acked} replicas"
        raise NotReplicated(
            node,
            f"the write reached {what}, not {replicas}, within {wait_timeout:g}s",
            slot,
            applied[0] if applied else reply,
        )

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

    def _redirect(self, reply: ReplyError, node: str | None) -> tuple[int, str]:
        """The slot and node of C{MOVED slot host:port} / C{ASK ...}."""
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
        return self.connection(address).execute(*args).addCallback(_raise_reply_error)

    def scan(self, match: bytes, count: int = 1000) -> defer.Deferred[set[bytes]]:
        """
        Every key matching the SCAN pattern C{match}, on every master.  A
        node that fails makes the whole scan start over (after a refresh),
        up to C{retries} times, as does a topology change seen during the
        scan.

        @return: Deferred firing with a set of keys (bytes).
        """
        return defer.ensureDeferred(self._scan(match, count))

    async def _scan(self, match: bytes, count: int) -> set[bytes]:
        attempt = 1
        while True:
            topology = self.topology
            if topology is None:
                raise DBConnectionError(None, "client not started")
            node: str | None = None
            try:
                pages = await gather(
                    self._scan_node(n, match, count) for n in topology.masters
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
            self.stats["retries"] += 1
            await self._sleep(attempt)
            await self._refresh_recent()

    async def _scan_node(self, node: str, match: bytes, count: int) -> set[bytes]:
        keys: set[bytes] = set()
        cursor = b"0"
        while True:
            reply = await self.execute_on(node, "SCAN", cursor, "MATCH", match, "COUNT", count)
            if (
                not isinstance(reply, list)
                or len(reply) != 2
                or not isinstance(reply[0], bytes)
                or not isinstance(reply[1], list)
                or not all(isinstance(k, bytes) for k in reply[1])
            ):
                raise ProtocolError(f"SCAN: unexpected reply {reply!r:.100}", node)
            cursor = reply[0]
            keys.update(reply[1])
            if cursor == b"0":
                return keys


def _raise_reply_error(reply: Any) -> Any:
    if isinstance(reply, ReplyError):
        raise reply
    return reply
