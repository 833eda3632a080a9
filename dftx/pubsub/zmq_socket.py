"""
One ZeroMQ socket in a Twisted reactor (pyzmq driven directly, no txzmq).

A L{ZmqSocket} is an C{IReadDescriptor} on the socket's ZMQ_FD in the
reactor it is given (the global one when none is).  That fd is
edge-triggered: it becomes readable when the socket's state changed, not
while messages are waiting, so every wake-up reads until C{ZMQ_EVENTS}
shows no POLLIN (at most L{READ_BUDGET} messages per reactor turn, then
the rest in a later turn), and connecting looks at the socket once more.

Sending never blocks the reactor; every send uses NOBLOCK.  A socket that
refuses (EAGAIN: a PUSH socket whose peer is not connected or C{hwm}
messages behind) keeps the message in a local queue of at most
C{send_queue} messages, sent in order once POLLOUT is seen; the send's
Deferred fires when ZeroMQ took the message.  With the queue full the send
errbacks at once with L{PublishError}.

Closing: L{ZmqSocket.close} waits up to C{linger} seconds for the local
queue to drain, errbacks what is still in it with L{PublishError} (never
acknowledged), then closes the socket with ZeroMQ's LINGER set to
C{linger}: ZeroMQ goes on delivering what it accepted for that long, in its
own thread.  The sockets of one reactor share one ZeroMQ context
(L{context}), terminated at that reactor's shutdown, which waits (at most
the sockets' LINGER) for that delivery.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

import zmq
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dftx.deferreds import or_global_reactor
from dftx.errors import PublishError

__all__ = [
    "DEFAULT_HWM", "DEFAULT_LINGER", "DEFAULT_SEND_QUEUE", "READ_BUDGET",
    "ZmqContext", "ZmqSocket", "context",
]

DEFAULT_HWM = 100_000
"""ZeroMQ high-water mark (messages) of every socket, per peer."""
DEFAULT_SEND_QUEUE = 10_000
"""Messages a socket holds while ZeroMQ refuses them."""
DEFAULT_LINGER = 1.0
"""Seconds that closing waits for queued messages to go out."""
READ_BUDGET = 1000
"""Messages read per reactor turn before letting other work run."""
SHUTDOWN_LINGER = 0.1
"""Seconds ZeroMQ keeps delivering for a socket still open when its
reactor shuts down."""

log = Logger()


class ZmqContext:
    """
    The ZeroMQ context of one reactor and the sockets open in it; get it
    with L{context}.  At the reactor's shutdown it closes them and
    terminates the context.

    @ivar context: the C{zmq.Context}.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.context = zmq.Context(1)
        self.sockets: set[ZmqSocket] = set()
        reactor.addSystemEventTrigger("during", "shutdown", self.shutdown)

    def shutdown(self) -> None:
        """Close every socket, then terminate the context (waiting at most
        for the sockets' LINGER); the next L{context} call makes a new one."""
        if _contexts.get(self.reactor) is self:
            del _contexts[self.reactor]
        for sock in list(self.sockets):
            sock.shutdown()
        self.context.term()


_contexts: dict[Any, ZmqContext] = {}


def context(reactor: Any = None) -> ZmqContext:
    """The L{ZmqContext} of C{reactor} (default: the global reactor),
    made on first use."""
    reactor = or_global_reactor(reactor)
    ctx = _contexts.get(reactor)
    if ctx is None:
        ctx = _contexts[reactor] = ZmqContext(reactor)
    return ctx


@implementer(IReadDescriptor)
class ZmqSocket:
    """
    One ZeroMQ socket in the reactor (see the module docstring).

    @param socket_type: C{zmq.PUB}, C{zmq.SUB}, C{zmq.PUSH}, ...
    @param name: what the socket is, for errors and logs.
    @param on_message: called with each received message (a list of
        frames); its exceptions are logged, never raised.
    @param reactor: where the socket is read and its timers run (default:
        the global reactor).
    @ivar socket: the C{zmq.Socket}; None once closed.
    """

    def __init__(
        self,
        socket_type: int,
        name: str,
        hwm: int = DEFAULT_HWM,
        send_queue: int = DEFAULT_SEND_QUEUE,
        on_message: Callable[[list[bytes]], None] | None = None,
        reactor: Any = None,
    ) -> None:
        self._context = context(reactor)
        self.reactor = self._context.reactor
        self.name = name
        self.socket: zmq.Socket | None = self._context.context.socket(socket_type)
        self.socket.set(zmq.SNDHWM, hwm)
        self.socket.set(zmq.RCVHWM, hwm)
        self.socket.set(zmq.LINGER, int(SHUTDOWN_LINGER * 1000))
        self._fd: int = self.socket.get(zmq.FD)
        self._send_queue = send_queue
        self._pending: deque[tuple[Sequence[bytes], defer.Deferred[None]]] = deque()
        self._drained: list[defer.Deferred[None]] = []
        self._on_message = on_message
        self._later: IDelayedCall | None = None
        self._context.sockets.add(self)
        self.reactor.addReader(self)
        self.doRead()

    def __repr__(self) -> str:
        return f"<ZmqSocket {self.name}{'' if self.socket is not None else ' (closed)'}>"

    @property
    def queued(self) -> int:
        """Messages waiting in the local queue."""
        return len(self._pending)

    def bind(self, address: str) -> str:
        """Bind; @return: the address bound (a wildcard port resolved)."""
        self.socket.bind(address)  # type: ignore[union-attr]
        return self.socket.get(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]

    def connect(self, address: str) -> None:
        self.socket.connect(address)  # type: ignore[union-attr]
        # The fd is edge-triggered: messages that arrive before the first
        # read may never make it readable again.
        self._wake()

    def disconnect(self, address: str) -> None:
        self.socket.disconnect(address)  # type: ignore[union-attr]

    def send_frames(self, frames: Sequence[bytes], topic: str | None = None) -> defer.Deferred[None]:
        """
        Send one message without blocking.

        @return: Deferred firing with None once ZeroMQ accepted the message;
            errbacks with L{PublishError} when the socket is closed, the
            local queue is full, or ZeroMQ fails.
        """
        if self.socket is None:
            return defer.fail(PublishError(topic, "socket is closed", self.name))
        if not self._pending:
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self._wake()
            except zmq.ZMQError as e:
                return defer.fail(PublishError(topic, str(e), self.name))
            else:
                return defer.succeed(None)
        if len(self._pending) >= self._send_queue:
            return defer.fail(PublishError(
                topic, f"send queue full ({self._send_queue} messages waiting)", self.name))
        d: defer.Deferred[None] = defer.Deferred()
        self._pending.append((frames, d))
        return d

    def _wake(self) -> None:
        """Look at EVENTS in the next reactor turn."""
        if self._later is None or not self._later.active():
            self._later = self.reactor.callLater(0, self.doRead)

    # --- IReadDescriptor --------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> None:
        """The fd woke up (or L{_wake}): flush the queue and read until
        EVENTS shows neither, within L{READ_BUDGET}."""
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        budget = READ_BUDGET
        while self.socket is not None:
            events = self.socket.get(zmq.EVENTS)
            if self._pending and events & zmq.POLLOUT and self._flush():
                continue
            if not events & zmq.POLLIN:
                return
            if budget == 0:
                self._wake()
                return
            budget -= 1
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            try:
                self._on_message(frames)  # type: ignore[misc]
            except Exception:
                log.failure("{name}: message handler failed", name=self.name)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on the fd (a read raised): close at once."""
        self._close(0)

    # --- sending ------------------------------------------------------------------------

    def _flush(self) -> bool:
        """Send queued messages until ZeroMQ refuses; @return: progress made."""
        progress = False
        while self._pending and self.socket is not None:
            frames, d = self._pending[0]
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as e:
                self._pending.popleft()
                d.errback(PublishError(None, str(e), self.name))
            else:
                self._pending.popleft()
                d.callback(None)
            progress = True
        if not self._pending:
            drained, self._drained = self._drained, []
            for waiter in drained:
                waiter.callback(None)
        return progress

    # --- closing ------------------------------------------------------------------------

    def close(self, linger: float = DEFAULT_LINGER) -> defer.Deferred[None]:
        """
        Wait up to C{linger} seconds for the local queue to drain, fail what
        is left, close the socket with ZeroMQ LINGER C{linger}.

        @return: Deferred firing with None once the socket is closed.
        """
        if self.socket is None:
            return defer.succeed(None)
        if self._pending:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._drained.append(waiter)
            waiter.addTimeout(linger, self.reactor, onTimeoutCancel=lambda *_: None)
            return waiter.addBoth(lambda _: self._close(linger))
        self._close(linger)
        return defer.succeed(None)

    def _close(self, linger: float) -> None:
        if self.socket is None:
            return
        pending, self._pending = self._pending, deque()
        self._drained = []
        for _, d in pending:
            d.errback(PublishError(None, f"closed with the message unsent after {linger}s",
                                   self.name))
        self.socket.set(zmq.LINGER, int(linger * 1000))
        self.shutdown()

    def shutdown(self) -> None:
        """Leave the reactor and close the ZeroMQ socket now (its LINGER
        applies), without touching the local queue."""
        if self.socket is None:
            return
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        self.reactor.removeReader(self)
        self._context.sockets.discard(self)
        self.socket.close()
        self.socket = None
