"""
ZeroMQ publish/subscribe, as Dragonflow's ZMQ driver: no broker.

- A publisher made with C{bind} is a PUB socket bound at that address (tcp,
  ipc, any ZeroMQ address); subscribers connect to it.
- A publisher made with C{relay} is a PUSH socket connected to the relay's
  address (ipc, for the API worker processes of one host); the publisher
  service's L{dftx.pubsub.zmq_relay.ZmqRelay} PULLs there and re-publishes
  every message, unchanged, on its PUB socket.
- A subscriber (L{dftx.pubsub.zmq_subscriber}) is one SUB socket connected
  to any number of publisher addresses, added and removed at run time.

A message is two frames, C{[topic, msgpack map]}, as Dragonflow sends them.

Sending, queueing and closing are those of L{dftx.pubsub.zmq_socket}.  PUB
never refuses a message: a subscriber that falls C{hwm} messages behind
loses messages (ZeroMQ drops them for that subscriber only, so a slow node
cannot stall the others); it sees the sequence gap and resyncs.  PUSH (with
ZMQ_IMMEDIATE) refuses while the relay is not connected or C{hwm} messages
are queued for it: the message waits in the socket's local queue.  What
can be lost of an acknowledged message: PUB messages for subscribers that
are not connected or are C{hwm} behind (by design; they resync), and PUSH
messages the relay did not take within C{linger} after close.

CURVE (L{dftx.pubsub.curve}): with C{curve} settings, a PUB socket is a
CURVE server that accepts only the client keys in C{curve.allowed}, checked
by the ZAP handler of its reactor's ZeroMQ context; subscribers are CURVE
clients.
"""

from __future__ import annotations

from typing import Any

import zmq
from twisted.internet import defer
from zope.interface import implementer

from dftx.errors import PublishError
from dftx.pubsub import curve as _curve
from dftx.pubsub.api import IPubSub, IPublisher, PublisherBase
from dftx.pubsub.curve import CurveSettings
from dftx.pubsub.zmq_heartbeat import Heartbeat
from dftx.pubsub.zmq_heartbeat import apply as apply_heartbeat
from dftx.pubsub.zmq_socket import DEFAULT_HWM, DEFAULT_LINGER, DEFAULT_SEND_QUEUE, ZmqSocket
from dftx.pubsub.zmq_subscriber import ZmqSubscriber

__all__ = ["ZmqPubSub", "ZmqPublisher", "ZmqSubscriber"]


@implementer(IPublisher)
class ZmqPublisher(PublisherBase):
    """
    A PUB socket bound at C{bind}, or a PUSH socket connected to the relay
    at C{relay} (exactly one of them).  L{uri} is where subscribers connect
    once initialized (the bound address, wildcard port resolved).

    @param reactor: the reactor of its socket (default: the global reactor,
        taken at L{initialize}).
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
        reactor: Any = None,
        heartbeat: Heartbeat | None = None,
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
        self._reactor = reactor
        self._heartbeat = heartbeat
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
        counters = _curve.zap_handler(self._reactor).counters.get(self.curve_domain, {})
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
                         self._hwm, self._send_queue, reactor=self._reactor)
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
                apply_heartbeat(sock.socket, self._heartbeat)
                if self.curve is not None:
                    self.curve_domain = _curve.zap_handler(self._reactor).register(
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
        L{dftx.pubsub.zmq_socket} for what waits and for how long)."""
        sock, self._socket = self._socket, None
        if sock is None:
            return defer.succeed(None)
        return sock.close(self._linger).addBoth(self._forget_domain)

    def _forget_domain(self, result: object = None) -> object:
        if self.curve_domain is not None:
            _curve.zap_handler(self._reactor).unregister(self.curve_domain)
        return result


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
    @param heartbeat: ZeroMQ heartbeats on PUB and SUB sockets
        (L{dftx.pubsub.zmq_heartbeat}); None: none.
    @param reactor: the reactor of every socket and timer (default: the
        global reactor, taken when the first socket is made).

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
        reactor: Any = None,
        heartbeat: Heartbeat | None = None,
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
        self.reactor = reactor
        self.heartbeat = heartbeat

    @classmethod
    def from_config(cls, config: Any, bind: str | None = None, relay: str | None = None,
                    reactor: Any = None) -> ZmqPubSub:
        """With the CURVE and heartbeat settings of [df] (L{CurveSettings.from_config})."""
        df = config.df
        return cls(bind=bind, relay=relay, curve=CurveSettings.from_config(config),
                   reactor=reactor,
                   heartbeat=Heartbeat(df.zmq_heartbeat_interval, df.zmq_heartbeat_timeout))

    def get_publisher(self, publisher_id: str | None = None) -> ZmqPublisher:
        """@raise ValueError: on an instance made without bind or relay."""
        if self.bind is None and self.relay is None:
            raise ValueError("this ZmqPubSub was made without bind or relay: no publisher")
        return ZmqPublisher(self.bind, self.relay, publisher_id, self.hwm, self.send_queue,
                            self.linger, self.curve, self.relay_server_key, self.reactor,
                            self.heartbeat)

    def get_subscriber(self) -> ZmqSubscriber:
        return ZmqSubscriber(self.hwm, self.curve, self.reactor, self.heartbeat)

