"""
One subscribe connection of the Redis subscriber (L{dftx.pubsub.redis_subscriber}):
a RESP connection in subscribed mode to one node, the channels the server
confirmed on it, and the order in which a name tries the masters.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

from twisted.internet import defer

from dftx.errors import ReplyError
from dftx.redis.cluster import ClusterClient
from dftx.redis.connection import NodeConnection
from dftx.redis.resp import RespProtocol

__all__ = ["Link", "PubSubProtocol", "ring"]

_MESSAGES = frozenset({b"message", b"smessage"})


def ring(masters: Sequence[str], name: str) -> list[str]:
    """C{masters} in the order C{name} tries them: from the one its hash
    picks, round the sorted list."""
    ordered = sorted(masters)
    if not ordered:
        return []
    start = zlib.crc32(name.encode("utf-8")) % len(ordered)
    return ordered[start:] + ordered[:start]


class PubSubProtocol(RespProtocol):
    """
    A RESP connection in subscribed mode: pushed messages go to the link,
    and so does a C{sunsubscribe} that this side did not ask for (the
    channel's slot moved); every other reply answers a command.
    """

    link: "Link"

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


class Link:
    """
    One subscribe connection to one node and the channels subscribed on it
    (confirmed by the server).  It is never reused after its connection is
    lost (L{dead}): the subscriber makes a new one.
    """

    def __init__(self, client: ClusterClient, address: str, commands: tuple[bytes, bytes],
                 on_message: Callable[[str, bytes, str], None],
                 on_moved: Callable[[str], None],
                 on_lost: Callable[["Link", Any], None]) -> None:
        """
        @param commands: the subscribe and unsubscribe commands
            (C{SUBSCRIBE}/C{UNSUBSCRIBE}, or the sharded pair).
        @param on_message: called with the topic, the payload and the node.
        @param on_moved: called with a topic whose slot moved away.
        @param on_lost: called with this link and the reason its connection
            was lost.
        """
        self.address = address
        self.commands = commands
        self.on_message = on_message
        self.on_moved = on_moved
        self.channels: dict[bytes, str] = {}  # channel -> topic
        self.leaving: set[bytes] = set()
        self.busy = 0  # commands in flight
        self.dead = False

        def build(peer: str, clock: Any, timeout: float) -> PubSubProtocol:
            proto = PubSubProtocol(peer, clock, timeout)
            proto.link = self
            return proto

        self.conn: NodeConnection = client.new_connection(address, build)
        self.conn.on_lost(lambda conn, reason: on_lost(self, reason))

    async def subscribe(self, topic: str) -> None:
        """@raise DBConnectionError, ReplyError (MOVED, or a refusal)."""
        channel = topic.encode("utf-8")
        self.busy += 1
        try:
            reply = await self.conn.execute(self.commands[0], channel)
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
            await self.conn.execute(self.commands[1], channel)
        finally:
            self.busy -= 1
            self.leaving.discard(channel)

    def message(self, channel: bytes, data: bytes) -> None:
        topic = self.channels.get(channel)
        if topic is None:  # e.g. just unsubscribed: filtered by the base
            topic = channel.decode("utf-8", "replace")
        self.on_message(topic, data, self.address)

    def moved_away(self, channel: bytes) -> None:
        if self.channels.pop(channel, None) is not None:
            self.on_moved(channel.decode("utf-8", "replace"))

    def ping(self) -> None:
        """Keepalive: a node that stops answering is dropped after the
        connection's timeout (the protocol's watchdog)."""
        if self.conn.connected and not self.dead:
            self.conn.execute(b"PING").addErrback(lambda f: None)

    def close(self) -> defer.Deferred[None]:
        """Close the connection (again: a no-op)."""
        self.dead = True
        return self.conn.close()
