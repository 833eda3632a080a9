"""
The Redis subscriber: every channel on one connection to the node its
name hashes to (classic), or one connection per master that owns one of its
topics' slots (sharded); see L{dftx.pubsub.redis} for the driver as a whole.

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
- A message that does not decode is counted and dropped (see
  L{dftx.pubsub.api.SubscriberBase}); the subscriber goes on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from dftx.deferreds import deferred, or_global_reactor
from dftx.errors import DBConnectionError, DftxError, ReplyError, SubscribeError
from dftx.pubsub.api import Callback, ISubscriber, SubscriberBase
from dftx.pubsub.redis_link import Link, ring
from dftx.redis.cluster import ClusterClient
from dftx.redis.slots import key_slot
from dftx.update import SEND_ALL_TOPIC, SYNC, DbUpdate

__all__ = ["RedisSubscriber"]

log = Logger()

_REDIRECTS = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})
"""Replies to a subscribe that send it to another node (or to later)."""

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
        self.clock = or_global_reactor(clock)
        self.client = client
        self.sharded = sharded
        self.name = name
        self.max_backoff = max_backoff
        self.keepalive = keepalive
        self._commands = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (
            b"SUBSCRIBE", b"UNSUBSCRIBE")
        self._links: dict[str, Link] = {}
        self._started = False
        self._closed = False
        self._repairing: defer.Deferred[None] | None = None
        self._pinger = task.LoopingCall(self._ping)
        self._pinger.clock = self.clock

    @property
    def nodes(self) -> list[str]:
        """The nodes this subscriber is subscribed on now."""
        return sorted(a for a, link in self._links.items() if link.channels and not link.dead)

    # --- ISubscriber ------------------------------------------------------------------

    @deferred
    async def initialize(self, callback: Callback) -> None:
        """
        Subscribe C{"D"} (L{SEND_ALL_TOPIC}) and the topics registered so
        far.

        @return: Deferred firing with None once the server confirmed them;
            errbacks with L{SubscribeError} when no node could be reached
            or a node refused a topic.
        """
        self._set_callback(callback)
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

    @deferred
    async def register_topic(self, topic: str) -> None:
        """
        @return: Deferred firing with None once the server confirmed the
            subscription, or at once while the subscriber is not
            initialized yet or is reconnecting (the topic is then
            subscribed by L{initialize} or by the reconnection, which ends
            with C{dbrestart}).  Errbacks with L{SubscribeError} when a node
            refuses the topic (which is then not registered).
        """
        if topic in self.topics:
            return
        self.topics.add(topic)
        if not self._started or self._repairing is not None:
            return
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

    @deferred
    async def unregister_topic(self, topic: str) -> None:
        """@return: Deferred firing with None once the server confirmed,
        or at once when no connection carries the topic (it is then not
        subscribed again)."""
        if topic not in self.topics:
            return
        self.topics.discard(topic)
        channel = topic.encode("utf-8")
        link = next((link for link in self._live_links() if channel in link.channels), None)
        if link is None:
            return
        try:
            await link.unsubscribe(channel)
        except DftxError as e:  # the connection is gone, and the channel with it
            log.info("unsubscribing {channel!r}: {error}", channel=channel, error=e)
        self._prune()

    def close(self) -> defer.Deferred[None]:
        """Stop, and close every connection.

        @return: Deferred firing with None once they are closed."""
        self._closed = True
        if self._pinger.running:
            self._pinger.stop()
        links, self._links = list(self._links.values()), {}
        return defer.DeferredList(
            [link.close() for link in links] + [self.client.close()],
            consumeErrors=True).addCallback(lambda _: None)

    # --- links ----------------------------------------------------------------------

    def _live_links(self) -> list[Link]:
        return [link for link in self._links.values() if not link.dead]

    def _link(self, address: str) -> Link:
        if self._closed:
            raise SubscribeError(self.name, "subscriber closed")
        link = self._links.get(address)
        if link is None or link.dead:
            link = self._links[address] = Link(self.client, address, self._commands, self._message, self._moved,
                                             self._link_lost)
        return link

    def _candidates(self, channel: bytes) -> list[str]:
        """The nodes to try for C{channel}, best first."""
        if self.sharded:
            owner = self.client.owner(key_slot(channel))
            return [owner] if owner else []
        for link in self._live_links():  # classic: every channel on one link
            return [link.address]
        topology = self.client.topology
        return ring(topology.masters if topology else [], self.name)

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

    def _drop(self, link: Link) -> None:
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

    def _link_lost(self, link: Link, reason: Any) -> None:
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
            self._repairing = self._reconnect()

    @deferred
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
        self._follow(topic)

    @deferred
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


