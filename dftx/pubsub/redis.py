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

- A subscriber connection lost (node killed, connection dropped by the
  server), or silent: every C{keepalive} seconds the subscriber PINGs each
  of its connections, and one that leaves a command unanswered for the
  client's C{timeout} is closed (a stopped or cut-off node).  The
  subscriber then connects again (to the next master, classic; to the
  slots' owners after re-reading the topology, sharded; connections that
  are still up are kept), subscribes every registered topic, then
  delivers a C{dbrestart}: the owner resyncs.  It never gives up: while no
  node takes a topic it tries again with a backoff up to C{max_backoff}
  seconds.
- C{register_topic} and C{unregister_topic} always change the set of
  topics at once; their Deferred fires when the server confirmed.  While
  the subscriber is reconnecting, C{register_topic} fires at once and the
  reconnection subscribes the topic (before its C{dbrestart}); when no node
  takes the topic now (its shard's master is down), the subscriber starts
  a reconnection, which ends with C{dbrestart}.  Only a refusal by the
  server (an ACL, say) errbacks, with L{SubscribeError}, and the topic is
  then not registered.  C{unregister_topic} fires at once when no live
  connection carries the topic: it is not subscribed again.
- C{send_event} while the publisher's node is unreachable errbacks with
  L{PublishError} at once (never queued: the caller undoes its write), and
  the next send goes to the next node (classic) or to the slot's owner as
  re-read from the cluster (sharded).  A send whose connection was lost
  after it was written is never sent again (it may have run): it errbacks.
  Only a sharded send that a node redirected (C{MOVED}: not executed) is
  sent again, to the new owner.
- Order: one publisher's messages on one topic arrive in call order.  A
  classic publisher writes them on its one connection; a sharded one on
  the connection to the slot's owner, and when the slot moves, the
  redirected sends are sent on to the new owner in the order they come
  back, and sends made meanwhile take the same way behind them (see
  L{_Lane}).  A send that
  errbacks leaves a gap in the topic's sequence numbers: the subscriber
  delivers a C{sync} of the topic.  One case is left to that mechanism:
  after a classic publisher moved to the next node, a message accepted by
  the old node and one by the new travel the cluster bus on different
  links, so in principle the later may arrive first; the subscriber then
  syncs the topic and drops the late one as stale.
- A message that does not decode is counted and dropped (see
  L{dftx.pubsub.api.SubscriberBase}); the subscriber goes on.
"""

from __future__ import annotations

import uuid
import zlib
from collections import Counter
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dftx.errors import DBConnectionError, DftxError, PublishError, ReplyError, SubscribeError
from dftx.pubsub.api import (
    Callback, IPublisher, IPubSub, ISubscriber, PublisherBase, SubscriberBase,
)
from dftx.redis.cluster import MAX_REDIRECTS, ClusterClient
from dftx.redis.connection import NodeConnection
from dftx.endpoints import tls_from_config
from dftx.redis.resp import RespProtocol
from dftx.redis.slots import key_slot
from dftx.update import SEND_ALL_TOPIC, SYNC, DbUpdate

log = Logger()

_MESSAGES = frozenset({b"message", b"smessage"})
_REDIRECTS = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})


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
        if type(reply) is list and len(reply) == 3:
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
    One subscribe connection to one node and the channels subscribed on it
    (confirmed by the server).  It is never reused after its connection is
    lost (L{dead}): the subscriber makes a new one.
    """

    def __init__(self, subscriber: "RedisSubscriber", address: str) -> None:
        self.subscriber = subscriber
        self.address = address
        self.channels: dict[bytes, str] = {}  # channel -> topic
        self.leaving: set[bytes] = set()
        self.busy = 0  # commands in flight
        self.dead = False

        def build(peer: str, clock: Any, timeout: float) -> _PubSubProtocol:
            proto = _PubSubProtocol(peer, clock, timeout)
            proto.link = self
            return proto

        self.conn: NodeConnection = subscriber.client.new_connection(address, build)
        self.conn.on_lost(lambda conn, reason: subscriber._link_lost(self, reason))

    async def subscribe(self, topic: str) -> None:
        """@raise DBConnectionError, ReplyError (MOVED, or a refusal)."""
        channel = topic.encode("utf-8")
        self.busy += 1
        try:
            reply = await self.conn.execute(self.subscriber._commands[0], channel)
        finally:
            self.busy -= 1
        if isinstance(reply, ReplyError):
            raise reply
        if not self.dead:
            self.channels[channel] = topic

    async def unsubscribe(self, channel: bytes) -> None:
        """Unsubscribe C{channel} if this link carries it."""
        if self.channels.pop(channel, None) is None:
            return
        self.leaving.add(channel)
        self.busy += 1
        try:
            await self.conn.execute(self.subscriber._commands[1], channel)
        finally:
            self.busy -= 1
            self.leaving.discard(channel)

    def message(self, channel: bytes, data: bytes) -> None:
        topic = self.channels.get(channel)
        if topic is None:  # e.g. just unsubscribed: filtered by the base
            topic = channel.decode("utf-8", "replace")
        self.subscriber._message(topic, data, self.address)

    def moved_away(self, channel: bytes) -> None:
        if self.channels.pop(channel, None) is not None:
            self.subscriber._moved(channel.decode("utf-8", "replace"))

    def ping(self) -> None:
        """Keepalive: a node that stops answering is dropped after the
        connection's timeout (the protocol's watchdog)."""
        if self.conn.connected and not self.dead:
            self.conn.execute(b"PING").addErrback(lambda f: None)

    def close(self) -> defer.Deferred[None]:
        """Close the connection (again: a no-op)."""
        self.dead = True
        return self.conn.close()


@implementer(ISubscriber)
class RedisSubscriber(SubscriberBase):
    """
    A subscriber over one Redis Cluster (or one server); see the module
    docstring.

    @param keepalive: seconds between PINGs on each subscribe connection
        (0: none), so that a node that stops answering without closing the
        connection (stopped, cut off) is left after C{keepalive} plus the
        client's C{timeout}.
    @param max_backoff: longest wait between reconnection rounds.
    """

    def __init__(self, client: ClusterClient, sharded: bool, name: str,
                 max_backoff: float = 2.0, keepalive: float = 2.0, clock: Any = None) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.client = client
        self.sharded = sharded
        self.name = name
        self.max_backoff = max_backoff
        self.keepalive = keepalive
        self._commands = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (
            b"SUBSCRIBE", b"UNSUBSCRIBE")
        self._links: dict[str, _Link] = {}
        self._started = False
        self._closed = False
        self._repairing: defer.Deferred[None] | None = None
        self._pinger = task.LoopingCall(self._ping)
        self._pinger.clock = clock

    @property
    def nodes(self) -> list[str]:
        """The nodes this subscriber is subscribed on now."""
        return sorted(a for a, link in self._links.items() if link.channels and not link.dead)

    # --- ISubscriber ------------------------------------------------------------------

    def initialize(self, callback: Callback) -> defer.Deferred[None]:
        """
        Subscribe C{"D"} (L{SEND_ALL_TOPIC}) and the topics registered so
        far.

        @return: Deferred firing with None once the server confirmed them;
            errbacks with L{SubscribeError} when no node could be reached
            or a node refused a topic.
        """
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
        if self.keepalive > 0:
            self._pinger.start(self.keepalive, now=False)

    def register_topic(self, topic: str) -> defer.Deferred[None]:
        """
        @return: Deferred firing with None once the server confirmed the
            subscription, or at once while the subscriber is not
            initialized yet or is reconnecting (the topic is then
            subscribed by L{initialize} or by the reconnection, which ends
            with C{dbrestart}).  Errbacks with L{SubscribeError} when a node
            refuses the topic (which is then not registered).
        """
        if topic in self.topics:
            return defer.succeed(None)
        self.topics.add(topic)
        if not self._started or self._repairing is not None:
            return defer.succeed(None)
        return defer.ensureDeferred(self._subscribe_now(topic))

    async def _subscribe_now(self, topic: str) -> None:
        try:
            await self._subscribe(topic)
        except SubscribeError:
            self.topics.discard(topic)
            raise
        except DftxError as e:
            # No node for it now: the reconnection rounds retry until one
            # takes it, then deliver dbrestart.
            log.info("subscribing {topic!r} left to the reconnection: {error}",
                     topic=topic, error=e)
            self._repair()

    def unregister_topic(self, topic: str) -> defer.Deferred[None]:
        """@return: Deferred firing with None once the server confirmed,
        or at once when no connection carries the topic (it is then not
        subscribed again)."""
        if topic not in self.topics:
            return defer.succeed(None)
        self.topics.discard(topic)
        channel = topic.encode("utf-8")
        for link in self._live_links():
            if channel in link.channels:
                return defer.ensureDeferred(self._unsubscribe(link, channel))
        return defer.succeed(None)

    async def _unsubscribe(self, link: _Link, channel: bytes) -> None:
        try:
            await link.unsubscribe(channel)
        except DftxError as e:  # the connection is gone, and the channel with it
            log.info("unsubscribing {channel!r}: {error}", channel=channel, error=e)
        self._prune()

    def close(self) -> defer.Deferred[None]:
        self._closed = True
        if self._pinger.running:
            self._pinger.stop()
        links, self._links = list(self._links.values()), {}
        return defer.DeferredList(
            [link.close() for link in links] + [self.client.close()],
            consumeErrors=True).addCallback(lambda _: None)

    # --- links ----------------------------------------------------------------------

    def _live_links(self) -> list[_Link]:
        return [link for link in self._links.values() if not link.dead]

    def _link(self, address: str) -> _Link:
        if self._closed:
            raise SubscribeError(self.name, "subscriber closed")
        link = self._links.get(address)
        if link is None or link.dead:
            link = self._links[address] = _Link(self, address)
        return link

    def _candidates(self, channel: bytes) -> list[str]:
        """The nodes to try for C{channel}, best first."""
        if self.sharded:
            owner = self.client.owner(key_slot(channel))
            return [owner] if owner else []
        for link in self._live_links():  # classic: every channel on one link
            return [link.address]
        topology = self.client.topology
        return _ring(topology.masters if topology else [], self.name)

    async def _subscribe(self, topic: str) -> None:
        """
        Subscribe C{topic} on its node: following MOVED (sharded), moving
        to the next node when one cannot be reached (classic), re-reading
        the topology between rounds.

        @raise SubscribeError: a node refused it.
        @raise DBConnectionError: no node took it.
        """
        channel = topic.encode("utf-8")
        errors: list[str] = []
        for _ in range(self.client.retries + 2):
            for address in self._candidates(channel):
                link = self._link(address)
                try:
                    await link.subscribe(topic)
                except ReplyError as e:
                    errors.append(str(e))
                    if e.kind not in _REDIRECTS:
                        raise SubscribeError(topic, str(e)) from None
                    break
                except DBConnectionError as e:
                    errors.append(str(e))
                    self._drop(link)
                    continue
                if topic not in self.topics:  # unregistered meanwhile
                    await link.unsubscribe(channel)
                return
            await self.client.refresh()
        raise DBConnectionError(None, f"cannot subscribe {topic!r}: {'; '.join(errors[-3:])}")

    async def _subscribe_all(self) -> None:
        """Subscribe every registered topic that no live link carries
        (topics registered, or links lost, meanwhile too)."""
        while True:
            done = {c for link in self._live_links() for c in link.channels}
            missing = sorted(t for t in self.topics if t.encode("utf-8") not in done)
            if not missing:
                return
            for topic in missing:
                if topic in self.topics:
                    await self._subscribe(topic)

    def _drop(self, link: _Link) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]
        link.dead = True
        # Not from inside the connection's loss handling (see _link_lost).
        self.clock.callLater(0, link.close)

    def _prune(self) -> None:
        """Close the links (sharded) that no longer carry any channel."""
        for link in self._live_links():
            if not link.channels and not link.busy:
                self._drop(link)

    def _ping(self) -> None:
        for link in self._live_links():
            link.ping()

    # --- failures ---------------------------------------------------------------------

    def _link_lost(self, link: _Link, reason: Any) -> None:
        if link.dead or self._closed:
            return
        link.dead = True
        # While initializing, _subscribe_all sees the lost channels itself.
        # Out of the connection's own loss handling: closing it from there
        # would re-enter ClientService.
        self.clock.callLater(0, self._repair)

    def _repair(self) -> None:
        """Reconnect and resubscribe everything, then deliver dbrestart."""
        if self._repairing is None and self._started and not self._closed:
            self._repairing = defer.ensureDeferred(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        try:
            while not self._closed:
                for link in [link for link in self._links.values() if link.dead]:
                    self._drop(link)
                try:
                    await self.client.refresh()
                    await self._subscribe_all()
                except DftxError as e:
                    if self._closed:
                        return
                    log.warn("resubscribing failed (again in {delay}s): {error}",
                             delay=delay, error=e)
                    await task.deferLater(self.clock, delay, lambda: None)
                    delay = min(delay * 2, self.max_backoff)
                    continue
                log.info("resubscribed {n} topics on {nodes}", n=len(self.topics),
                         nodes=self.nodes)
                self._repairing = None  # topics registered from the callback: at once
                self._restored()
                return
        finally:
            self._repairing = None

    def _moved(self, topic: str) -> None:
        """The server unsubscribed C{topic}: its slot moved."""
        if self._closed or topic not in self.topics or self._repairing is not None:
            return  # a reconnection under way subscribes it (and ends with dbrestart)
        log.info("slot of {topic!r} moved; subscribing on its new owner", topic=topic)
        defer.ensureDeferred(self._follow(topic))

    async def _follow(self, topic: str) -> None:
        try:
            await self.client.refresh()
            await self._subscribe(topic)
        except DftxError as e:
            log.warn("following {topic!r} failed: {error}", topic=topic, error=e)
            self._repair()
            return
        self._prune()
        self.counters["moves"] += 1
        self._call(DbUpdate.control(SYNC, topic))


class _Lane:
    """
    Where a sharded publisher sends one topic's messages: C{node}, the
    slot's owner when the first of them was sent, for as long as any sent
    there is in flight.  When the slot moves, each send comes back
    C{MOVED} from the old owner, in order, and is sent on at once to the
    new one (C{moved_to}); sends made meanwhile still go to the old owner,
    behind the others, until none is left there: so no send overtakes an
    earlier one.

    @ivar hops: sends in flight, per node.
    """

    __slots__ = ("node", "moved_to", "hops")

    def __init__(self, node: str) -> None:
        self.node = node
        self.moved_to: str | None = None
        self.hops: dict[str, int] = {}


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
        self._lanes: dict[str, _Lane] = {}  # sharded, per topic
        #: counters: redirected (sharded sends a node answered MOVED)
        self.stats: Counter[str] = Counter()

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
            return self._spublish(topic, channel, data)
        node = self.node
        if node is None:
            return defer.fail(PublishError(topic, "no Redis node"))
        d = self.client.connection(node).execute(b"PUBLISH", channel, data)
        return d.addCallbacks(self._sent, self._failed, callbackArgs=(topic, node),
                              errbackArgs=(topic, node))

    def _spublish(self, topic: str, channel: bytes, data: bytes) -> defer.Deferred[None]:
        """
        SPUBLISH on the shared connection to the node of C{topic}'s lane
        (see L{_Lane}): the slot's owner, or where the topic's sends in
        flight went.
        """
        lane = self._lanes.get(topic)
        if lane is None:
            node = self.client.owner(key_slot(channel))
            if node is None:
                self.client.refresh().addErrback(lambda f: None)
                return defer.fail(PublishError(topic, "no node serves its slot"))
            lane = self._lanes[topic] = _Lane(node)
        return self._hop(topic, lane, lane.node, channel, data, 0)

    def _hop(self, topic: str, lane: "_Lane", node: str, channel: bytes, data: bytes,
             redirects: int) -> defer.Deferred[None]:
        d = self.client.connection(node).execute(b"SPUBLISH", channel, data)
        lane.hops[node] = lane.hops.get(node, 0) + 1
        return d.addBoth(self._hopped, topic, lane, node, channel, data, redirects)

    def _hopped(self, result: Any, topic: str, lane: "_Lane", node: str, channel: bytes,
                data: bytes, redirects: int) -> Any:
        left = lane.hops.pop(node) - 1
        if left:
            lane.hops[node] = left
        moved = type(result) is ReplyError and result.kind == "MOVED"
        d = None
        if moved and redirects < MAX_REDIRECTS:
            # Not executed: on to the new owner at once, in reply order,
            # so behind every earlier send of the topic.
            self.stats["redirected"] += 1
            target = self.client.redirect_target(result, node)[1]
            if lane.moved_to != target:
                lane.moved_to = target
                self.client.refresh().addErrback(lambda f: None)
            d = self._hop(topic, lane, target, channel, data, redirects + 1)
        if lane.moved_to is not None and lane.node not in lane.hops:
            # Every send to the old owner came back: new sends may go
            # straight to the new one.
            lane.node, lane.moved_to = lane.moved_to, None
        if not lane.hops and self._lanes.get(topic) is lane:
            del self._lanes[topic]
        if d is not None:
            return d
        if isinstance(result, Failure):
            return self._failed(result, topic, node)
        if type(result) is ReplyError:
            raise PublishError(topic, result.message, node)
        return None

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
    @param keepalive: seconds between a subscriber's PINGs on each of its
        connections (0: none); see L{RedisSubscriber}.
    @param client_options: passed to each L{ClusterClient} (C{retries},
        C{password}, C{username}, C{tls}, C{timeout}, ...).
    """

    def __init__(self, hosts: Sequence[str], sharded: bool = False, keepalive: float = 2.0,
                 **client_options: Any) -> None:
        self.hosts = list(hosts)
        self.sharded = sharded
        self.keepalive = keepalive
        self.client_options = client_options

    @classmethod
    def from_config(cls, config: Any) -> "RedisPubSub":
        """For [df] pub_sub_driver = redis or redis_sharded, on
        remote_db_hosts with the [df_redis] settings."""
        r = config.df_redis
        tls = tls_from_config(r)
        return cls(list(config.df.remote_db_hosts),
                   sharded=config.df.pub_sub_driver == "redis_sharded",
                   retries=r.retries, tls=tls, password=r.password or None,
                   username=r.username or None)

    def _client(self) -> ClusterClient:
        return ClusterClient(self.hosts, **self.client_options)

    def get_publisher(self, publisher_id: str | None = None) -> RedisPublisher:
        return RedisPublisher(self._client(), self.sharded, publisher_id)

    def get_subscriber(self, name: str | None = None) -> RedisSubscriber:
        """
        @param name: what a classic subscriber hashes to pick its node (a
            chassis name keeps the choice across restarts); a random one
            by default.
        """
        return RedisSubscriber(self._client(), self.sharded,
                               name or f"subscriber-{uuid.uuid4().hex}",
                               keepalive=self.keepalive)
