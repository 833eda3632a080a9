"""The ZeroMQ driver over real sockets (tcp and ipc on this host)."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import pytest_twisted
import zmq
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from dftx.codec import decode, encode
from dftx.errors import PublishError, SubscribeError
from dftx.pubsub.zmq import ZmqPubSub
from dftx.pubsub.zmq_relay import ZmqRelay
from dftx.pubsub.zmq_socket import ZmqSocket, context
from dftx.pubsub.zmq_subscriber import RECONNECT_CHECK
from dftx.harness import poll
from dftx.update import SYNC

from .pubsub_contract import PubSubContract

from .helpers import ANY_PORT, Received, joined, publisher, row, subscriber


class TestZmqPubSubContract(PubSubContract):
    """The pub/sub contract on the default driver, over tcp on a free port."""

    @pytest.fixture
    def pubsub(self):
        return ZmqPubSub(bind=ANY_PORT)

    async def attach(self, pub, sub, got):
        # ZeroMQ subscriptions reach the PUB socket some time after the
        # connection: probe on a topic of its own until one arrives (the
        # SUB socket sends its subscriptions in order, so the others are in
        # effect too), then forget the probes.
        await sub.register_listen_address(pub.uri)
        await sub.register_topic("~probe")
        received = Received()
        received.updates = got
        await joined(pub, received, "~probe")
        await sub.unregister_topic("~probe")
        got.clear()


@pytest_twisted.ensureDeferred
async def test_wire_is_two_frames_topic_and_msgpack_map():
    pub = await publisher()
    frames = []
    raw = ZmqSocket(zmq.SUB, "raw SUB", on_message=frames.append)
    raw.socket.subscribe(b"")
    raw.connect(pub.uri)
    try:
        async def probe():
            await pub.send_event(row("k1", "tenant"))
            return frames
        await poll(probe, 10, "raw SUB gets a message")
        topic, data = frames[0]
        assert topic == b"tenant"
        message = msgpack.unpackb(data)
        assert {k: message[k] for k in ("table", "key", "action", "value", "topic")} == {
            "table": "lport", "key": "k1", "action": "create", "value": "{}",
            "topic": "tenant"}
        assert message["publisher"] == pub.id and message["seq"] >= 1
    finally:
        await raw.close(0)
        await pub.close()


@pytest_twisted.ensureDeferred
async def test_dragonflow_style_message_without_stamp_is_delivered():
    raw = ZmqSocket(zmq.PUB, "raw PUB")
    uri = raw.bind(ANY_PORT)
    sub, got = await subscriber(uri)
    try:
        async def probe():
            await raw.send_frames([b"D", encode(row("df"))])
            return got.keys()
        await poll(probe, 10, "unstamped Dragonflow message delivered")
        assert [u for u in got.updates if not u.is_control][0] == row("df")
    finally:
        await sub.close()
        await raw.close(0)


@pytest_twisted.ensureDeferred
async def test_exact_topic_filter_t1_never_gets_t10():
    pub = await publisher()
    sub, got = await subscriber(pub.uri, topics=["t1"])
    try:
        await joined(pub, got, "t1")
        for i in range(50):
            pub.send_event(row(f"ten-{i}", "t10"))
            pub.send_event(row(f"one-{i}", "t1"))
        await pub.send_event(row("end", "t1"))
        await poll(lambda: "end" in got.keys(), 10, "t1 messages")
        assert got.keys("t1") == [f"one-{i}" for i in range(50)] + ["end"]
        assert got.keys("t10") == []
        assert sub.counters["filtered"] == 50  # ZeroMQ's prefix match let them in
        await sub.unregister_topic("t1")
        await sub.register_topic("t10")
        await joined(pub, got, "t10", "probe10")
        await pub.send_event(row("after", "t1"))
        await pub.send_event(row("end10", "t10"))
        await poll(lambda: "end10" in got.keys(), 10, "t10 messages")
        assert "after" not in got.keys()
    finally:
        await sub.close()
        await pub.close()


@pytest_twisted.ensureDeferred
async def test_order_per_topic_without_waiting_and_default_topic_d():
    pub = await publisher()
    sub, got = await subscriber(pub.uri, topics=["a"])
    try:
        await joined(pub, got, "D")
        await joined(pub, got, "a")
        sends = []
        for i in range(2000):
            sends.append(pub.send_event(row(f"d{i}")))
            sends.append(pub.send_event(row(f"a{i}", "a")))
        await defer.gatherResults(sends)
        await poll(lambda: len(got.keys()) >= 4000, 10, "4000 messages")
        assert got.keys("D") == [f"d{i}" for i in range(2000)]
        assert got.keys("a") == [f"a{i}" for i in range(2000)]
        assert sub.counters["gaps"] == 0
    finally:
        await sub.close()
        await pub.close()


@pytest_twisted.ensureDeferred
async def test_many_publishers_added_and_removed_at_run_time():
    p1, p2 = await publisher(), await publisher()
    sub, got = await subscriber(p1.uri)
    try:
        await joined(p1, got, key="from1")
        await sub.register_listen_address(p2.uri)
        await joined(p2, got, key="from2")
        assert sub.addresses == {p1.uri, p2.uri}

        await sub.unregister_listen_address(p1.uri)
        assert sub.addresses == {p2.uri}
        # Once p2's marks arrive, a disconnect is complete; from then on
        # nothing of p1 may arrive.
        for i in range(3):
            await p1.send_event(row(f"late{i}"))
        await joined(p2, got, key="mark")
        before = len(got.keys())
        late_before = [k for k in got.keys() if k.startswith("late")]
        for i in range(20):
            await p1.send_event(row(f"gone{i}"))
            await p2.send_event(row(f"mark{i}"))
            await poll(lambda i=i: f"mark{i}" in got.keys(), 10, f"mark{i}")
        assert not [k for k in got.keys() if k.startswith("gone")]
        assert len(got.keys()) == before + 20
        assert [k for k in got.keys() if k.startswith("late")] == late_before

        await sub.register_listen_address(p1.uri)
        await joined(p1, got, key="back")
    finally:
        await sub.close()
        await p1.close()
        await p2.close()


@pytest_twisted.ensureDeferred
async def test_bad_addresses_are_errors_naming_the_address():
    pub = await publisher()
    try:
        with pytest.raises(PublishError) as info:
            await publisher(pub.uri)
        assert pub.uri in str(info.value) and info.value.peer == pub.uri
    finally:
        await pub.close()
    sub, _ = await subscriber()
    try:
        with pytest.raises(SubscribeError) as err:
            await sub.register_listen_address("nonsense://x")
        assert err.value.target == "nonsense://x"
        assert sub.addresses == set()
    finally:
        await sub.close()
    with pytest.raises(ValueError):
        ZmqPubSub().get_publisher()


async def relay_chain(tmp_path, **kw):
    """writer PUSH -> relay PULL (ipc) -> PUB (tcp) -> subscriber."""
    ipc = f"ipc://{tmp_path}/relay.sock"
    out = await publisher()
    relay = ZmqRelay(ipc, out)
    relay.start()
    writer = ZmqPubSub(relay=ipc, **kw).get_publisher()
    await writer.initialize()
    return ipc, out, relay, writer


@pytest_twisted.ensureDeferred
async def test_push_pull_relay_keeps_writers_ids_and_order(tmp_path):
    ipc, out, relay, w1 = await relay_chain(tmp_path)
    w2 = ZmqPubSub(relay=ipc).get_publisher()
    await w2.initialize()
    sub, got = await subscriber(out.uri, topics=["t"])
    try:
        await joined(w1, got, "t", "p1")
        await joined(w2, got, "t", "p2")
        sends = [w.send_event(row(f"{n}-{i}", "t"))
                 for i in range(500) for n, w in (("w1", w1), ("w2", w2))]
        await defer.gatherResults(sends)
        await poll(lambda: len([k for k in got.keys() if "-" in k]) == 1000, 10, "relayed")
        for n, w in (("w1", w1), ("w2", w2)):
            mine = [u for u in got.updates if not u.is_control and u.key.startswith(n)]
            assert [u.key for u in mine] == [f"{n}-{i}" for i in range(500)]
            assert {u.publisher for u in mine} == {w.id}
        assert sub.counters["gaps"] == 0
        assert relay.counters["relayed"] >= 1000
    finally:
        await sub.close()
        await w1.close()
        await w2.close()
        await relay.close()
        await out.close()
    assert not os.path.exists(ipc[len("ipc://"):])


@pytest_twisted.ensureDeferred
async def test_push_before_relay_queues_then_delivers_in_order(tmp_path):
    ipc = f"ipc://{tmp_path}/late.sock"
    writer = ZmqPubSub(relay=ipc).get_publisher()
    await writer.initialize()
    sends = [writer.send_event(row(f"k{i}", "t")) for i in range(100)]
    assert writer.queued == 100 and not any(d.called for d in sends)
    out = await publisher()
    relay = ZmqRelay(ipc, out)
    sub, got = await subscriber(out.uri, topics=["t"])
    try:
        await joined(out, got, "t")
        relay.start()
        await defer.gatherResults(sends)  # acknowledged once ZeroMQ took them
        assert writer.queued == 0
        await poll(lambda: len(got.keys("t")) == 100, 10, "all 100 relayed")
        assert got.keys("t") == [f"k{i}" for i in range(100)]
    finally:
        await sub.close()
        await writer.close()
        await relay.close()
        await out.close()


@pytest_twisted.ensureDeferred
async def test_full_send_queue_errbacks_at_once_and_close_fails_the_rest(tmp_path):
    writer = ZmqPubSub(relay=f"ipc://{tmp_path}/nobody.sock", send_queue=5,
                       linger=0.05).get_publisher()
    await writer.initialize()
    queued = [writer.send_event(row(f"k{i}")) for i in range(5)]
    with pytest.raises(PublishError) as info:
        await writer.send_event(row("one-too-many"))
    assert "send queue full (5 messages waiting)" in str(info.value)
    assert info.value.topic == "D"
    await writer.close()
    results = await defer.DeferredList(queued, consumeErrors=True)
    assert all(not ok and r.check(PublishError) for ok, r in results)
    assert "closed with the message unsent" in str(results[0][1].value)
    with pytest.raises(PublishError):
        await writer.send_event(row("after-close"))


@pytest_twisted.ensureDeferred
async def test_close_waits_for_queued_messages_within_linger(tmp_path):
    ipc = f"ipc://{tmp_path}/linger.sock"
    writer = ZmqPubSub(relay=ipc, linger=10).get_publisher()
    await writer.initialize()
    sends = [writer.send_event(row(f"k{i}")) for i in range(50)]
    closing = writer.close()
    assert not closing.called
    out = await publisher()
    relay = ZmqRelay(ipc, out)
    relay.start()
    try:
        await closing
        await defer.gatherResults(sends)  # every one acknowledged, none failed
        await poll(lambda: relay.counters["relayed"] == 50, 10, "all 50 relayed after close")
    finally:
        await relay.close()
        await out.close()


@pytest_twisted.ensureDeferred
async def test_garbage_on_sub_and_pull_is_counted_and_dropped(tmp_path):
    ipc, out, relay, writer = await relay_chain(tmp_path)
    sub, got = await subscriber(out.uri)
    raw_pub = ZmqSocket(zmq.PUB, "raw PUB")
    uri = raw_pub.bind(ANY_PORT)
    await sub.register_listen_address(uri)
    raw_push = ZmqSocket(zmq.PUSH, "raw PUSH")
    raw_push.connect(ipc)
    garbage = [[b"D"], [b"D", b"x", b"y"], [b"D\xff\xfe", encode(row("x"))],
               [b"D", b"\xc1not msgpack"], [b"D", msgpack.packb([1, 2])]]
    try:
        await joined(writer, got, key="via-relay")

        async def raw_joined():
            await raw_pub.send_frames([b"D", encode(row("raw"))])
            return "raw" in got.keys()
        await poll(raw_joined, 10, "raw PUB joined")
        base = sub.counters["undecodable"]
        for frames in garbage:
            await raw_pub.send_frames(frames)
            await raw_push.send_frames(frames)
        await raw_pub.send_frames([b"D", encode(row("after-raw"))])
        await raw_push.send_frames([b"D", encode(row("after-push"))])
        await poll(lambda: {"after-raw", "after-push"} <= set(got.keys()), 10, "good after bad")
        assert sub.counters["undecodable"] - base == len(garbage)
        assert relay.counters["malformed"] == len(garbage)
        assert all(decode(encode(u)) == u for u in got.updates)
    finally:
        await raw_pub.close(0)
        await raw_push.close(0)
        await sub.close()
        await writer.close()
        await relay.close()
        await out.close()


@pytest_twisted.ensureDeferred
async def test_relay_bind_failure_is_publish_error(tmp_path):
    out = await publisher()
    try:
        with pytest.raises(PublishError) as info:
            ZmqRelay(f"ipc://{tmp_path}/no/such/dir/x.sock", out).start()
        assert "no/such/dir" in str(info.value)
    finally:
        await out.close()


@pytest_twisted.ensureDeferred
async def test_publisher_restarted_at_the_same_address_gives_dbrestart():
    from dftx.harness import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    pub = await publisher(address)
    sub, got = await subscriber(address)
    try:
        await joined(pub, got)
        assert not [u for u in got.updates if u.action == "dbrestart"]
        assert sub.counters["joins"] >= 1  # the first connection: a sync
        await pub.close()
        again = []

        async def rebind():  # ZeroMQ releases the port in its own thread
            try:
                again.append(await publisher(address))
            except PublishError:
                return False
            return True
        await poll(rebind, 10, "bind again")
        pub = again[0]
        await poll(lambda: [u for u in got.updates if u.action == "dbrestart"], 10,
                   "dbrestart after the publisher came back")
        assert sub.counters["restarts"] == 1
        await joined(pub, got, key="after")
        # Closing the subscriber's own connection is not a restart.
        await sub.unregister_listen_address(address)
        await sub.register_listen_address(address)
        await joined(pub, got, key="again")
        assert sub.counters["restarts"] == 1
    finally:
        await sub.close()
        await pub.close()


@pytest_twisted.ensureDeferred
async def test_an_oversized_frame_is_refused_and_the_subscriber_resyncs():
    raw_pub = ZmqSocket(zmq.PUB, "raw PUB")
    uri = raw_pub.bind(ANY_PORT)
    sub = ZmqPubSub().get_subscriber()
    sub.max_message_size = 10_000  # before initialize: it sets ZMQ_MAXMSGSIZE
    got = Received()
    await sub.register_listen_address(uri)
    await sub.initialize(got)
    seq = iter(range(1, 1000))

    async def sent(key, value="{}"):
        frames = [b"D", encode(row(key, value=value), publisher="raw", seq=next(seq))]
        await raw_pub.send_frames(frames)
        return key in got.keys()
    try:
        await poll(lambda: sent("before"), 10, "joined")
        await sent("big", value="x" * 20_000)
        await poll(lambda: sent("after"), 10, "delivered after the oversized frame")
        assert "big" not in got.keys()
        assert sub.counters["restarts"] == 1  # the connection ZeroMQ dropped came back
        assert "dbrestart" in [u.action for u in got.updates if u.is_control]
    finally:
        await raw_pub.close(0)
        await sub.close()


@pytest.fixture
def clock():
    """A MemoryReactorClock for sockets; its ZeroMQ context is terminated
    at the end."""
    clock = MemoryReactorClock()
    yield clock
    context(clock).shutdown()


def pump(clock, until, timeout=10.0):
    """Do what a reactor would for the sockets on C{clock} (read each, run
    due calls) until C{until()}; ZeroMQ's own thread runs meanwhile."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        for reader in list(clock.getReaders()):
            reader.doRead()
        clock.advance(0)
        time.sleep(0.001)


def test_sockets_are_read_and_closed_by_the_injected_reactor(clock):
    push = ZmqSocket(zmq.PUSH, "push to nobody", reactor=clock)
    assert push in clock.getReaders()
    assert [t[:2] for t in clock.triggers.get("during", {}).get("shutdown", [])] == [
        (context(clock).shutdown, ())]
    push.socket.set(zmq.IMMEDIATE, 1)
    push.connect("tcp://127.0.0.1:1")  # nobody there: the message waits
    failures = []
    push.send_frames([b"t", b"m"]).addErrback(failures.append)
    assert push.queued == 1
    closed = push.close(linger=5)
    clock.advance(4.9)
    assert not closed.called and not failures
    clock.advance(0.1)
    assert closed.called and push.socket is None and push not in clock.getReaders()
    assert failures and failures[0].check(PublishError)


def test_the_subscriber_checks_a_lost_publisher_on_the_injected_clock(clock):
    pubsub = ZmqPubSub(bind=ANY_PORT, reactor=clock)
    pub, sub, got = pubsub.get_publisher(), pubsub.get_subscriber(), []
    pub.initialize()
    sub.initialize(got.append)
    sub.register_listen_address(pub.uri)
    try:
        pump(clock, lambda: [u for u in got if u.action == SYNC])  # joined
        uri = pub.uri
        pub.close()
        pump(clock, lambda: uri in sub._lost)
        def checks():
            return [(c.getTime(), c.args) for c in clock.getDelayedCalls()
                    if c.func == sub._reconnect_if_lost]

        assert checks() == [(clock.seconds() + RECONNECT_CHECK, (uri,))]
        clock.advance(RECONNECT_CHECK)
        assert checks() == []
    finally:
        sub.close()
        pub.close()
