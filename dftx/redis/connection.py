"""
One reconnecting connection to one Redis node.

L{NodeConnection} drives a L{RespProtocol} with Twisted's C{ClientService}:
once started it connects (and AUTHs, and sends READONLY on a connection for
reads from a replica), reconnects with exponential backoff whenever the
connection is lost or AUTH is refused, and lets any number of commands be
in flight at once.

Its one L{State} says what a command meets:

    IDLE --start--> CONNECTING --connected--> AUTHENTICATING --ready--> UP
                      ^    |                        |                  |
                      |  failed               refused/lost            lost
                      |    v                        |                  |
                      +- DOWN <---------------------+    CONNECTING <--+

    (any state --close--> CLOSED)

Commands issued while IDLE, CONNECTING or AUTHENTICATING wait for the
connection; those waiting when it comes UP are sent, and those waiting when
the attempt (or its AUTH) fails get L{NodeUnreachable}.  Commands issued
while DOWN (the last attempt failed, the next is scheduled) or CLOSED fail
at once with L{NodeUnreachable}, so that a caller with its own retry policy
(the cluster client) is never held up by the backoff.
"""

from __future__ import annotations

import enum
import random
from typing import Any, Callable

import hiredis
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import Shared, deferred
from dftx.errors import NodeUnreachable, ReplyError
from dftx.reconnect import ReportingEndpoint, SessionBackoff
from dftx.redis.resp import RespProtocol

__all__ = ["NodeConnection", "ProtocolClass", "State"]

log = Logger()

ProtocolClass = Callable[[str, IReactorTime, float], RespProtocol]


class State(enum.Enum):
    """Where a L{NodeConnection} is (see the module docstring)."""

    IDLE = "idle"  # made, not started
    CONNECTING = "connecting"  # an attempt is under way, or follows a lost connection
    AUTHENTICATING = "authenticating"  # connected, AUTH under way
    UP = "up"  # ready for commands
    DOWN = "down"  # the last attempt failed; the next waits for the backoff
    CLOSED = "closed"


_WAITING = frozenset({State.IDLE, State.CONNECTING, State.AUTHENTICATING})


class NodeConnection:
    """
    A connection to the node at C{address}, kept up from L{start} until
    L{close}.

    @param readonly: send READONLY after AUTH on every connection, so that
        a replica serves reads of its master's slots (L{dftx.redis.slotread}).

    @ivar address: C{"host:port"} (or C{"unix:/path"}) of the node.
    @ivar state: the connection's L{State}.
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
        readonly: bool = False,
    ) -> None:
        self.address = address
        self.readonly = readonly
        self.state = State.IDLE
        self._reactor = reactor
        self._password = password
        self._username = username
        self._timeout = timeout
        self._protocol_class = protocol_class
        self._proto: RespProtocol | None = None  # set when UP
        self._why = ""  # why, when DOWN
        self._queue: list[tuple[bytes, int, defer.Deferred[Any]]] = []
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

    def __repr__(self) -> str:
        return f"<NodeConnection {self.address} {self.state.value}>"

    def start(self) -> None:
        """Connect, and keep connecting until L{close}."""
        if self.state is State.IDLE:
            self._become(State.CONNECTING)
            self._service.startService()

    # --- state ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True when a connection is up and ready for commands."""
        return self.state is State.UP

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

    def _become(self, state: State, proto: RespProtocol | None = None, why: str = "") -> None:
        """
        Enter C{state} (C{proto} is the live protocol when UP, C{why} the
        reason when DOWN): coming UP sends the waiting commands, going DOWN
        or CLOSED fails them.
        """
        self.state, self._proto, self._why = state, proto, why
        if state in _WAITING or not self._queue:
            return
        queue, self._queue = self._queue, []
        for data, replies, d in queue:
            if proto is not None:
                proto.execute_packed(data, replies).chainDeferred(d)
            else:
                d.errback(NodeUnreachable(self.address, why or "connection closed"))

    # --- commands -----------------------------------------------------------

    def execute(self, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """
        Send one command.

        @return: Deferred firing with the reply (a L{ReplyError} value for
            an error reply), or failing with L{NodeUnreachable} (never sent),
            L{ConnectionClosed} (sent, outcome unknown) or
            L{dftx.errors.ProtocolError}.
        """
        return self._send(hiredis.pack_command(args), 1)

    def execute_asking(self, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """C{ASKING} then the command, back to back; fires with the
        command's reply."""
        return self._send(hiredis.pack_command(("ASKING",)) + hiredis.pack_command(args), 2)

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

    def _send(self, data: bytes, replies: int) -> defer.Deferred[Any]:
        if self._proto is not None:
            return self._proto.execute_packed(data, replies)
        if self.state in _WAITING:
            d: defer.Deferred[Any] = defer.Deferred()
            self._queue.append((data, replies, d))
            return d
        return defer.fail(NodeUnreachable(self.address, self._why or "connection closed"))

    # --- connection life cycle ----------------------------------------------

    def _attempting(self) -> None:
        if self.state is not State.CLOSED:
            self._become(State.CONNECTING)

    def _attempt_failed(self, reason: Failure) -> None:
        if self.state is not State.CLOSED:
            self._become(State.DOWN, why=f"cannot connect: {reason.getErrorMessage()}")

    def _build(self) -> RespProtocol:
        proto = self._protocol_class(self.address, self._reactor, self._timeout)
        proto.notify_made(self._session)
        return proto

    def _session(self, proto: RespProtocol) -> None:
        """A connection was made: AUTH on it (when configured), then use it.
        Run from the connection rather than as ClientService's
        prepareConnection (see L{dftx.reconnect})."""
        if self.state is State.CLOSED:
            proto.transport.abortConnection()
            return
        self._become(State.AUTHENTICATING)
        self._authenticate(proto).addCallbacks(
            lambda _: self._ready(proto), lambda f: self._session_failed(proto, f)
        )

    @deferred
    async def _authenticate(self, proto: RespProtocol) -> None:
        """AUTH when a password is configured, then READONLY when asked
        for.  @return: Deferred firing with None, or failing with
        L{NodeUnreachable}."""
        if self._password is not None:
            await self._setup(proto, "AUTH", *(
                (self._username, self._password) if self._username else (self._password,)))
        if self.readonly:
            await self._setup(proto, "READONLY")

    async def _setup(self, proto: RespProtocol, *args: str) -> None:
        try:
            reply = await proto.execute(*args)
        except Exception as e:
            raise NodeUnreachable(self.address, f"{args[0]}: {getattr(e, 'reason', e)}") from None
        if isinstance(reply, ReplyError):
            raise NodeUnreachable(self.address, f"{args[0]} refused: {reply.message}")

    def _session_failed(self, proto: RespProtocol, failure: Failure) -> None:
        if self.state is not State.CLOSED:
            self._retry.failed()
            error = failure.value
            why = error.reason if isinstance(error, NodeUnreachable) else str(error)
            log.warn("Redis node {node}: {why}", node=self.address, why=why)
            self._become(State.DOWN, why=why)
        if not proto.closed:
            proto.transport.abortConnection()

    def _ready(self, proto: RespProtocol) -> None:
        if self.state is State.CLOSED:
            proto.transport.abortConnection()
            return
        self._retry.ready()
        proto.notify_lost(self._lost)
        self._become(State.UP, proto)
        for cb in list(self._connected_listeners):
            try:
                cb(proto)
            except Exception:
                log.failure("on_connected listener {cb!r} of {node} failed",
                            cb=cb, node=self.address)

    def _lost(self, proto: RespProtocol, reason: Failure) -> None:
        if self._proto is not proto or self.state is State.CLOSED:
            return
        self._become(State.CONNECTING)
        log.info("lost connection to Redis node {node}: {reason}",
                 node=self.address, reason=reason.getErrorMessage())
        for cb in list(self._lost_listeners):
            cb(self, reason)

    def close(self) -> defer.Deferred[None]:
        """
        Stop reconnecting; let the commands in flight get their replies
        (for at most the timeout), then disconnect.  Commands issued after
        this fail with L{NodeUnreachable}.

        @return: Deferred firing with None once disconnected.
        """
        if self.state is State.CLOSED:
            return defer.succeed(None)
        started = self.state is not State.IDLE
        proto = self._proto
        self._become(State.CLOSED, why="connection closed")
        return self._drain_and_stop(proto, started)

    @deferred
    async def _drain_and_stop(self, proto: RespProtocol | None, started: bool) -> None:
        if proto is not None and proto.in_flight:
            deadline = self._reactor.seconds() + self._timeout
            while proto.in_flight and not proto.closed and self._reactor.seconds() < deadline:
                d: defer.Deferred[None] = defer.Deferred()
                self._reactor.callLater(0.01, d.callback, None)
                await d
        if started:
            await self._service.stopService()


def _jitter() -> float:
    return random.uniform(0, 0.05)


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, owner: NodeConnection) -> None:
        self._owner = owner

    def buildProtocol(self, addr: Any) -> RespProtocol:
        return self._owner._build()
