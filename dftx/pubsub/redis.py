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

Failures, and what the caller sees (for the subscriber: see
L{dftx.pubsub.redis_subscriber}):

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
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dftx.deferreds import deferred
from dftx.endpoints import tls_from_config
from dftx.errors import DBConnectionError, DftxError, PublishError, ReplyError
from dftx.pubsub.api import IPublisher, IPubSub, PublisherBase
from dftx.pubsub.redis_link import ring
from dftx.pubsub.redis_subscriber import RedisSubscriber
from dftx.redis.cluster import MAX_REDIRECTS, ClusterClient
from dftx.redis.slots import key_slot

__all__ = ["RedisPubSub", "RedisPublisher", "RedisSubscriber"]

log = Logger()


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

    @deferred
    async def initialize(self) -> None:
        """Read the cluster's topology (unless the client has it) and pick
        the node (classic).

        @return: Deferred firing with None; errbacks with L{PublishError}
            when no node could be reached."""
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
        order = ring(topology.masters if topology else [], self.id)
        if failed in order:
            i = order.index(failed)
            order = order[i + 1:] + order[:i]
        self.node = order[0] if order else None

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
        C{password}, C{username}, C{tls}, C{timeout}, ...); its C{reactor}
        (default: the global one) also clocks the subscribers.
    """

    def __init__(self, hosts: Sequence[str], sharded: bool = False, keepalive: float = 2.0,
                 **client_options: Any) -> None:
        self.hosts = list(hosts)
        self.sharded = sharded
        self.keepalive = keepalive
        self.client_options = client_options

    @classmethod
    def from_config(cls, config: Any, reactor: Any = None) -> "RedisPubSub":
        """For [df] pub_sub_driver = redis or redis_sharded, on
        remote_db_hosts with the [df_redis] settings."""
        r = config.df_redis
        tls = tls_from_config(r)
        return cls(list(config.df.remote_db_hosts),
                   sharded=config.df.pub_sub_driver == "redis_sharded",
                   retries=r.retries, tls=tls, password=r.password or None,
                   username=r.username or None,
                   **({} if reactor is None else {"reactor": reactor}))

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
                               keepalive=self.keepalive,
                               clock=self.client_options.get("reactor"))
