"""
The publisher service's side of multiproc ZeroMQ publishing: L{ZmqRelay}.

The API worker processes of one host PUSH their messages (publishers made
with C{ZmqPubSub(relay=...)}) to the relay's PULL socket; the relay
re-publishes each, unchanged, on the service's PUB socket, so subscribers
see every writer's own publisher id and sequence numbers.

Oversized input: the PULL socket refuses any frame above
L{MAX_MESSAGE_SIZE} (ZMQ_MAXMSGSIZE) before reading it into memory.

Who may push: an ipc relay is protected by the permissions of its file,
which the relay makes mode 0660 (owner and group); a tcp relay with
C{curve} settings is a CURVE server that accepts only the client keys in
C{curve.allowed} (L{dftx.pubsub.curve}).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import zmq
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.codec import decode
from dftx.errors import ProtocolError, PublishError
from dftx.pubsub import curve as _curve
from dftx.pubsub.api import MAX_MESSAGE_SIZE
from dftx.pubsub.curve import CurveSettings
from dftx.pubsub.zmq import ZmqPublisher
from dftx.pubsub.zmq_socket import DEFAULT_HWM, ZmqSocket
from dftx.pubsub.zmq_subscriber import split_frames

__all__ = ["ZmqRelay"]


class ZmqRelay:
    """
    A PULL socket bound at C{address} (ipc, or tcp with CURVE) whose
    messages are re-published, unchanged (the writers' publisher ids and
    sequence numbers kept), by C{publisher}.  A message that is not two
    frames C{[utf-8 topic, decodable update]} is counted
    (C{counters["malformed"]}), logged once, and dropped.

    @param reactor: the reactor of the PULL socket (default: the global
        reactor, taken at L{start}).
    """

    log = Logger()

    def __init__(self, address: str, publisher: ZmqPublisher, hwm: int = DEFAULT_HWM,
                 curve: CurveSettings | None = None, reactor: Any = None) -> None:
        self.address = address
        self.publisher = publisher
        self.curve = curve
        self.curve_domain: str | None = None
        self.counters: Counter[str] = Counter()
        self._hwm = hwm
        self._reactor = reactor
        self._socket: ZmqSocket | None = None
        self._warned = False

    def start(self) -> None:
        """Bind the PULL socket; @raise PublishError: when it cannot."""
        sock = ZmqSocket(zmq.PULL, f"zmq PULL {self.address}", self._hwm,
                         on_message=self._frames, reactor=self._reactor)
        sock.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_SIZE)  # type: ignore[union-attr]
        ipc = self.address.startswith("ipc://")
        try:
            if self.curve is not None and not ipc:
                self.curve_domain = _curve.zap_handler(self._reactor).register(
                    self.curve.allowed, "dftx-relay")
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
            _curve.zap_handler(self._reactor).unregister(self.curve_domain)
            self.curve_domain = None

    def _frames(self, frames: list[bytes]) -> None:
        try:
            topic, data = split_frames(frames)
            decode(data, self.address)
        except ProtocolError as e:
            self.counters["malformed"] += 1
            if not self._warned:
                self._warned = True
                self.log.warn("relay: dropping malformed message: {error}", error=e)
            return
        self.counters["relayed"] += 1
        self.publisher.send_raw(frames[0], data).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        self.counters["publish_errors"] += 1
        self.log.failure("relay: re-publish failed", failure)

    def close(self) -> defer.Deferred[None]:
        """Close the PULL socket and remove its ipc file.

        @return: Deferred firing with None (at once)."""
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
