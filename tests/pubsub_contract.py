"""
What every pub/sub driver must do: a test class supplies a `pubsub` fixture
(an IPubSub) and inherits the tests.  For a driver whose subscriptions are
in effect once initialize/register_topic fired, that is all; one whose
subscriber connects to publishers (ZeroMQ) overrides `attach`, which
connects the pair and returns once the subscriptions are in effect.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from dftx.pubsub.api import IPublisher, IPubSub, ISubscriber
from dftx.harness import poll
from dftx.update import DbUpdate

aio = pytest_twisted.ensureDeferred


def row(key, topic=None):
    return DbUpdate("lport", key, "create", '{"k": 1}', topic)


class PubSubContract:
    async def pair(self, pubsub, *topics):
        assert verifyObject(IPubSub, pubsub)
        pub, sub, got = pubsub.get_publisher(), pubsub.get_subscriber(), []
        assert verifyObject(IPublisher, pub) and verifyObject(ISubscriber, sub)
        self._close = [sub, pub]
        try:
            await pub.initialize()
            for t in topics:
                await sub.register_topic(t)
            await sub.initialize(got.append)
            await self.attach(pub, sub, got)
        except BaseException:
            await self.close()
            raise
        return pub, sub, got

    async def attach(self, pub, sub, got):
        """Connect C{sub} to C{pub} and return once the subscriptions are
        in effect, leaving C{got} empty (a brokered driver: nothing to do)."""

    async def close(self):
        for x in self._close:
            await x.close()

    @staticmethod
    def rows(got, topic=None):
        return [u for u in got if not u.is_control and (topic is None or u.topic == topic)]

    @aio
    async def test_round_trip_stamps_and_exact_topics(self, pubsub, unique):
        pub, sub, got = await self.pair(pubsub, f"{unique}1")
        try:
            await pub.send_event(row("a", f"{unique}10"))
            await pub.send_event(row("b", f"{unique}1"))
            await pub.send_event(row("c"))  # "D": always subscribed
            await poll(lambda: len(self.rows(got)) == 2, 10, "b and c")
            b, c = self.rows(got)
            assert (b.key, b.topic, b.value, b.publisher, b.seq) == (
                "b", f"{unique}1", '{"k": 1}', pub.id, 1)
            assert (c.key, c.topic) == ("c", "D")
        finally:
            await self.close()

    @aio
    async def test_order_without_waiting_and_unregister(self, pubsub, unique):
        pub, sub, got = await self.pair(pubsub, unique)
        try:
            await defer.gatherResults([pub.send_event(row(f"{i}", unique)) for i in range(300)])
            await poll(lambda: len(self.rows(got, unique)) == 300, 10, "300 in order")
            assert [u.key for u in self.rows(got, unique)] == [f"{i}" for i in range(300)]
            assert [u.seq for u in self.rows(got, unique)] == list(range(1, 301))
            await sub.unregister_topic(unique)
            await pub.send_event(row("after", unique))
            await pub.send_event(row("marker"))
            await poll(lambda: "marker" in [u.key for u in got], 10, "marker")
            assert "after" not in [u.key for u in got]
        finally:
            await self.close()

    @aio
    async def test_send_event_topic_overrides_the_update_topic(self, pubsub, unique):
        pub, sub, got = await self.pair(pubsub, unique)
        try:
            await pub.send_event(row("x", "elsewhere"), topic=unique)
            await poll(lambda: self.rows(got, unique), 10, "x")
        finally:
            await self.close()
