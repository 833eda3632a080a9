"""
The connections to the nodes of one cluster: one shared connection per
node, made on first use, and dedicated ones on demand (for commands that
take over a connection, such as SUBSCRIBE), all made with the same
endpoint, TLS, AUTH and timeout settings; and what is done on one node:
a command sent once (with ASKING, and WAIT for replicas), a SCAN.  The
part of the cluster client (L{dftx.redis.cluster}) that knows nothing of
slots or retries.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dftx.deferreds import deferred
from dftx.endpoints import TLSOptions
from dftx.errors import DBConnectionError, NodeUnreachable, NotReplicated, ProtocolError, ReplyError
from dftx.redis.connection import NodeConnection, ProtocolClass
from dftx.redis.endpoints import NodeEndpoints
from dftx.redis.resp import RespProtocol

__all__ = ["Nodes"]


class Nodes:
    """
    The connections to one cluster's nodes (see the module docstring).

    @param hosts: the configured hosts (see L{dftx.redis.endpoints}).
    @param on_lost: called with C{(connection, reason)} when a shared
        connection's live connection is lost.

    @ivar seeds: the addresses of the configured hosts, in order.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        reactor: IReactorTime,
        on_lost: Callable[[NodeConnection, Failure], object],
        *,
        password: str | None = None,
        username: str | None = None,
        tls: TLSOptions | None = None,
        timeout: float = 5.0,
        max_backoff: float = 1.0,
    ) -> None:
        self._endpoints = NodeEndpoints(hosts, reactor, tls, timeout)
        self.seeds = self._endpoints.seeds
        self._reactor = reactor
        self._on_lost = on_lost
        self._password = password
        self._username = username
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._shared: dict[tuple[str, bool], NodeConnection] = {}
        self._closed = False

    def connection(self, address: str, readonly: bool = False) -> NodeConnection:
        """
        The shared connection to the node at C{address} (made on first use);
        with C{readonly}, the shared READONLY one (for reads from a replica).

        @raise NodeUnreachable: once closed.
        """
        conn = self._shared.get((address, readonly))
        if conn is None:
            if self._closed:
                raise NodeUnreachable(address, "client closed")
            conn = self._shared[address, readonly] = self.new_connection(
                address, readonly=readonly)
            conn.on_lost(self._on_lost)
        return conn

    def is_up(self, address: str) -> bool:
        """Whether the shared connection to C{address} is up."""
        conn = self._shared.get((address, False))
        return conn is not None and conn.connected

    def new_connection(
        self, address: str, protocol_class: ProtocolClass = RespProtocol, readonly: bool = False
    ) -> NodeConnection:
        """A new connection of its own to the node at C{address} (sending
        READONLY when C{readonly}), started; the caller closes it."""
        conn = NodeConnection(
            address,
            self._endpoints.endpoint(address),
            self._reactor,
            password=self._password,
            username=self._username,
            timeout=self._timeout,
            max_backoff=self._max_backoff,
            protocol_class=protocol_class,
            readonly=readonly,
        )
        conn.start()
        return conn

    def keep_only(self, addresses: Iterable[str]) -> None:
        """Close the shared connections to nodes not in C{addresses}."""
        keep = set(addresses)
        for key in [k for k in self._shared if k[0] not in keep]:
            self._shared.pop(key).close()

    def close(self) -> defer.Deferred[None]:
        """
        Close every shared connection (after their replies are in); make
        no more.

        @return: Deferred firing with None once they are closed.
        """
        self._closed = True
        conns, self._shared = list(self._shared.values()), {}
        return defer.DeferredList(
            [c.close() for c in conns], consumeErrors=True
        ).addCallback(lambda _: None)

    # --- one node ------------------------------------------------------------

    async def send(
        self,
        node: str,
        args: tuple,
        asking: bool,
        replicas: int,
        slot: int,
        applied: list[Any],
    ) -> Any:
        """
        Send a command to C{node} once, after C{ASKING} when C{asking}; with
        C{replicas}, then WAIT for that many replicas (half the timeout).
        A reply the write got before WAIT failed is appended to C{applied}.

        A coroutine (a Deferred could not return a Failure as its value).

        @return: the reply, or the Failure of the send; raise only
            L{NotReplicated} (too few replicas, naming C{slot}), and
            L{DBConnectionError} once closed.
        """
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

    def execute_on(self, address: str, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """
        Run a command on the node at C{address}, once.

        @return: Deferred firing with the reply; failing with L{ReplyError}
            for an error reply, L{DBConnectionError} or L{ProtocolError}.
        """
        if self._closed:
            return defer.fail(DBConnectionError(address, "client closed"))
        return self.connection(address).execute(*args).addCallback(_raise_reply_error)

    @deferred
    async def scan(self, node: str, match: bytes, count: int) -> set[bytes]:
        """@return: Deferred firing with every key of C{node} matching the
        SCAN pattern C{match}."""
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
