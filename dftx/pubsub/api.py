"""
Publish/subscribe: the interfaces every driver provides (Dragonflow's
PubSubApi, PublisherApi and SubscriberApi, on Deferreds), and the shared
halves of publishers and subscribers that drivers build on.

A driver moves opaque bytes on a topic; everything that makes those bytes
an NB update stream lives here, once: encoding with the publisher's id, a
per-topic sequence number and the send time (L{PublisherBase}), and on the
other side decoding, exact topic filtering, sequence tracking that turns a
gap into a C{sync} control event, counters, and a callback whose exceptions
never stop the stream (L{SubscriberBase}).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from dftx.codec import decode, encode
from dftx.errors import ProtocolError, PublishError
from dftx.update import DBRESTART, SEND_ALL_TOPIC, SYNC, DbUpdate

__all__ = [
    "Callback", "IPubSub", "IPublisher", "ISubscriber", "MAX_MESSAGE_SIZE",
    "PublisherBase", "SubscriberBase",
]

Callback = Callable[[DbUpdate], object]

#: The largest message a subscriber accepts (bytes): the NB DB holds values
#: of a few MiB at most.  A larger one is counted as C{oversized}, dropped,
#: and its topic resynced (an update was lost).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024


class IPubSub(Interface):
    """
    A pub/sub driver: makes publishers and subscribers.  A driver may take
    more optional arguments of its own (the Redis driver's
    C{get_subscriber(name)}).
    """

    def get_publisher(publisher_id=None):
        """
        @param publisher_id: the id stamped on every message (text); a new
            random one by default.
        @return: a new L{IPublisher} (not yet initialized).
        @raise ValueError: when this driver instance cannot publish (a
            ZeroMQ one made without C{bind} or C{relay}).
        """

    def get_subscriber():
        """@return: a new L{ISubscriber} (not yet initialized)."""


class IPublisher(Interface):
    """Sends NB updates."""

    id = Attribute("This publisher's id (text), stamped on every message.")

    def initialize():
        """@return: Deferred firing with None once messages can be sent."""

    def send_event(update, topic=None):
        """
        Send C{update} on C{topic} (default: C{update.topic}).  Messages of
        one publisher on one topic arrive in call order, also when the
        caller does not wait between calls.

        @return: Deferred firing with None once the broker or transport
            accepted the message; errbacks with L{PublishError} otherwise.
        """

    def close():
        """@return: Deferred firing with None once released."""


class ISubscriber(Interface):
    """Receives NB updates for the topics it registered."""

    counters = Attribute(
        "A Counter of received, delivered, undecodable, oversized, gaps, "
        "duplicates, filtered and callback_errors messages, and restarts.")
    topics = Attribute("The set of registered topics (text), C{\"D\"} once initialized.")
    addresses = Attribute("The set of registered publisher addresses (text).")

    def initialize(callback):
        """
        Start receiving; C{callback(update)} is called with every
        L{DbUpdate} of a registered topic, and with control events
        (C{table} None, action C{dbrestart} or C{sync}).

        @return: Deferred firing with None once subscribed.
        """

    def register_topic(topic):
        """@return: Deferred firing with None once C{topic} is subscribed."""

    def unregister_topic(topic):
        """@return: Deferred firing with None once C{topic} is unsubscribed."""

    def register_listen_address(uri, server_key=None):
        """
        Also receive from the publisher at C{uri} (drivers that connect to
        publishers; a broker driver only records it).  C{server_key} is the
        publisher's CURVE public key (z85), for a ZeroMQ subscriber with
        CURVE; other drivers ignore it.

        @return: Deferred firing with None; errbacks with L{SubscribeError}
            when the driver cannot use the address or the key.
        """

    def unregister_listen_address(uri):
        """@return: Deferred firing with None once C{uri} is forgotten."""

    def close():
        """@return: Deferred firing with None once released."""


class PublisherBase:
    """
    The driver-independent half of a publisher: stamps each message with
    this publisher's id, the next sequence number of its topic and the time
    it was sent (the host's wall clock), and turns any failure of the
    driver's L{_send} into L{PublishError}.

    Subclasses implement C{initialize}, C{close} and C{_send(topic, data)},
    which returns a Deferred and must keep call order per topic.
    """

    log = Logger()

    def __init__(self, publisher_id: str | None = None) -> None:
        self.id = publisher_id or uuid.uuid4().hex
        self._seq: Counter[str] = Counter()

    def send_event(self, update: DbUpdate, topic: str | None = None) -> defer.Deferred[None]:
        topic = topic or update.topic or SEND_ALL_TOPIC
        self._seq[topic] += 1
        try:
            # sent: wall-clock time, compared with the receiver's (delivery lag)
            data = encode(update, publisher=self.id, seq=self._seq[topic], topic=topic,
                          sent=time.time())
            d = self._send(topic, data)
        except Exception as e:
            return defer.fail(_publish_error(topic, e))
        return d.addErrback(_as_publish_error, topic)

    def _send(self, topic: str, data: bytes) -> defer.Deferred[None]:
        raise NotImplementedError


def _as_publish_error(failure: Failure, topic: str) -> Failure:
    return Failure(_publish_error(topic, failure.value))


def _publish_error(topic: str, e: BaseException) -> PublishError:
    if isinstance(e, PublishError):
        return e
    return PublishError(topic, f"{type(e).__name__}: {e}")


class SubscriberBase:
    """
    The driver-independent half of a subscriber.

    The driver calls L{_message} with each (topic, bytes) it receives and
    L{_restored} after it recovered a lost connection and resubscribed; the
    topic and address sets it keeps are L{topics} and L{addresses}.

    @ivar max_message_size: see L{MAX_MESSAGE_SIZE}.
    """

    log = Logger()
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(self) -> None:
        self.topics: set[str] = set()
        self.addresses: set[str] = set()
        self.counters: Counter[str] = Counter()
        self._callback: Callback | None = None
        self._last_seq: dict[tuple[str, str], int] = {}
        self._bad_peers: set[str | None] = set()

    def register_listen_address(self, uri: str, server_key: str | bytes | None = None
                                ) -> defer.Deferred[None]:
        """For a brokered driver (Redis, in memory) there are no publisher
        addresses to connect to: the address is only recorded (and
        C{server_key} ignored).  ZeroMQ overrides this.

        @return: Deferred firing with None (at once)."""
        self.addresses.add(uri)
        return defer.succeed(None)

    def unregister_listen_address(self, uri: str) -> defer.Deferred[None]:
        """@return: Deferred firing with None (at once)."""
        self.addresses.discard(uri)
        return defer.succeed(None)

    def _set_callback(self, callback: Callback) -> None:
        self._callback = callback

    def _message(self, topic: str, data: bytes, peer: str | None = None) -> None:
        """
        Handle one message from the driver: deliver it, or count and drop it.
        Never raises.
        """
        self.counters["received"] += 1
        if topic not in self.topics:
            self.counters["filtered"] += 1
            return
        if len(data) > self.max_message_size:
            self.counters["oversized"] += 1
            self._warn_once(peer, "dropping a message of {size} bytes on {topic!r} (more "
                            "than {limit}); resync", size=len(data), topic=topic,
                            limit=self.max_message_size)
            self._call(DbUpdate.control(SYNC, topic))
            return
        try:
            update = decode(data, peer)
        except ProtocolError as e:
            self.counters["undecodable"] += 1
            self._warn_once(peer, "dropping undecodable message on {topic!r}: {error}",
                            topic=topic, error=e)
            return
        if update.publisher is not None and update.seq is not None:
            if not self._in_sequence(update.publisher, topic, update.seq):
                return
        self.counters["delivered"] += 1
        self._call(update)

    def _warn_once(self, peer: str | None, message: str, **fields: object) -> None:
        """Log bad input once per peer (a flood must not flood the log)."""
        if peer not in self._bad_peers:
            self._bad_peers.add(peer)
            self.log.warn(message, **fields)

    def _in_sequence(self, publisher: str, topic: str, seq: int) -> bool:
        """
        Track C{seq}; on a gap (or a publisher that restarted its count),
        deliver a C{sync} of C{topic} first.  @return: False for a
        duplicate or stale message, which is dropped.
        """
        key = (publisher, topic)
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if last is None and seq > 1:
            # Joined a publisher mid-stream: what it sent before may not be
            # in the owner's last read of the database (ZeroMQ subscriptions
            # take effect some time after connecting).
            self.counters["joins"] += 1
            self._call(DbUpdate.control(SYNC, topic))
            return True
        if last is None or seq == last + 1:
            return True
        if seq <= last and seq != 1:
            self._last_seq[key] = last
            self.counters["duplicates"] += 1
            return False
        self.counters["gaps"] += 1
        self.log.info(
            "seq gap from publisher {publisher} on {topic!r}: {last} -> {seq}; resync",
            publisher=publisher, topic=topic, last=last, seq=seq)
        self._call(DbUpdate.control(SYNC, topic))
        return True

    def _restored(self) -> None:
        """The driver reconnected and resubscribed: tell the owner to resync."""
        self.counters["restarts"] += 1
        self._last_seq.clear()
        self._call(DbUpdate.control(DBRESTART))

    def _call(self, update: DbUpdate) -> None:
        if self._callback is None:
            return
        try:
            result = self._callback(update)
        except Exception:
            self._callback_failed(Failure(), update)
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(self._callback_failed, update)

    def _callback_failed(self, failure: Failure, update: DbUpdate) -> None:
        self.counters["callback_errors"] += 1
        self.log.failure("subscriber callback failed on {update!r}", failure, update=update)
