"""
ZeroMQ publish/subscribe (txzmq), as Dragonflow's ZMQ driver: no broker.

- A publisher made with C{bind} is a PUB socket bound at that address (tcp,
  ipc, any ZeroMQ address); subscribers connect to it.
- A publisher made with C{relay} is a PUSH socket connected to the relay's
  address (ipc, for the API worker processes of one host); the publisher
  service's L{ZmqRelay} PULLs there and re-publishes every message,
  unchanged, on its PUB socket.
- A subscriber is one SUB socket connected to any number of publisher
  addresses, added and removed at run time.

A message is two frames, C{[topic, msgpack map]}, as Dragonflow sends
them.  ZeroMQ subscriptions match by prefix, so they are only a first
filter: L{SubscriberBase} delivers a message only when its topic is exactly
a registered one ("t1" never gets "t10").

Sending never blocks the reactor; every send uses NOBLOCK:

- PUB never refuses a message.  A subscriber that falls C{hwm} messages
  behind loses messages (ZeroMQ drops them for that subscriber only, so a
  slow node cannot stall the others); it sees the sequence gap and resyncs.
- PUSH (with ZMQ_IMMEDIATE) refuses (EAGAIN) while the relay is not
  connected or C{hwm} messages are already queued for it.  The message then waits in a local queue of at
  most C{send_queue} messages, and its Deferred fires once ZeroMQ took it;
  later sends queue behind it, so order is kept.  With the queue full,
  C{send_event} errbacks at once with L{PublishError}.

Closing: C{close()} waits up to C{linger} seconds for the local queue to
drain, then errbacks what is still in it with L{PublishError} (those
messages were never acknowledged), then closes the socket with ZeroMQ's
LINGER set to C{linger}: ZeroMQ goes on delivering what it accepted for that
long, in its own thread.  The process's ZeroMQ context is terminated at
reactor shutdown, which waits (at most C{linger}) for that delivery.  What
can still be lost of an acknowledged message: PUB messages for subscribers
that are not connected or are C{hwm} behind (by design; they resync), and
PUSH messages the relay did not take within C{linger} after close.

Oversized input: a SUB socket (and the relay's PULL) refuses any frame above
C{max_message_size} (ZMQ_MAXMSGSIZE) before reading it into memory: ZeroMQ
drops that connection and reconnects, and the subscriber, seeing the
reconnection, resyncs as after any lost connection (C{dbrestart}).

CURVE (L{dftx.pubsub.curve}): with C{curve} settings, a PUB socket (and a
relay's PULL socket on tcp) is a CURVE server that accepts only the client
keys in C{curve.allowed}, checked by the process's ZAP handler; a
subscriber is a CURVE client that needs the server key of each publisher
it connects to (C{register_listen_address(uri, server_key=...)}).  A
subscriber counts failed handshakes (C{counters["handshake_failures"]})
and logs the first one per address; a publisher it cannot authenticate
with delivers nothing, not even a C{sync}.  An ipc socket is protected by
the permissions of its file instead: the relay makes its file mode 0660
(owner and group may push).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from typing import Any, Callable, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message
from twisted.internet import defer
from twisted.logger import Logger
from txzmq import ZmqFactory
from txzmq.connection import ZmqConnection
from zope.interface import implementer

from dftx.codec import decode
from dftx.pubsub import curve as _curve
from dftx.pubsub.curve import CurveSettings
from dftx.errors import ProtocolError, PublishError, SubscribeError
from dftx.pubsub.api import (
    MAX_MESSAGE_SIZE, Callback, IPubSub, IPublisher, ISubscriber, PublisherBase, SubscriberBase,
)
from dftx.update import SEND_ALL_TOPIC, SYNC, DbUpdate

RECONNECT_CHECK = 1.0
"""Seconds after a lost connection before a subscriber connects again
itself, if ZeroMQ has not."""

DEFAULT_HWM = 100_000
"""ZeroMQ high-water mark (messages) of every socket, per peer."""
DEFAULT_SEND_QUEUE = 10_000
"""Messages a PUSH publisher holds while ZeroMQ refuses them."""
DEFAULT_LINGER = 1.0
"""Seconds that closing waits for queued messages to go out."""
READ_BUDGET = 1000
"""Messages read per reactor turn before letting other work run."""

log = Logger()
_factory: ZmqFactory | None = None


def factory() -> ZmqFactory:
    """
    The process's one ZeroMQ context (in a txzmq factory), terminated at
    reactor shutdown.
    """
    global _factory
    if _factory is None:
        _factory = ZmqFactory()
        _factory.registerForShutdown()
    return _factory


class ZmqSocket(ZmqConnection):
    """
    One ZeroMQ socket in the reactor: sends that never block (a bounded
    queue while ZeroMQ refuses), and reads drained until EVENTS shows no
    POLLIN (the ZeroMQ fd is edge-triggered), at most L{READ_BUDGET} per
    reactor turn.

    @param on_message: called with each received message (a list of
        frames); its exceptions are logged, never raised.
    @param name: what the socket is, for errors and logs.
    """

    def __init__(
        self,
        socket_type: int,
        name: str,
        hwm: int = DEFAULT_HWM,
        send_queue: int = DEFAULT_SEND_QUEUE,
        on_message: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self.socketType = socket_type
        self.highWaterMark = hwm
        self.name = name
        self._send_queue = send_queue
        self._pending: deque[tuple[Sequence[bytes], defer.Deferred[None]]] = deque()
        self._drained: list[defer.Deferred[None]] = []
        self._on_message = on_message
        self._later = None
        super().__init__(factory())

    @property
    def queued(self) -> int:
        """Messages waiting in the local queue."""
        return len(self._pending)

    def bind(self, address: str) -> str:
        """Bind; @return: the address bound (a wildcard port resolved)."""
        self.socket.bind(address)
        return self.socket.get(zmq.LAST_ENDPOINT).decode()

    def connect(self, address: str) -> None:
        self.socket.connect(address)
        # The fd is edge-triggered: messages that arrive before the first
        # read may never make it readable again.
        self._wake()

    def disconnect(self, address: str) -> None:
        self.socket.disconnect(address)

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
            self._later = self.factory.reactor.callLater(0, self.doRead)

    def doRead(self) -> None:
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
            waiter.addTimeout(linger, self.factory.reactor, onTimeoutCancel=lambda *_: None)
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
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        self.socket.set(zmq.LINGER, int(linger * 1000))
        self.shutdown()


@implementer(IPublisher)
class ZmqPublisher(PublisherBase):
    """
    A PUB socket bound at C{bind}, or a PUSH socket connected to the relay
    at C{relay} (exactly one of them).  L{uri} is where subscribers connect
    once initialized (the bound address, wildcard port resolved).
    """

    def __init__(
        self,
        bind: str | None = None,
        relay: str | None = None,
        publisher_id: str | None = None,
        hwm: int = DEFAULT_HWM,
        send_queue: int = DEFAULT_SEND_QUEUE,
        linger: float = DEFAULT_LINGER,
        curve: CurveSettings | None = None,
        server_key: bytes | None = None,
    ) -> None:
        if (bind is None) == (relay is None):
            raise ValueError("a ZeroMQ publisher needs exactly one of bind and relay")
        super().__init__(publisher_id)
        self.address = bind or relay
        self.uri: str | None = None
        self._push = relay is not None
        self._hwm = hwm
        self._send_queue = send_queue
        self._linger = linger
        self._socket: ZmqSocket | None = None
        self.curve = curve
        self._server_key = server_key
        self.curve_domain: str | None = None

    @property
    def public_key(self) -> str | None:
        """This publisher's CURVE public key (z85), None without CURVE."""
        return self.curve.keys.public.decode() if self.curve else None

    @property
    def curve_counters(self) -> dict[str, int]:
        """ZAP requests for this PUB socket: C{allowed}, C{denied}."""
        if self.curve_domain is None:
            return {}
        counters = _curve.zap_handler().counters.get(self.curve_domain, {})
        return {k: counters.get(k, 0) for k in ("allowed", "denied")}

    @property
    def queued(self) -> int:
        """Messages waiting in the local queue (PUSH only)."""
        return self._socket.queued if self._socket else 0

    def initialize(self) -> defer.Deferred[None]:
        """
        Bind the PUB socket, or connect the PUSH socket (which succeeds
        before the relay exists: messages queue until it does).

        @return: Deferred firing with None; errbacks with L{PublishError}
            when the address cannot be bound or is not a ZeroMQ address.
        """
        kind = "PUSH" if self._push else "PUB"
        sock = ZmqSocket(zmq.PUSH if self._push else zmq.PUB, f"zmq {kind} {self.address}",
                         self._hwm, self._send_queue)
        try:
            if self._push:
                # Queue only on a completed connection: until the relay is
                # there, sends wait in the local queue, where close() can
                # report them, instead of in a pipe that close() drops.
                sock.socket.set(zmq.IMMEDIATE, 1)
                if self.curve is not None and not self.address.startswith("ipc://"):
                    if self._server_key is None:
                        raise ValueError("CURVE over tcp needs the relay's server key")
                    _curve.apply_client(sock.socket, self.curve.keys)
                    sock.socket.set(zmq.CURVE_SERVERKEY, self._server_key)
                sock.connect(self.address)
                self.uri = self.address
            else:
                if self.curve is not None:
                    self.curve_domain = _curve.zap_handler().register(
                        self.curve.allowed, "dftx-pub")
                    _curve.apply_server(sock.socket, self.curve.keys, self.curve_domain)
                self.uri = sock.bind(self.address)
        except (zmq.ZMQError, ValueError) as e:
            sock.close(0)
            self._forget_domain()
            verb = "connect to" if self._push else "bind"
            return defer.fail(PublishError(None, f"cannot {verb} {self.address}: {e}",
                                           self.address))
        self._socket = sock
        return defer.succeed(None)

    def _send(self, topic: str, data: bytes) -> defer.Deferred[None]:
        return self.send_raw(topic.encode("utf-8"), data)

    def send_raw(self, topic: bytes, data: bytes) -> defer.Deferred[None]:
        """
        Send an already-encoded message unchanged (what L{ZmqRelay} does);
        same order and acknowledgement as C{send_event}.
        """
        if self._socket is None:
            return defer.fail(PublishError(topic.decode("utf-8", "replace"),
                                           "publisher is not initialized or closed",
                                           self.address))
        return self._socket.send_frames((topic, data), topic.decode("utf-8", "replace"))

    def close(self) -> defer.Deferred[None]:
        """@return: Deferred firing with None once the socket is closed (see
        the module docstring for what waits and for how long)."""
        sock, self._socket = self._socket, None
        if sock is None:
            return defer.succeed(None)
        return sock.close(self._linger).addBoth(self._forget_domain)

    def _forget_domain(self, result: object = None) -> object:
        if self.curve_domain is not None:
            _curve.zap_handler().unregister(self.curve_domain)
        return result


def _split(frames: list[bytes]) -> tuple[str, bytes]:
    """(topic, data) of a two-frame message; L{ProtocolError} otherwise."""
    if len(frames) != 2:
        raise ProtocolError(f"message of {len(frames)} frames, not 2 (topic, data)")
    try:
        return frames[0].decode("utf-8"), frames[1]
    except UnicodeDecodeError:
        raise ProtocolError(f"topic {frames[0][:40]!r} is not utf-8") from None


_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail (a wrong server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol (CURVE on one side only?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused by the publisher's ZAP handler",
}
_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
"""Connection events a subscriber watches: a publisher counts as connected
once the ZMTP handshake (with CURVE, the authentication) succeeded."""


@implementer(ISubscriber)
class ZmqSubscriber(SubscriberBase):
    """
    One SUB socket connected to every registered publisher address.
    L{initialize} subscribes to C{"D"} (L{SEND_ALL_TOPIC}) as well as to
    the topics registered so far.  ZeroMQ does not say which publisher
    sent a message, so undecodable messages are logged once per
    subscriber rather than per peer.

    ZeroMQ connects and reconnects by itself; the subscriber watches the
    socket's connection events.  When a publisher is first connected it
    delivers a C{sync} of every topic (the publisher's earlier messages are
    unknown to the owner); when a publisher that was disconnected is
    connected again (a restarted publisher service, a network cut) it
    delivers a C{dbrestart}: what was sent meanwhile is lost.
    """

    def __init__(self, hwm: int = DEFAULT_HWM, curve: CurveSettings | None = None) -> None:
        super().__init__()
        self._hwm = hwm
        self.curve = curve
        self._server_keys: dict[str, bytes] = {}
        self._socket: ZmqSocket | None = None
        self._monitor: ZmqSocket | None = None
        self._lost: set[str] = set()
        self._joined: set[str] = set()
        self._failed_logged: set[str] = set()
        self._warned = False

    def initialize(self, callback: Callback) -> defer.Deferred[None]:
        """@return: Deferred firing with None once the socket is subscribed
        and connected to the addresses registered so far."""
        self._set_callback(callback)
        self.topics.add(SEND_ALL_TOPIC)
        self._socket = ZmqSocket(zmq.SUB, "zmq SUB", self._hwm, on_message=self._frames)
        self._socket.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        if self.curve is not None:
            _curve.apply_client(self._socket.socket, self.curve.keys)
        watch = f"inproc://dftx-sub-monitor-{id(self._socket)}"
        self._socket.socket.monitor(watch, _WATCHED)
        self._monitor = ZmqSocket(zmq.PAIR, "zmq SUB monitor", on_message=self._event)
        self._monitor.connect(watch)
        for topic in self.topics:
            self._socket.socket.subscribe(topic.encode("utf-8"))
        for uri in list(self.addresses):
            try:
                self._connect(uri)
            except zmq.ZMQError as e:
                self.addresses.discard(uri)
                return defer.fail(SubscribeError(uri, str(e)))
        return defer.succeed(None)

    def _connect(self, uri: str) -> None:
        if self.curve is not None:
            # Taken at connect time: each publisher has its own.
            self._socket.socket.set(zmq.CURVE_SERVERKEY, self._server_keys[uri])  # type: ignore[union-attr]
        self._socket.connect(uri)  # type: ignore[union-attr]

    def _frames(self, frames: list[bytes]) -> None:
        try:
            topic, data = _split(frames)
        except ProtocolError as e:
            self.counters["received"] += 1
            self.counters["undecodable"] += 1
            if not self._warned:
                self._warned = True
                self.log.warn("dropping malformed ZeroMQ message: {error}", error=e)
            return
        self._message(topic, data, self._socket.name if self._socket else None)

    def _event(self, frames: list[bytes]) -> None:
        """A connection event of the SUB socket."""
        event = parse_monitor_message(frames)
        endpoint = event["endpoint"].decode("utf-8", "replace")
        if event["event"] in _HANDSHAKE_FAILED:
            # A TCP connection that never carried a message (no key, a key
            # the publisher does not allow, the wrong server key, or a
            # peer that does not speak ZMTP): no join, no loss.
            self.counters["handshake_failures"] += 1
            if endpoint not in self._failed_logged:
                self._failed_logged.add(endpoint)
                self.log.warn("handshake with publisher {uri} failed ({why}): nothing is "
                              "received from it", uri=endpoint,
                              why=_HANDSHAKE_FAILED[event["event"]])
            return
        if event["event"] == zmq.EVENT_DISCONNECTED:
            if endpoint in self._joined:
                self._lost.add(endpoint)
                self.log.info("disconnected from publisher {uri}", uri=endpoint)
                # ZeroMQ reconnects after a lost connection, but not after
                # it refused the peer's input (a frame above ZMQ_MAXMSGSIZE,
                # a ZMTP error): then connect again here.
                from twisted.internet import reactor

                reactor.callLater(RECONNECT_CHECK, self._reconnect_if_lost, endpoint)
        elif endpoint in self._lost:
            self._lost.discard(endpoint)
            self.log.info("reconnected to publisher {uri}: resync", uri=endpoint)
            self._restored()
        elif endpoint not in self._joined:
            # A publisher newly connected: what it sent before is unknown
            # to the owner.
            self._joined.add(endpoint)
            self.counters["joins"] += 1
            self._call(DbUpdate.control(SYNC))

    def _reconnect_if_lost(self, uri: str) -> None:
        if self._socket is None or uri not in self._lost or uri not in self.addresses:
            return
        try:
            self._socket.disconnect(uri)
        except zmq.ZMQError:
            pass  # ZeroMQ already forgot it
        try:
            self._connect(uri)
        except zmq.ZMQError as e:
            self.log.warn("reconnecting to publisher {uri} failed: {error}", uri=uri, error=e)

    def register_topic(self, topic: str) -> defer.Deferred[None]:
        if topic not in self.topics:
            self.topics.add(topic)
            if self._socket is not None:
                self._socket.socket.subscribe(topic.encode("utf-8"))
        return defer.succeed(None)

    def unregister_topic(self, topic: str) -> defer.Deferred[None]:
        if topic in self.topics:
            self.topics.discard(topic)
            if self._socket is not None:
                self._socket.socket.unsubscribe(topic.encode("utf-8"))
        return defer.succeed(None)

    def register_listen_address(self, uri: str, server_key: str | bytes | None = None
                                ) -> defer.Deferred[None]:
        """
        Connect to the publisher at C{uri} (ZeroMQ connects in the
        background and reconnects by itself).  With CURVE, C{server_key}
        is the publisher's public key (z85); it must be one of
        C{curve.servers} when that is set (with exactly one there, it may
        be left out).

        @return: Deferred firing with None; errbacks with L{SubscribeError}
            for an address ZeroMQ cannot use, or with CURVE a missing,
            malformed or untrusted server key.
        """
        if uri in self.addresses:
            return defer.succeed(None)
        if self.curve is not None:
            try:
                self._server_keys[uri] = self._trusted(server_key)
            except ValueError as e:
                return defer.fail(SubscribeError(uri, str(e)))
        if self._socket is not None:
            try:
                self._connect(uri)
            except zmq.ZMQError as e:
                self._server_keys.pop(uri, None)
                return defer.fail(SubscribeError(uri, str(e)))
        self.addresses.add(uri)
        return defer.succeed(None)

    def _trusted(self, server_key: str | bytes | None) -> bytes:
        servers = self.curve.servers  # type: ignore[union-attr]
        if server_key is None:
            if servers is not None and len(servers) == 1:
                return next(iter(servers))
            raise ValueError("CURVE is on and the publisher's server key is unknown")
        key = _curve._key(server_key, "the publisher's server key")
        if servers is not None and key not in servers:
            raise ValueError(f"server key {key.decode()} is not in zmq_curve_server_keys")
        return key

    def unregister_listen_address(self, uri: str) -> defer.Deferred[None]:
        if uri in self.addresses:
            self.addresses.discard(uri)
            self._server_keys.pop(uri, None)
            self._lost.discard(uri)
            self._joined.discard(uri)
            self._failed_logged.discard(uri)
            if self._socket is not None:
                try:
                    self._socket.disconnect(uri)
                except zmq.ZMQError as e:  # e.g. ENOENT: never completed
                    log.debug("disconnect {uri}: {error}", uri=uri, error=e)
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        sock, self._socket = self._socket, None
        monitor, self._monitor = self._monitor, None
        if sock is None:
            return defer.succeed(None)
        sock.socket.disable_monitor()
        return defer.DeferredList([sock.close(0), monitor.close(0)]).addCallback(lambda _: None)


class ZmqRelay:
    """
    The publisher service's side of multiproc: a PULL socket bound at
    C{address} (ipc) whose messages are re-published, unchanged (the
    writers' publisher ids and sequence numbers kept), by C{publisher}.
    A message that is not two frames C{[utf-8 topic, decodable update]}
    is counted (C{counters["malformed"]}), logged once, and dropped.
    """

    log = Logger()

    def __init__(self, address: str, publisher: ZmqPublisher, hwm: int = DEFAULT_HWM,
                 curve: CurveSettings | None = None) -> None:
        self.address = address
        self.publisher = publisher
        self.curve = curve
        self.curve_domain: str | None = None
        self.counters: Counter[str] = Counter()
        self._hwm = hwm
        self._socket: ZmqSocket | None = None
        self._warned = False

    def start(self) -> None:
        """Bind the PULL socket; @raise PublishError: when it cannot."""
        sock = ZmqSocket(zmq.PULL, f"zmq PULL {self.address}", self._hwm,
                         on_message=self._frames)
        sock.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_SIZE)
        ipc = self.address.startswith("ipc://")
        try:
            if self.curve is not None and not ipc:
                self.curve_domain = _curve.zap_handler().register(self.curve.allowed,
                                                                  "dftx-relay")
                _curve.apply_server(sock.socket, self.curve.keys, self.curve_domain)
            sock.bind(self.address)
            if ipc:
                # Who may push: the owner and the group of the file.
                os.chmod(self.address[len("ipc://"):], 0o660)
        except (zmq.ZMQError, OSError) as e:
            sock.close(0)
            self._forget_domain()
            raise PublishError(None, f"cannot bind {self.address}: {e}", self.address) from None
        self._socket = sock

    def _forget_domain(self) -> None:
        if self.curve_domain is not None:
            _curve.zap_handler().unregister(self.curve_domain)
            self.curve_domain = None

    def _frames(self, frames: list[bytes]) -> None:
        try:
            topic, data = _split(frames)
            decode(data, self.address)
        except ProtocolError as e:
            self.counters["malformed"] += 1
            if not self._warned:
                self._warned = True
                self.log.warn("relay: dropping malformed message: {error}", error=e)
            return
        self.counters["relayed"] += 1
        self.publisher.send_raw(frames[0], data).addErrback(self._failed)

    def _failed(self, failure) -> None:
        self.counters["publish_errors"] += 1
        self.log.failure("relay: re-publish failed", failure)

    def close(self) -> defer.Deferred[None]:
        """Close the PULL socket and remove its ipc file."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close(0)
        self._forget_domain()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except FileNotFoundError:
                pass
        return defer.succeed(None)


@implementer(IPubSub)
class ZmqPubSub:
    """
    Makes ZeroMQ publishers and subscribers.

    @param bind: the address publishers bind their PUB socket at
        (C{"tcp://127.0.0.1:8866"}, C{"ipc:///path"}, C{"tcp://127.0.0.1:*"}).
    @param relay: instead of C{bind}: the relay's address (C{"ipc:///path"})
        that publishers PUSH to (API worker processes).
    @param hwm: ZeroMQ high-water mark of each socket, in messages.
    @param send_queue: messages a PUSH publisher holds while ZeroMQ refuses.
    @param linger: seconds closing waits for queued messages.
    @param curve: L{CurveSettings}: PUB sockets are CURVE servers,
        subscribers CURVE clients (see the module docstring).
    @param relay_server_key: with C{curve} and a tcp C{relay}, the relay's
        public key (an ipc relay needs none).

    An instance made with neither serves subscribers only.
    """

    def __init__(
        self,
        bind: str | None = None,
        relay: str | None = None,
        hwm: int = DEFAULT_HWM,
        send_queue: int = DEFAULT_SEND_QUEUE,
        linger: float = DEFAULT_LINGER,
        curve: CurveSettings | None = None,
        relay_server_key: bytes | None = None,
    ) -> None:
        if bind is not None and relay is not None:
            raise ValueError("give bind or relay, not both")
        self.bind = bind
        self.relay = relay
        self.hwm = hwm
        self.send_queue = send_queue
        self.linger = linger
        self.curve = curve
        self.relay_server_key = relay_server_key

    @classmethod
    def from_config(cls, config: Any, bind: str | None = None,
                    relay: str | None = None) -> ZmqPubSub:
        """With the CURVE settings of [df] (L{CurveSettings.from_config})."""
        return cls(bind=bind, relay=relay, curve=CurveSettings.from_config(config))

    def get_publisher(self, publisher_id: str | None = None) -> ZmqPublisher:
        """@raise ValueError: on an instance made without bind or relay."""
        if self.bind is None and self.relay is None:
            raise ValueError("this ZmqPubSub was made without bind or relay: no publisher")
        return ZmqPublisher(self.bind, self.relay, publisher_id, self.hwm,
                            self.send_queue, self.linger, self.curve, self.relay_server_key)

    def get_subscriber(self) -> ZmqSubscriber:
        return ZmqSubscriber(self.hwm, self.curve)

