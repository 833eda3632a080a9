"""
The ZeroMQ subscriber: one SUB socket connected to every registered
publisher address (see L{dftx.pubsub.zmq} for the driver as a whole).

ZeroMQ subscriptions match by prefix, so they are only a first filter:
L{SubscriberBase} delivers a message only when its topic is exactly a
registered one ("t1" never gets "t10").

Oversized input: the SUB socket refuses any frame above
C{max_message_size} (ZMQ_MAXMSGSIZE) before reading it into memory: ZeroMQ
drops that connection and reconnects, and the subscriber, seeing the
reconnection, resyncs as after any lost connection (C{dbrestart}).

CURVE (L{dftx.pubsub.curve}): with C{curve} settings the subscriber is a
CURVE client that needs the server key of each publisher it connects to
(C{register_listen_address(uri, server_key=...)}).  It counts failed
handshakes (C{counters["handshake_failures"]}) and logs the first one per
address; a publisher it cannot authenticate with delivers nothing, not
even a C{sync}.
"""

from __future__ import annotations

from typing import Any

import zmq
from twisted.internet import defer
from zmq.utils.monitor import parse_monitor_message
from zope.interface import implementer

from dftx.errors import ProtocolError, SubscribeError
from dftx.pubsub import curve as _curve
from dftx.pubsub.api import Callback, ISubscriber, SubscriberBase
from dftx.pubsub.curve import CurveSettings
from dftx.pubsub.zmq_heartbeat import Heartbeat
from dftx.pubsub.zmq_heartbeat import apply as apply_heartbeat
from dftx.pubsub.zmq_socket import DEFAULT_HWM, ZmqSocket
from dftx.update import SEND_ALL_TOPIC, SYNC, DbUpdate

__all__ = ["RECONNECT_CHECK", "ZmqSubscriber", "split_frames"]

RECONNECT_CHECK = 1.0
"""Seconds after a lost connection before a subscriber connects again
itself, if ZeroMQ has not."""


def split_frames(frames: list[bytes]) -> tuple[str, bytes]:
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

    @param reactor: the reactor of its sockets and of its reconnection
        checks (default: the global reactor, taken at L{initialize}).
    @param heartbeat: ZeroMQ heartbeats on the SUB socket, so that a silent
        cut is a disconnection (counted in C{counters["disconnects"]}).
    """

    def __init__(self, hwm: int = DEFAULT_HWM, curve: CurveSettings | None = None,
                 reactor: Any = None, heartbeat: Heartbeat | None = None) -> None:
        super().__init__()
        self._hwm = hwm
        self.curve = curve
        self._reactor = reactor
        self._heartbeat = heartbeat
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
        self._socket = ZmqSocket(zmq.SUB, "zmq SUB", self._hwm, on_message=self._frames,
                                 reactor=self._reactor)
        self._socket.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        apply_heartbeat(self._socket.socket, self._heartbeat)
        if self.curve is not None:
            _curve.apply_client(self._socket.socket, self.curve.keys)
        watch = f"inproc://dftx-sub-monitor-{id(self._socket)}"
        self._socket.socket.monitor(watch, _WATCHED)
        self._monitor = ZmqSocket(zmq.PAIR, "zmq SUB monitor", on_message=self._event,
                                  reactor=self._reactor)
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
            topic, data = split_frames(frames)
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
                self.counters["disconnects"] += 1
                self._lost.add(endpoint)
                self.log.info("disconnected from publisher {uri}", uri=endpoint)
                # ZeroMQ reconnects after a lost connection, but not after
                # it refused the peer's input (a frame above ZMQ_MAXMSGSIZE,
                # a ZMTP error): then connect again here.
                self._monitor.reactor.callLater(  # type: ignore[union-attr]
                    RECONNECT_CHECK, self._reconnect_if_lost, endpoint)
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

    def is_connected(self, uri: str) -> bool:
        """Whether the connection to publisher C{uri} is up now: handshaken
        and not lost since.  With heartbeats, a publisher behind a silent
        cut stops being connected within their timeout."""
        return uri in self._joined and uri not in self._lost

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
                self._server_keys[uri] = self.curve.trusted_server_key(server_key)
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
                    self.log.debug("disconnect {uri}: {error}", uri=uri, error=e)
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        """@return: Deferred firing with None once the sockets are closed."""
        sock, self._socket = self._socket, None
        monitor, self._monitor = self._monitor, None
        if sock is None:
            return defer.succeed(None)
        sock.socket.disable_monitor()
        return defer.DeferredList([sock.close(0), monitor.close(0)]).addCallback(lambda _: None)
