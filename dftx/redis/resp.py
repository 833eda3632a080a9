"""
RESP2 over one connection: commands are written as soon as they are issued,
any number may be in flight, and replies are matched to them in order.

Replies are parsed by C{hiredis.Reader} (C code; see doc/design.md for why
not txredisapi's protocol): bulk and status replies are C{bytes}, integers
C{int}, arrays C{list}, nil C{None}, and an error reply is a L{ReplyError}
I{returned as the value} (not raised), so that a cluster client can look at
MOVED/ASK without paying for a Failure on every redirect.

Whatever breaks the stream (a byte that is not RESP, a reply nobody asked
for) fails every command in flight with L{ProtocolError} naming the peer and
closes the connection: the reply stream cannot be trusted after that.  A
connection that stops answering for C{timeout} seconds while commands are in
flight is closed too, and its commands fail with L{ConnectionClosed}.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import hiredis
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from dftx.errors import ConnectionClosed, ProtocolError, ReplyError

__all__ = ["RespProtocol"]


class RespProtocol(protocol.Protocol):
    """
    A pipelining RESP2 client protocol.

    @ivar peer: C{"host:port"} of the node, for errors.
    """

    def __init__(self, peer: str, clock: IReactorTime, timeout: float) -> None:
        self.peer = peer
        self._clock = clock
        self._timeout = timeout
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._pending: deque[defer.Deferred[Any]] = deque()
        self._last_progress = 0.0
        self._watchdog: IDelayedCall | None = None
        self._made_callbacks: list[Callable[["RespProtocol"], None]] = []
        self._lost_callbacks: list[Callable[["RespProtocol", Failure], None]] = []
        self.closed = False

    # --- issuing commands -------------------------------------------------

    def execute(self, *args: bytes | str | int | float) -> defer.Deferred[Any]:
        """
        Write one command.

        @return: Deferred firing with the reply (a L{ReplyError} for an
            error reply); failing with L{ConnectionClosed} or
            L{ProtocolError} when the connection breaks first.
        """
        if self.closed:
            return defer.fail(ConnectionClosed(self.peer, "connection closed"))
        return self.execute_packed(hiredis.pack_command(args))

    def execute_packed(self, data: bytes, replies: int = 1) -> defer.Deferred[Any]:
        """
        Write already-encoded commands (C{data}) expecting C{replies}
        replies; return the Deferred of the last one (the others are
        discarded: use it for C{ASKING} + command).
        """
        if self.closed:
            return defer.fail(ConnectionClosed(self.peer, "connection closed"))
        if not self._pending:
            self._last_progress = self._clock.seconds()
            if self._watchdog is None:
                self._watchdog = self._clock.callLater(self._timeout, self._check_stall)
        for _ in range(replies - 1):
            self._pending.append(defer.Deferred().addErrback(lambda _: None))
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending.append(d)
        self.transport.write(data)
        return d

    @property
    def in_flight(self) -> int:
        """Commands written and not yet answered."""
        return len(self._pending)

    def notify_made(self, callback: Callable[["RespProtocol"], None]) -> None:
        """Call C{callback(protocol)} once the connection is made."""
        self._made_callbacks.append(callback)

    def connectionMade(self) -> None:
        callbacks, self._made_callbacks = self._made_callbacks, []
        for cb in callbacks:
            cb(self)

    def notify_lost(self, callback: Callable[["RespProtocol", Failure], None]) -> None:
        """Call C{callback(protocol, reason)} once the connection is gone."""
        self._lost_callbacks.append(callback)

    # --- replies ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        self._last_progress = self._clock.seconds()
        while not self.closed:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as e:
                self._fail_stream(f"not RESP: {e}")
                return
            if reply is False:
                return
            self.reply_received(reply)

    def reply_received(self, reply: Any) -> None:
        """
        Hand C{reply} to the oldest command in flight.  A subclass that gets
        push messages (pub/sub) overrides this to pick those out first.
        """
        if not self._pending:
            self._fail_stream(f"unexpected reply with no command in flight: {reply!r:.100}")
            return
        if isinstance(reply, ReplyError):
            reply.node = self.peer
        self._pending.popleft().callback(reply)

    def _fail_stream(self, reason: str) -> None:
        self._close(Failure(ProtocolError(reason, self.peer)))

    # --- stalls and loss -------------------------------------------------------

    def _check_stall(self) -> None:
        self._watchdog = None
        if not self._pending or self.closed:
            return
        idle = self._clock.seconds() - self._last_progress
        if idle >= self._timeout:
            self._close(Failure(ConnectionClosed(
                self.peer, f"no reply within {self._timeout:g}s"
            )))
        else:
            self._watchdog = self._clock.callLater(self._timeout - idle, self._check_stall)

    def _close(self, reason: Failure) -> None:
        """Fail everything in flight with C{reason} and drop the connection."""
        self.closed = True
        self._fail_pending(reason)
        self.transport.abortConnection()

    def _fail_pending(self, reason: Failure) -> None:
        pending, self._pending = self._pending, deque()
        for d in pending:
            d.errback(reason)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._fail_pending(Failure(ConnectionClosed(
            self.peer, f"connection lost: {reason.getErrorMessage()}"
        )))
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for cb in callbacks:
            cb(self, reason)
