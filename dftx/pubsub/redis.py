"""
Publish/subscribe through Redis: L{RedisPubSub}C{(hosts, sharded=False)}.

Classic (C{sharded=False}): C{PUBLISH} / C{SUBSCRIBE}.  A Redis Cluster
carries a classic message to every node, so each publisher and subscriber
uses one node, picked by hashing its own id over the masters: connections
spread over the cluster.  When that node fails, it moves at once to the
next master in the same order (a subscriber also when its connection is
lost).

Sharded (C{sharded=True}, Redis 7): C{SPUBLISH} / C{SSUBSCRIBE}, routed by
the slot of the channel (the topic).  A subscriber keeps one connection per
master that owns one of its topics' slots.  When a slot moves (the server
sends C{sunsubscribe}, or answers C{MOVED}), the topic is subscribed on the
new owner and a C{sync} of that topic is delivered: messages may have been
missed in between.

Failures, and what the caller sees:

- A subscriber connection lost: the subscriber connects again (to the next
  master, classic; to the slots' owners after re-reading the topology,
  sharded), subscribes every registered topic, then delivers a
  C{dbrestart}: the owner resyncs.  It never gives up: while no node can be
  reached it retries with a backoff up to C{max_backoff} seconds.
- C{register_topic}/C{unregister_topic} always change the set of topics.
  While connected, the Deferred fires when the server confirmed; while
  reconnecting it fires at once and the change is applied when the
  connection is back (before the C{dbrestart}).
- C{send_event} while the publisher's node is unreachable errbacks with
  L{PublishError} at once (never queued: the caller undoes its write), and
  the next send goes to the next node.
- A message that does not decode is counted and dropped (see
  L{dftx.pubsub.api.SubscriberBase}).
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from dftx.errors import DBConnectionError, DftxError, PublishError, ReplyError, SubscribeError
from dftx.pubsub.api import Callback, IPublisher, IPubSub, ISubscriber, PublisherBase, SubscriberBase
from dftx.redis.cluster import ClusterClient
from dftx.redis.connection import NodeConnection
from dftx.redis.endpoints import TLSOptions
from dftx.redis.resp import RespProtocol
from dftx.redis.slots import key_slot
from dftx.update import SEND_ALL_TOPIC, SYNC, DbUpdate

log = Logger()

_MESSAGES = frozenset({b"message", b"smessage"})


def _ring(masters: Sequence[str], name: str) -> list[str]:
    """C{masters} in the order C{name} tries them: from the one its hash
    picks, round the sorted list."""
    ordered = sorted(masters)
    if not ordered:
        return []
    start = zlib.crc32(name.encode("utf-8")) % len(ordered)
    return ordered[start:] + ordered[:start]


class _PubSubProtocol(RespProtocol):
    """
    A RESP connection in subscribed mode: pushed messages go to the link,
    and so does a C{sunsubscribe} that this side did not ask for (the
    channel's slot moved); every other reply answers a command.
    """

    link: "_Link"

    def reply_received(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind in _MESSAGES:
                self.link.message(reply[1], reply[2])
                return
            if kind == b"sunsubscribe" and reply[1] not in self.link.leaving:
                self.link.moved_away(reply[1])
                return
        super().reply_received(reply)


class _Link:
    """
    One subscribe connection to one node and the channels it carries.  It
    is never reconnected: when lost, the subscriber makes new links.
    """

    def __init__(self, subscriber: "RedisSubscriber", address: str) -> None:
        self.subscriber = subscriber
        self.address = address
        self.channels: set[bytes] = set()
        self.leaving: set[bytes] = set()
        self.dead = False

        def build(peer: str, clock: Any, timeout: float) -> _PubSubProtocol:
            proto = _PubSubProtocol(peer, clock, timeout)
            proto.link = self
            return proto

        self.conn: NodeConnection = subscriber.client.new_connection(address, build)
        self.conn.on_lost(lambda conn, reason: subscriber._link_lost(self, reason))

    async def subscribe(self, channel: bytes) -> None:
        """@raise DBConnectionError, SubscribeError, ReplyError(MOVED)."""
        cmd = b"SSUBSCRIBE" if self.subscriber.sharded else b"SUBSCRIBE"
        reply = await self.conn.execute(cmd, channel)
        if isinstance(reply, ReplyError):
            raise reply
        self.channels.add(channel)

    async def unsubscribe(self, channel: bytes) -> None:
        if channel not in self.channels:
            return
        cmd = b"SUNSUBSCRIBE" if self.subscriber.sharded else b"UNSUBSCRIBE"
        self.channels.discard(channel)
        self.leaving.add(channel)
        try:
            await self.conn.execute(cmd, channel)
        finally:
            self.leaving.discard(channel)

    def message(self, channel: bytes, data: Any) -> None:
        if not isinstance(data, bytes):
            data = str(data).encode()
        self.subscriber._message(channel.decode("utf-8", "replace"), data, self.address)

    def moved_away(self, channel: bytes) -> None:
        self.channels.discard(channel)
        self.subscriber._moved(channel)

    def close(self) -> defer.Deferred[None]:
        """Close the connection (again: a no-op)."""
        self.dead = True
        return self.conn.close()


@implementer(ISubscriber)
class RedisSubscriber(SubscriberBase):
    """
    A subscriber over one Redis Cluster (or one server); see the module
    docstring.  L{initialize} subscribes C{"D"} (L{SEND_ALL_TOPIC}) and the
    topics registered so far, and fires once the server confirmed them; it
    errbacks with L{SubscribeError} when no node can be reached.
    """

    def __init__(self, client: ClusterClient, sharded: bool, name: str,
                 max_backoff: float = 2.0, clock: Any = None) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.client = client
        self.sharded = sharded
        self.name = name
        self.max_backoff = max_backoff
        self._links: dict[str, _Link] = {}
        self._started = False
        self._closed = False
        self._repairing: defer.Deferred[None] | None = None

    # --- ISubscriber ------------------------------------------------------------------

    def initialize(self, callback: Callback) -> defer.Deferred[None]:
        self._set_callback(callback)
        return defer.ensureDeferred(self._initialize())

    async def _initialize(self) -> None:
        self.topics.add(SEND_ALL_TOPIC)
        try:
            if self.client.topology is None:
                await self.client.start()
            await self._subscribe_all()
        except DftxError as e:
            raise SubscribeError(self.name, str(e)) from None
        self._started = True

    def register_topic(self, topic: str) -> defer.Deferred[None]:
        if topic in self.topics:
            return defer.succeed(None)
        self.topics.add(topic)
        if not self._started or self._repairing is not None:
            return defer.succeed(None)
        return defer.ensureDeferred(self._subscribe_now(topic))

    async def _subscribe_now(self, topic: str) -> None:
        try:
            await self._subscribe(topic.encode("utf-8"))
        except DftxError as e:
            # The link broke meanwhile: the repair subscribes it.
            log.info("subscribing {topic!r} deferred to the reconnection: {error}",
                     topic=topic, error=e)

    def unregister_topic(self, topic: str) -> defer.Deferred[None]:
        if topic not in self.topics:
            return defer.succeed(None)
        self.topics.discard(topic)
        channel = topic.encode("utf-8")
        for link in list(self._links.values()):
            if channel in link.channels:
                return defer.ensureDeferred(link.unsubscribe(channel)).addErrback(
                    lambda f: f.trap(DBConnectionError))
        return defer.succeed(None)

    def register_listen_address(self, uri: str) -> defer.Deferred[None]:
        """Redis has no publisher addresses: the broker is the cluster."""
        self.addresses.add(uri)
        return defer.succeed(None)

    def unregister_listen_address(self, uri: str) -> defer.Deferred[None]:
        self.addresses.discard(uri)
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self._closed = True
        links, self._links = list(self._links.values()), {}
        return defer.DeferredList(
            [link.close() for link in links] + [self.client.close()],
            consumeErrors=True).addCallback(lambda _: None)

    # --- links ----------------------------------------------------------------------

    def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None or link.dead:
            link = self._links[address] = _Link(self, address)
        return link

    def _candidates(self, channel: bytes) -> list[str]:
        """The nodes to try for C{channel}, best first."""
        topology = self.client.topology
        if self.sharded:
            owner = self.client.owner(key_slot(channel))
            return [owner] if owner else []
        if self._links:  # classic: every channel on the one live link
            return [next(iter(self._links))]
        return _ring(topology.masters if topology else [], self.name)

    async def _subscribe(self, channel: bytes) -> None:
        """Subscribe C{channel} on its node, following MOVED, moving to the
        next node (classic) when one cannot be reached."""
        errors: list[str] = []
        for _ in range(self.client.retries + 2):
            candidates = self._candidates(channel)
            if not candidates:
                await self.client.refresh()
                continue
            for address in candidates:
                link = self._link(address)
                try:
                    await link.subscribe(channel)
                    return
                except ReplyError as e:
                    errors.append(str(e))
                    if e.kind not in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
                        raise SubscribeError(channel.decode("utf-8", "replace"), str(e))
                    await self.client.refresh()
                    break
                except DBConnectionError as e:
                    errors.append(str(e))
                    self._drop(link)
            else:
                await self.client.refresh()
        raise DBConnectionError(None, f"cannot subscribe {channel!r}: {'; '.join(errors)}")

    async def _subscribe_all(self) -> None:
        """Subscribe every registered topic not on a link yet (topics
        registered meanwhile too)."""
        while True:
            done = {c for link in self._links.values() for c in link.channels}
            missing = sorted(t for t in self.topics if t.encode("utf-8") not in done)
            if not missing:
                return
            for topic in missing:
                await self._subscribe(topic.encode("utf-8"))

    def _drop(self, link: _Link) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]
        # Not from inside the connection's loss handling (see _link_lost).
        self.clock.callLater(0, link.close)

    # --- failures ---------------------------------------------------------------------

    def _link_lost(self, link: _Link, reason: Any) -> None:
        if link.dead or self._closed:
            return
        link.dead = True
        # Out of the connection's own loss handling: closing it from there
        # would re-enter ClientService.
        self.clock.callLater(0, self._repair)

    def _repair(self) -> None:
        """Reconnect and resubscribe everything, then deliver dbrestart."""
        if self._repairing is None and not self._closed:
            self._repairing = defer.ensureDeferred(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        try:
            while not self._closed:
                for link in list(self._links.values()):
                    self._drop(link)
                try:
                    await self.client.refresh()
                except DftxError as e:
                    log.info("topology refresh failed while reconnecting: {error}", error=e)
                try:
                    await self._subscribe_all()
                except DftxError as e:
                    log.warn("resubscribing failed (retrying in {delay}s): {error}",
                             delay=delay, error=e)
                    await task.deferLater(self.clock, delay, lambda: None)
                    delay = min(delay * 2, self.max_backoff)
                    continue
                log.info("resubscribed {n} topics on {nodes}", n=len(self.topics),
                         nodes=sorted(self._links))
                self._repairing = None
                self._restored()
                return
        finally:
            self._repairing = None

    def _moved(self, channel: bytes) -> None:
        """The server unsubscribed C{channel}: its slot moved."""
        topic = channel.decode("utf-8", "replace")
        if self._closed or topic not in self.topics:
            return
        log.info("slot of {topic!r} moved; subscribing on its new owner", topic=topic)
        defer.ensureDeferred(self._follow(channel, topic))

    async def _follow(self, channel: bytes, topic: str) -> None:
        try:
            await self.client.refresh()
            await self._subscribe(channel)
        except DftxError as e:
            log.warn("following {topic!r} failed: {error}", topic=topic, error=e)
            self._repair()
            return
        self.counters["moves"] += 1
        self._call(DbUpdate.control(SYNC, topic))


@implementer(IPublisher)
class RedisPublisher(PublisherBase):
    """
    A publisher over one Redis Cluster; see the module docstring.
    L{send_event} fires when the node accepted the message.
    """

    def __init__(self, client: ClusterClient, sharded: bool,
                 publisher_id: str | None = None) -> None:
        super().__init__(publisher_id)
        self.client = client
        self.sharded = sharded
        self.node: str | None = None
        self._closed = False

    def initialize(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._initialize())

    async def _initialize(self) -> None:
        try:
            if self.client.topology is None:
                await self.client.start()
        except DftxError as e:
            raise PublishError(None, str(e)) from None
        self._pick()

    def _pick(self, failed: str | None = None) -> None:
        if self.sharded:
            return
        topology = self.client.topology
        ring = _ring(topology.masters if topology else [], self.id)
        if failed in ring:
            i = ring.index(failed)
            ring = ring[i + 1:] + ring[:i]
        self.node = ring[0] if ring else None

    def _send(self, topic: str, data: bytes) -> defer.Deferred[None]:
        if self._closed:
            return defer.fail(PublishError(topic, "publisher closed"))
        channel = topic.encode("utf-8")
        if self.sharded:
            # Straight to the slot's owner on its shared connection (in
            # order); a redirect goes through the cluster client's routing.
            slot = key_slot(channel)
            node = self.client.owner(slot)
            if node is None:
                return self._routed(None, topic, channel, data, slot)
            d = self.client.connection(node).execute(b"SPUBLISH", channel, data)
            return d.addCallbacks(self._routed, self._failed,
                                  callbackArgs=(topic, channel, data, slot),
                                  errbackArgs=(topic, node))
        node = self.node
        if node is None:
            return defer.fail(PublishError(topic, "no Redis node"))
        d = self.client.connection(node).execute(b"PUBLISH", channel, data)
        return d.addCallbacks(self._sent, self._failed, callbackArgs=(topic, node),
                              errbackArgs=(topic, node))

    def _routed(self, reply: Any, topic: str, channel: bytes, data: bytes,
                slot: int) -> Any:
        if reply is not None and not isinstance(reply, ReplyError):
            return None
        if reply is not None and reply.kind not in ("MOVED", "ASK", "TRYAGAIN",
                                                    "CLUSTERDOWN"):
            raise PublishError(topic, reply.message, reply.node)
        return self.client.execute(b"SPUBLISH", channel, data, slot=slot,
                                   resend=False).addCallbacks(
            self._sent, self._failed, callbackArgs=(topic, None), errbackArgs=(topic, None))

    def _sent(self, reply: Any, topic: str, node: str | None) -> None:
        if isinstance(reply, ReplyError):
            raise PublishError(topic, reply.message, node)

    def _failed(self, failure: Any, topic: str, node: str | None) -> Any:
        if node is not None and failure.check(DBConnectionError):
            if node == self.node:
                self._pick(failed=node)
                log.info("publisher {id}: node {node} failed; now {new}", id=self.id,
                         node=node, new=self.node)
            self.client.refresh().addErrback(lambda f: None)
        return failure

    def close(self) -> defer.Deferred[None]:
        self._closed = True
        return self.client.close()


@implementer(IPubSub)
class RedisPubSub:
    """
    Makes Redis publishers and subscribers; each has its own cluster
    client (and so its own connections).

    @param hosts: seed nodes (see L{dftx.redis.cluster.ClusterClient}).
    @param sharded: SPUBLISH/SSUBSCRIBE instead of PUBLISH/SUBSCRIBE.
    @param client_options: passed to each L{ClusterClient} (C{retries},
        C{password}, C{username}, C{tls}, C{timeout}, ...).
    """

    def __init__(self, hosts: Sequence[str], sharded: bool = False, **client_options: Any) -> None:
        self.hosts = list(hosts)
        self.sharded = sharded
        self.client_options = client_options

    @classmethod
    def from_config(cls, config: Any) -> "RedisPubSub":
        """For [df] pub_sub_driver = redis or redis_sharded, on
        remote_db_hosts with the [df_redis] settings."""
        r = config.df_redis
        tls = TLSOptions(r.ca_file, r.cert_file or None, r.key_file or None) if r.tls else None
        return cls(list(config.df.remote_db_hosts),
                   sharded=config.df.pub_sub_driver == "redis_sharded",
                   retries=r.retries, tls=tls, password=r.password or None,
                   username=r.username or None)

    def _client(self) -> ClusterClient:
        return ClusterClient(self.hosts, **self.client_options)

    def get_publisher(self, publisher_id: str | None = None) -> RedisPublisher:
        return RedisPublisher(self._client(), self.sharded, publisher_id)

    def get_subscriber(self) -> RedisSubscriber:
        import uuid

        return RedisSubscriber(self._client(), self.sharded, f"subscriber-{uuid.uuid4().hex}")
