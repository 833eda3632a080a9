"""NbApi: write the NB DB, then publish; undo the write when publishing fails."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from dftx.db.memory import MemoryDbDriver
from dftx.db.redis import RedisDbDriver
from dftx.errors import DBKeyNotFound, PublishError
from dftx.nb import NbApi
from dftx.pubsub.zmq import ZmqPubSub
from dftx.harness import poll
from dftx.update import DbUpdate

from .helpers import Received, joined


@pytest.fixture(params=["memory", "redis"])
def make_db(request):
    """A function making the driver; only the redis case needs the cluster."""
    if request.param == "memory":
        return MemoryDbDriver
    seeds = request.getfixturevalue("redis_cluster").seeds
    return lambda: RedisDbDriver(hosts=seeds, retries=3)


@pytest_twisted.async_yield_fixture
async def db(make_db):
    driver = make_db()
    await driver.initialize()
    yield driver
    await driver.close()


@pytest_twisted.async_yield_fixture
async def wire():
    """A real PUB publisher and a subscriber of "D" and "t1", joined."""
    pubsub = ZmqPubSub(bind="tcp://127.0.0.1:*")
    pub = pubsub.get_publisher()
    await pub.initialize()
    sub = pubsub.get_subscriber()
    got = Received()
    await sub.register_listen_address(pub.uri)
    await sub.register_topic("t1")
    await sub.initialize(got)
    await joined(pub, got, "D")
    await joined(pub, got, "t1")
    yield pub, got
    await sub.close()
    await pub.close()


async def closed_publisher():
    pub = ZmqPubSub(bind="tcp://127.0.0.1:*").get_publisher()
    await pub.initialize()
    await pub.close()
    return pub


async def wait_for(got, key, count=1):
    await poll(lambda: got.keys().count(key) >= count, 10, f"update of {key}")


@pytest_twisted.ensureDeferred
async def test_writes_go_to_the_db_then_to_the_rows_topic(db, wire, unique):
    pub, got = wire
    nb = NbApi(db, pub)
    await nb.create(unique, "k1", '{"v": 1}', topic="t1")
    await nb.create(unique, "k2", '{"v": 2}')
    await nb.update(unique, "k1", '{"v": 3}', topic="t1")
    await nb.delete(unique, "k2")
    await wait_for(got, "k2", 2)
    await wait_for(got, "k1", 2)
    mine = [u for u in got.updates if u.table == unique]
    assert [(u.action, u.key, u.topic, u.value) for u in mine] == [
        ("create", "k1", "t1", '{"v": 1}'),
        ("create", "k2", "D", '{"v": 2}'),
        ("set", "k1", "t1", '{"v": 3}'),
        ("delete", "k2", "D", None),
    ]
    assert all(u.publisher == pub.id for u in mine)
    assert await nb.get(unique, "k1") == '{"v": 3}'
    assert await nb.get_all(unique) == ['{"v": 3}']
    assert await nb.get_all_keys(unique, topic="t1") == ["k1"]
    with pytest.raises(DBKeyNotFound):
        await nb.get(unique, "k2")


@pytest_twisted.ensureDeferred
async def test_missing_rows_fail_before_anything_is_published(db, wire, unique):
    pub, got = wire
    nb = NbApi(db, pub)
    with pytest.raises(DBKeyNotFound):
        await nb.update(unique, "nope", "{}")
    with pytest.raises(DBKeyNotFound):
        await nb.delete(unique, "nope", topic="t1")
    await nb.create(unique, "marker", "{}")
    await wait_for(got, "marker")
    assert [u.key for u in got.updates if u.table == unique] == ["marker"]


@pytest_twisted.ensureDeferred
async def test_failed_publish_undoes_each_kind_of_write(db, unique):
    nb = NbApi(db, await closed_publisher())
    with pytest.raises(PublishError) as info:
        await nb.create(unique, "new", "{}", topic="t1")
    assert info.value.topic == "t1"
    assert await db.get_all_keys(unique) == []

    await db.create_key(unique, "k", "old", "t1")
    with pytest.raises(PublishError):
        await nb.update(unique, "k", "new", topic="t1")
    assert await db.get_key(unique, "k", "t1") == "old"

    with pytest.raises(PublishError) as info:
        await nb.delete(unique, "k", topic="t1")
    assert info.value.topic == "t1"
    assert await db.get_key(unique, "k", "t1") == "old"


@pytest_twisted.ensureDeferred
async def test_db_restart_runs_the_hook_then_tells_subscribers(db, wire, unique):
    pub, got = wire
    calls = []
    release = defer.Deferred()

    async def rewrite():
        calls.append("hook")
        await release
        await db.create_key(unique, "authoritative", "{}")

    nb = NbApi(db, pub, on_db_restart=rewrite)
    first, second = nb.db_restart(), nb.db_restart()
    assert calls == ["hook"] and not first.called
    release.callback(None)
    await first
    await second
    assert calls == ["hook"]  # the second call joined the first
    restarts = lambda: [u for u in got.updates if u.action == "dbrestart"]  # noqa: E731
    await poll(restarts, 10, "dbrestart event")
    assert [(u.table, u.topic) for u in restarts()] == [(None, "D")]
    assert await db.get_key(unique, "authoritative") == "{}"

    await nb.db_restart()  # a later call runs the hook again
    assert calls == ["hook", "hook"]


@pytest_twisted.ensureDeferred
async def test_db_restart_hook_failure_reaches_the_caller_and_publishes_nothing(wire):
    pub, got = wire

    def broken():
        raise RuntimeError("cannot rewrite")

    nb = NbApi(MemoryDbDriver(), pub, on_db_restart=broken)
    with pytest.raises(RuntimeError, match="cannot rewrite"):
        await nb.db_restart()
    await pub.send_event(DbUpdate("x", "marker", "create", "{}"))
    await wait_for(got, "marker")
    assert not any(u.action == "dbrestart" for u in got.updates)
