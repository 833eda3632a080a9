"""
One reconnecting connection to one Redis node.

L{NodeConnection} drives a L{RespProtocol} with Twisted's C{ClientService}:
it connects (and AUTHs) when started, reconnects with exponential backoff
whenever the connection is lost or AUTH is refused, and lets any number of
commands be in flight at once.  Commands issued while a (re)connection
attempt is under way wait for it; commands issued while the node is known
to be down (its last attempt failed, the next is scheduled) fail at once
with L{NodeUnreachable}, so that a caller with its own retry policy (the
cluster client) is never held up by the backoff.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import hiredis
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import Shared
from dftx.errors import NodeUnreachable, ReplyError
from dftx.reconnect import ReportingEndpoint, SessionBackoff
from dftx.redis.resp import RespProtocol

log = Logger()

ProtocolClass = Callable[[str, IReactorTime, float], RespProtocol]


class NodeConnection:
    """
    A connection to the node at C{address}, kept up until L{close}.

    @ivar address: C{"host:port"} (or C{"unix:/path"}) of the node.
    """

    def __init__(
        self,
        address: str,
        endpoint: IStreamClientEndpoint,
        reactor: IReactorTime,
        *,
        password: str | None = None,
        username: str | None = None,
        timeout: float = 5.0,
        max_backoff: float = 1.0,
        protocol_class: ProtocolClass = RespProtocol,
    ) -> None:
        self.address = address
        self._reactor = reactor
        self._password = password
        self._username = username
        self._timeout = timeout
        self._protocol_class = protocol_class
        self._proto: RespProtocol | None = None
        self._authenticating = False  # connected, AUTH under way
        self._queue: list[tuple[bytes, int, defer.Deferred[Any]]] = []
        self._awaiting = False
        self._down: str | None = None  # why the last attempt failed
        self._closed = False
        self._connected_listeners: list[Callable[[RespProtocol], object]] = []
        self._lost_listeners: list[Callable[["NodeConnection", Failure], object]] = []
        self._pending_wait: dict[int, Shared] = {}
        # A connection whose AUTH was refused (or lost) counts as failed.
        self._retry = SessionBackoff(backoffPolicy(
            initialDelay=0.05, maxDelay=max_backoff, jitter=_jitter
        ))
        self._service = ClientService(
            ReportingEndpoint(endpoint, self._attempt_failed, self._attempting),
            _Factory(self),
            retryPolicy=self._retry,
            clock=reactor,
        )
        self._service.startService()

    def __repr__(self) -> str:
        state = "up" if self._proto else ("down" if self._down else "connecting")
        return f"<NodeConnection {self.address} {state}>"

    # --- state ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True when a connection is up and ready for commands."""
        return self._proto is not None

    @property
    def protocol(self) -> RespProtocol | None:
        """The live protocol, or None between connections."""
        return self._proto

    def on_connected(self, callback: Callable[[RespProtocol], object]) -> None:
        """Call C{callback(protocol)} on every new connection, once it is
        ready (after AUTH); a subscriber resubscribes there."""
        self._connected_listeners.append(callback)

    def on_lost(self, callback: Callable[["NodeConnection", Failure], object]) -> None:
        """Call C{callback(connection, reason)} whenever a live connection
        is lost."""
        self._lost_listeners.append(callback)

    # --- commands -----------------------------------------------------------

    def execute(self, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """
        Send one command.

        @return: Deferred firing with the reply (a L{ReplyError} value for
            an error reply), or failing with L{NodeUnreachable} (never sent),
            L{ConnectionClosed} (sent, outcome unknown) or
            L{dftx.errors.ProtocolError}.
        """
        data = hiredis.pack_command(args)
        proto = self._proto
        if proto is not None:
            return proto.execute_packed(data)
        return self._enqueue(data, 1)

    def execute_asking(self, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """C{ASKING} then the command, back to back; fires with the
        command's reply."""
        data = hiredis.pack_command(("ASKING",)) + hiredis.pack_command(args)
        proto = self._proto
        if proto is not None:
            return proto.execute_packed(data, replies=2)
        return self._enqueue(data, 2)

    def wait_replicas(self, replicas: int, timeout: float) -> defer.Deferred[int]:
        """
        Redis C{WAIT}: fires with how many replicas acknowledged every write
        made on this connection so far.  Calls made in the same reactor turn
        share one WAIT, sent at the end of the turn, so it covers all the
        writes sent before it.
        """
        shared = self._pending_wait.get(replicas)
        if shared is None:
            shared = self._pending_wait[replicas] = Shared()
            self._reactor.callLater(0, self._send_wait, replicas, timeout)
        return shared.wait()

    def _send_wait(self, replicas: int, timeout: float) -> None:
        shared = self._pending_wait.pop(replicas)
        self.execute("WAIT", replicas, int(timeout * 1000)).addBoth(shared.fire)

    def _enqueue(self, data: bytes, replies: int) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(NodeUnreachable(self.address, "connection closed"))
        if self._down is not None:
            return defer.fail(NodeUnreachable(self.address, self._down))
        d: defer.Deferred[Any] = defer.Deferred()
        self._queue.append((data, replies, d))
        self._await_connection()
        return d

    def _await_connection(self) -> None:
        """Have the queue sent on the next connection (by L{_ready}), or
        failed when the next attempt (or its AUTH) fails."""
        if self._queue and not self._awaiting and not self._closed:
            self._awaiting = True
            self._service.whenConnected(failAfterFailures=1).addCallbacks(
                self._connect_done, self._connect_failed
            )

    def _connect_done(self, proto: Any) -> None:
        self._awaiting = False
        if self._queue and not self._authenticating:
            # The service still saw the connection we just lost: wait for
            # the next one, once it has noticed.  (While AUTH is under way,
            # its outcome sends or fails the queue.)
            self._reactor.callLater(0, self._await_connection)

    def _connect_failed(self, reason: Failure) -> None:
        self._awaiting = False
        why = "connection closed" if self._closed else (
            self._down or reason.getErrorMessage()
        )
        queue, self._queue = self._queue, []
        for _, _, d in queue:
            d.errback(NodeUnreachable(self.address, why))

    # --- connection life cycle ----------------------------------------------

    def _attempting(self) -> None:
        self._down = None

    def _attempt_failed(self, reason: Failure) -> Failure:
        self._down = f"cannot connect: {reason.getErrorMessage()}"
        return reason

    def _build(self) -> RespProtocol:
        proto = self._protocol_class(self.address, self._reactor, self._timeout)
        proto.notify_made(self._session)
        return proto

    def _session(self, proto: RespProtocol) -> None:
        """A connection was made: AUTH on it (when configured), then use it.
        Run from the connection rather than as ClientService's
        prepareConnection (see L{dftx.reconnect})."""
        self._authenticating = True
        defer.ensureDeferred(self._authenticate(proto)).addCallbacks(
            lambda _: self._ready(proto), lambda f: self._session_failed(proto, f)
        )

    async def _authenticate(self, proto: RespProtocol) -> None:
        if self._password is None:
            return
        args = ("AUTH", self._username, self._password) if self._username else (
            "AUTH", self._password)
        try:
            reply = await proto.execute(*args)
        except Exception as e:
            raise NodeUnreachable(self.address, f"AUTH: {getattr(e, 'reason', e)}") from None
        if isinstance(reply, ReplyError):
            raise NodeUnreachable(self.address, f"AUTH refused: {reply.message}")

    def _session_failed(self, proto: RespProtocol, failure: Failure) -> None:
        self._authenticating = False
        self._retry.failed()
        error = failure.value
        self._down = error.reason if isinstance(error, NodeUnreachable) else str(error)
        if not self._closed:
            log.warn("Redis node {node}: {why}", node=self.address, why=self._down)
        queue, self._queue = self._queue, []
        for _, _, d in queue:
            d.errback(NodeUnreachable(self.address, self._down))
        if not proto.closed:
            proto.transport.abortConnection()

    def _ready(self, proto: RespProtocol) -> None:
        self._authenticating = False
        if self._closed:
            proto.transport.abortConnection()
            return
        self._retry.ready()
        proto.notify_lost(self._lost)
        self._proto = proto
        queue, self._queue = self._queue, []
        for data, replies, d in queue:
            proto.execute_packed(data, replies).chainDeferred(d)
        for cb in list(self._connected_listeners):
            try:
                cb(proto)
            except Exception:
                log.failure("on_connected listener {cb!r} of {node} failed",
                            cb=cb, node=self.address)

    def _lost(self, proto: RespProtocol, reason: Failure) -> None:
        if self._proto is proto:
            self._proto = None
        if self._closed:
            return
        log.info("lost connection to Redis node {node}: {reason}",
                 node=self.address, reason=reason.getErrorMessage())
        for cb in list(self._lost_listeners):
            cb(self, reason)

    def close(self) -> defer.Deferred[None]:
        """
        Stop reconnecting; let the commands in flight get their replies
        (for at most the timeout), then disconnect.  Commands issued after
        this fail with L{NodeUnreachable}.
        """
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        queue, self._queue = self._queue, []
        for _, _, d in queue:
            d.errback(NodeUnreachable(self.address, "connection closed"))
        return defer.ensureDeferred(self._drain_and_stop())

    async def _drain_and_stop(self) -> None:
        proto = self._proto
        if proto is not None and proto.in_flight:
            deadline = self._reactor.seconds() + self._timeout
            while proto.in_flight and not proto.closed and self._reactor.seconds() < deadline:
                d: defer.Deferred[None] = defer.Deferred()
                self._reactor.callLater(0.01, d.callback, None)
                await d
        await self._service.stopService()
        self._proto = None


def _jitter() -> float:
    return random.uniform(0, 0.05)


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, owner: NodeConnection) -> None:
        self._owner = owner

    def buildProtocol(self, addr: Any) -> RespProtocol:
        return self._owner._build()
