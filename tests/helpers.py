"""
Helpers the pub/sub tests share: a recording subscriber callback
(L{Received}), ZeroMQ publishers and subscribers on free ports, and
L{joined}, which waits until a subscription has propagated.
"""

from __future__ import annotations

from dftx.harness import poll
from dftx.pubsub.zmq import ZmqPubSub
from dftx.update import DbUpdate

__all__ = ["ANY_PORT", "Received", "joined", "publisher", "row", "subscriber"]

ANY_PORT = "tcp://127.0.0.1:*"


def row(key, topic=None, value="{}"):
    """A create of C{key} in table lport (on C{topic}, "D" when None)."""
    return DbUpdate("lport", key, "create", value, topic)


class Received:
    """A subscriber callback that records row updates (and control events)."""

    def __init__(self):
        self.updates = []

    def __call__(self, update):
        self.updates.append(update)

    def keys(self, topic=None, probes=False):
        """Keys received (on C{topic}), without L{joined}'s probes."""
        return [u.key for u in self.updates
                if not u.is_control and (topic is None or u.topic == topic)
                and (probes or not u.key.startswith("~"))]


async def publisher(bind=ANY_PORT, **kw):
    """An initialized ZeroMQ publisher bound to C{bind}."""
    pub = ZmqPubSub(bind=bind, **kw).get_publisher()
    await pub.initialize()
    return pub


async def subscriber(*uris, topics=()):
    """An initialized ZeroMQ subscriber of C{topics} (and "D") connected to
    C{uris}, and its L{Received}."""
    sub = ZmqPubSub().get_subscriber()
    got = Received()
    for t in topics:
        await sub.register_topic(t)
    for uri in uris:
        await sub.register_listen_address(uri)
    await sub.initialize(got)
    return sub, got


async def joined(pub, got, topic="D", key="probe"):
    """Send probes (keys "~" + C{key}) until the subscriber gets one
    (ZeroMQ subscriptions propagate asynchronously after connect)."""
    key = "~" + key

    async def probe():
        await pub.send_event(row(key, topic))
        return key in got.keys(topic, probes=True)
    await poll(probe, 10, f"subscription to {pub.uri} on {topic!r}")
