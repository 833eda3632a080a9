"""The driver-independent halves of publishers and subscribers, and the
interfaces every driver provides."""

import inspect

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyClass, verifyObject

from dftx.codec import decode, encode
from dftx.errors import PublishError
from dftx.pubsub.api import IPublisher, IPubSub, ISubscriber, PublisherBase, SubscriberBase
from dftx.pubsub.redis import RedisPubSub
from dftx.pubsub.zmq import ZmqPubSub
from dftx.testing import MemoryPubSub
from dftx.update import DbUpdate

DRIVERS = {
    "zmq": lambda: ZmqPubSub(bind="tcp://127.0.0.1:*"),
    "redis-classic": lambda: RedisPubSub(["127.0.0.1:1"]),
    "redis-sharded": lambda: RedisPubSub(["127.0.0.1:1"], sharded=True),
    "memory": MemoryPubSub,
}
EXTRA_ARGUMENTS = {(RedisPubSub, "get_subscriber"): ["name"]}
"""Optional arguments a driver takes beyond its interface."""


def _made(name):
    pubsub = DRIVERS[name]()
    return [(IPubSub, pubsub), (IPublisher, pubsub.get_publisher("p1")),
            (ISubscriber, pubsub.get_subscriber())]


@pytest.mark.parametrize("name", DRIVERS)
def test_every_driver_provides_the_interfaces(name):
    # Nothing here connects: objects are made, never initialized.
    for iface, obj in _made(name):
        assert verifyClass(iface, type(obj)) and verifyObject(iface, obj)


@pytest.mark.parametrize("name", DRIVERS)
def test_the_interfaces_declare_the_drivers_arguments(name):
    for iface, obj in _made(name):
        for method in iface.names():
            if not callable(getattr(obj, method)):
                continue
            declared = list(iface[method].positional)
            params = list(inspect.signature(getattr(obj, method)).parameters)
            extra = EXTRA_ARGUMENTS.get((type(obj), method), [])
            assert params == declared + extra, f"{type(obj).__name__}.{method}"


class RecordingPublisher(PublisherBase):
    def __init__(self, fail=None):
        super().__init__("pub-1")
        self.sent = []
        self.fail = fail

    def _send(self, topic, data):
        if self.fail == "raise":
            raise OSError("socket gone")
        if self.fail == "errback":
            return defer.fail(ConnectionError("broker down"))
        self.sent.append((topic, decode(data)))
        return defer.succeed(None)


def row(key, topic=None):
    return DbUpdate("lport", key, "create", "{}", topic)


@pytest_twisted.ensureDeferred
async def test_publisher_stamps_id_and_per_topic_seq():
    pub = RecordingPublisher()
    await pub.send_event(row("a"))
    await pub.send_event(row("b", "t1"))
    await pub.send_event(row("c"))
    await pub.send_event(row("d", "t1"), topic="t2")
    assert [(t, u.key, u.topic, u.publisher, u.seq) for t, u in pub.sent] == [
        ("D", "a", "D", "pub-1", 1),
        ("t1", "b", "t1", "pub-1", 1),
        ("D", "c", "D", "pub-1", 2),
        ("t2", "d", "t2", "pub-1", 1),
    ]


@pytest.mark.parametrize("mode, reason", [("raise", "OSError: socket gone"),
                                          ("errback", "ConnectionError: broker down")])
@pytest_twisted.ensureDeferred
async def test_publisher_failures_are_publish_errors(mode, reason):
    pub = RecordingPublisher(fail=mode)
    with pytest.raises(PublishError) as info:
        await pub.send_event(row("a", "t1"))
    assert info.value.topic == "t1" and reason in str(info.value)


class Recorder:
    def __init__(self):
        self.got = []

    def __call__(self, update):
        self.got.append(update)


def subscriber(*topics):
    sub = SubscriberBase()
    sub.topics.update(topics)
    rec = Recorder()
    sub._set_callback(rec)
    return sub, rec


def msg(key, seq, topic="D", publisher="p"):
    return encode(row(key), publisher=publisher, seq=seq, topic=topic)


def test_exact_topic_filter():
    sub, rec = subscriber("t1")
    sub._message("t10", msg("x", 1, "t10"))
    sub._message("t1", msg("y", 1, "t1"))
    assert [u.key for u in rec.got] == ["y"]
    assert sub.counters["filtered"] == 1 and sub.counters["delivered"] == 1


def test_gap_delivers_sync_of_that_topic_first():
    sub, rec = subscriber("D", "t1")
    sub._message("D", msg("a", 1))
    sub._message("t1", msg("b", 1, "t1"))
    sub._message("D", msg("c", 4))
    sub._message("t1", msg("d", 2, "t1"))
    assert [(u.action, u.key, u.topic) for u in rec.got] == [
        ("create", "a", "D"), ("create", "b", "t1"),
        ("sync", None, "D"), ("create", "c", "D"), ("create", "d", "t1"),
    ]
    assert sub.counters["gaps"] == 1


def test_duplicates_dropped_and_restarted_publisher_resyncs():
    sub, rec = subscriber("D")
    for seq in (1, 2, 2, 3, 1):
        sub._message("D", msg(f"k{seq}", seq))
    assert [(u.action, u.key) for u in rec.got] == [
        ("create", "k1"), ("create", "k2"), ("create", "k3"),
        ("sync", None), ("create", "k1"),
    ]
    assert sub.counters["duplicates"] == 1


def test_publishers_are_tracked_separately_and_joining_mid_stream_syncs():
    sub, rec = subscriber("D")
    sub._message("D", msg("a", 5, publisher="p1"))
    sub._message("D", msg("b", 1, publisher="p2"))
    sub._message("D", msg("c", 6, publisher="p1"))
    assert [(u.action, u.key) for u in rec.got] == [
        ("sync", None), ("create", "a"), ("create", "b"), ("create", "c")]
    assert sub.counters["joins"] == 1 and sub.counters["gaps"] == 0


def test_unstamped_messages_from_dragonflow_are_delivered():
    sub, rec = subscriber("D")
    sub._message("D", encode(row("a")))
    sub._message("D", encode(row("a")))
    assert len(rec.got) == 2


def test_garbage_is_counted_logged_once_per_peer_and_dropped():
    sub, rec = subscriber("D")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for peer in ("peer-a", "peer-a", "peer-b"):
            sub._message("D", b"\xc1garbage", peer=peer)
        sub._message("D", msg("ok", 1))
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if "undecodable" in e.get("log_format", "")]
    assert len(warnings) == 2
    assert sub.counters["undecodable"] == 3
    assert [u.key for u in rec.got] == ["ok"]


def test_oversized_is_counted_dropped_and_its_topic_resynced():
    sub, rec = subscriber("D")
    sub.max_message_size = 100
    sub._message("D", msg("a", 1))
    sub._message("D", encode(DbUpdate("lport", "big", "create", "x" * 200),
                             publisher="p", seq=2))
    sub._message("D", msg("c", 3))
    # The drop resyncs at once (it may have been the topic's last message);
    # the next one shows the gap too.
    assert [(u.action, u.key, u.topic) for u in rec.got] == [
        ("create", "a", "D"), ("sync", None, "D"), ("sync", None, "D"), ("create", "c", "D")]
    assert sub.counters["oversized"] == 1 and sub.counters["delivered"] == 2


def test_callback_errors_are_counted_and_the_stream_goes_on():
    sub = SubscriberBase()
    sub.topics.add("D")
    seen = []

    def callback(update):
        seen.append(update.key)
        if update.key == "boom":
            raise RuntimeError("app bug")
        if update.key == "async-boom":
            return defer.fail(RuntimeError("async app bug"))

    sub._set_callback(callback)
    for i, key in enumerate(["boom", "async-boom", "fine"], 1):
        sub._message("D", msg(key, i))
    assert seen == ["boom", "async-boom", "fine"]
    assert sub.counters["callback_errors"] == 2
    assert sub.counters["delivered"] == 3


def test_restored_delivers_dbrestart_and_forgets_sequences():
    sub, rec = subscriber("D")
    sub._message("D", msg("a", 1))
    sub._restored()
    sub._message("D", msg("b", 1))
    assert [(u.action, u.key) for u in rec.got] == [
        ("create", "a"), ("dbrestart", None), ("create", "b")]
    assert sub.counters["restarts"] == 1 and sub.counters["gaps"] == 0
