"""Publisher registration, stale cleanup and discovery (table "publisher")."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, task

from dftx.update import LOCAL_CONTROLLER, NEUTRON_SERVER
from dftx.db.memory import MemoryDbDriver
from dftx.db.redis import RedisDbDriver
from dftx.errors import DBConnectionError, ProtocolError
from dftx.registry import (
    PUBLISHER_TABLE, Discovery, PublisherRow, Registration, other_role, read_rows,
    remove_stale,
)
from dftx.pubsub.zmq import ZmqPubSub
from dftx.harness import poll
from dftx.update import DbUpdate

from .helpers import Received

T = PUBLISHER_TABLE


async def put(db, id, uri, role, ts):
    await db.create_key(T, id, PublisherRow(id, uri, role, ts).to_json())


async def rows(db):
    return {r.id: r for r in await read_rows(db)}


def test_row_json_and_roles():
    row = PublisherRow("p1", "tcp://10.0.0.1:8866", NEUTRON_SERVER, 12.5)
    assert json.loads(row.to_json()) == {
        "id": "p1", "uri": "tcp://10.0.0.1:8866", "role": "neutron_server",
        "last_activity_timestamp": 12.5}
    assert PublisherRow.from_json(row.to_json()) == row
    for bad in ("nope", "[]", '{"id": "x"}', '{"id":1,"uri":2,"role":3,'
                '"last_activity_timestamp":"soon"}'):
        with pytest.raises(ProtocolError):
            PublisherRow.from_json(bad)
    assert other_role(NEUTRON_SERVER) == LOCAL_CONTROLLER
    assert other_role(LOCAL_CONTROLLER) == NEUTRON_SERVER
    with pytest.raises(ValueError):
        other_role("compute")


@pytest_twisted.ensureDeferred
async def test_registration_writes_refreshes_every_third_and_deletes_on_stop():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    reg = Registration(db, "me", "tcp://127.0.0.1:8866", NEUTRON_SERVER, timeout=30,
                       clock=clock)
    reg.startService()
    await reg.started
    assert (await rows(db))["me"] == PublisherRow(
        "me", "tcp://127.0.0.1:8866", NEUTRON_SERVER, 1000)
    clock.advance(9.9)
    assert (await rows(db))["me"].last_activity_timestamp == 1000
    clock.advance(0.1)
    assert (await rows(db))["me"].last_activity_timestamp == 1010
    clock.pump([10, 10])
    assert (await rows(db))["me"].last_activity_timestamp == 1030 and reg.refreshes == 3
    await reg.stopService()
    assert await rows(db) == {}
    clock.advance(100)  # no refresh after stop
    assert await rows(db) == {}


@pytest_twisted.ensureDeferred
async def test_remove_stale_deletes_only_rows_older_than_timeout():
    db = MemoryDbDriver()
    await put(db, "old", "tcp://a:1", NEUTRON_SERVER, 100)
    await put(db, "edge", "tcp://b:1", LOCAL_CONTROLLER, 170)
    await put(db, "new", "tcp://c:1", LOCAL_CONTROLLER, 199)
    await db.create_key(T, "garbage", "not json")
    assert sorted(await remove_stale(db, timeout=30, now=200)) == ["old"]
    assert sorted(await db.get_all_keys(T)) == ["edge", "garbage", "new"]
    assert await remove_stale(db, timeout=30, now=200) == []


@pytest_twisted.ensureDeferred
async def test_service_registration_cleans_stale_rows_at_start_and_each_refresh():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    await put(db, "killed", "tcp://a:1", NEUTRON_SERVER, 900)
    await put(db, "alive", "tcp://b:1", LOCAL_CONTROLLER, 995)
    reg = Registration(db, "me", "tcp://c:1", NEUTRON_SERVER, timeout=30,
                       clean_stale=True, clock=clock)
    reg.startService()
    await reg.started
    assert sorted(await db.get_all_keys(T)) == ["alive", "me"]
    clock.advance(30)  # "alive" was not refreshed: 35 s old now
    assert sorted(await db.get_all_keys(T)) == ["me"]
    assert reg.removed == ["killed", "alive"]
    await reg.stopService()


@pytest_twisted.ensureDeferred
async def test_discovery_follows_the_other_role_only():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    await put(db, "n2", "tcp://127.0.0.1:7002", NEUTRON_SERVER, 1000)
    await put(db, "c1", "tcp://127.0.0.1:7101", LOCAL_CONTROLLER, 1000)
    sub = ZmqPubSub().get_subscriber()
    await sub.register_listen_address("tcp://127.0.0.1:7999")  # the app's own
    await sub.initialize(Received())
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    try:
        disc.startService()
        await disc.ready
        assert disc.connected == {"tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"}
        assert sub.addresses == disc.connected | {"tcp://127.0.0.1:7999"}

        # n1 keeps refreshing, n2 stops; a new n3 appears; n1 is re-registered
        # on the uri n2 had, which must stay connected.
        await put(db, "n3", "tcp://127.0.0.1:7003", NEUTRON_SERVER, 1005)
        clock.advance(5)
        assert disc.connected == {"tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002",
                                  "tcp://127.0.0.1:7003"}
        for t in (1010, 1020, 1030):
            await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, t)
            await put(db, "n3", "tcp://127.0.0.1:7003", NEUTRON_SERVER, t)
            clock.advance(10)
        assert disc.connected == {"tcp://127.0.0.1:7001", "tcp://127.0.0.1:7003"}

        # A row that leaves the table unannounced (the database lost it) is
        # followed until it is stale: n3 refreshed last at 1030.
        await db.delete_key(T, "n3")
        clock.advance(5)
        assert disc.connected == {"tcp://127.0.0.1:7001", "tcp://127.0.0.1:7003"}
        await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1050)
        clock.advance(25)  # 1065: n3 refreshed 35 s ago (timeout 30)
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        assert sub.addresses == {"tcp://127.0.0.1:7001", "tcp://127.0.0.1:7999"}
    finally:
        await disc.stopService()
    assert sub.addresses == {"tcp://127.0.0.1:7999"}  # only its own were dropped
    await sub.close()


@pytest_twisted.ensureDeferred
async def test_discovery_observe_acts_at_once():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    sub = ZmqPubSub().get_subscriber()
    await sub.initialize(Received())
    disc = Discovery(db, sub, NEUTRON_SERVER, timeout=30, interval=1000, clock=clock)
    disc.startService()
    await disc.ready
    row = PublisherRow("c9", "tcp://127.0.0.1:7109", LOCAL_CONTROLLER, 1000)
    await disc.observe(DbUpdate(T, "c9", "create", row.to_json()))
    other = PublisherRow("n9", "tcp://127.0.0.1:7009", NEUTRON_SERVER, 1000)
    await disc.observe(DbUpdate(T, "n9", "create", other.to_json()))
    await disc.observe(DbUpdate(T, "bad", "create", "garbage"))
    await disc.observe(DbUpdate("lport", "x", "create", row.to_json()))
    assert disc.connected == {"tcp://127.0.0.1:7109"}
    await disc.observe(DbUpdate(T, "c9", "delete", None))
    assert disc.connected == set()
    # A resync re-reads the table.
    await db.create_key(T, "c9", row.to_json())
    await disc.observe(DbUpdate.control("sync", "D"))
    assert disc.connected == {"tcp://127.0.0.1:7109"}
    await disc.stopService()
    await sub.close()


class Outage(MemoryDbDriver):
    """A memory NB DB that can be made unreachable, and lose everything."""

    down = False

    def get_all_entries(self, table, topic=None):
        if self.down:
            return defer.fail(DBConnectionError("127.0.0.1:7000", "connection refused"))
        return super().get_all_entries(table, topic)


@pytest_twisted.ensureDeferred
async def test_discovery_judges_no_row_stale_on_time_the_table_was_unreadable():
    db, clock = Outage(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    sub = ZmqPubSub().get_subscriber()
    await sub.initialize(Received())
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    try:
        disc.startService()
        await disc.ready
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        # The database is down for a minute, then back, empty: the row was
        # refreshed last at 1000, twice the timeout ago.
        db.down = True
        clock.pump([5] * 12)
        await db.delete_table(T)
        db.down = False
        clock.advance(5)  # 1065: readable again
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        clock.advance(10)  # within timeout/3 + interval of 1065
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1075)  # refreshed
        clock.pump([5] * 4)
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        # A publisher that really is gone goes once the grace is over.
        await db.delete_table(T)
        clock.pump([5] * 7)  # 1110: 35 s since its last refresh
        assert disc.connected == set()
    finally:
        await disc.stopService()
        await sub.close()


@pytest_twisted.ensureDeferred
async def test_registered_publisher_is_found_and_dropped_at_once_on_clean_stop(
        redis_cluster, unique):
    """Real cluster, real sockets: a controller-side subscriber finds a
    neutron-side publisher through the table and drops it when it stops."""
    db = RedisDbDriver(hosts=redis_cluster.seeds, retries=3)
    await db.initialize()
    pub = ZmqPubSub(bind="tcp://127.0.0.1:*").get_publisher()
    await pub.initialize()
    reg = Registration(db, pub.id, pub.uri, NEUTRON_SERVER, timeout=30, publisher=pub)
    sub = ZmqPubSub().get_subscriber()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=1000)
    got = Received()

    def callback(update):
        got(update)
        disc.observe(update)

    try:
        reg.startService()
        await reg.started
        await sub.initialize(callback)
        disc.startService()
        await disc.ready
        assert pub.uri in disc.connected

        async def probe():
            await pub.send_event(DbUpdate(unique, "hello", "create", "{}"))
            return "hello" in got.keys()
        await poll(probe, 10, "update from the discovered publisher")

        await reg.stopService()  # deletes the row and announces it
        await poll(lambda: pub.uri not in sub.addresses, 10, "disconnect on announce")
        assert pub.id not in await db.get_all_keys(T)
        announced = [u for u in got.updates if u.table == T]
        assert [(u.action, u.key) for u in announced][-1] == ("delete", pub.id)
    finally:
        await disc.stopService()
        await sub.close()
        await pub.close()
        await db.close()


class Addresses:
    """A subscriber that only records the addresses it is told."""

    def __init__(self):
        self.addresses = set()

    def register_listen_address(self, uri, server_key=None):
        self.addresses.add(uri)
        return defer.succeed(None)

    def unregister_listen_address(self, uri):
        self.addresses.discard(uri)
        return defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_discovery_connects_nothing_once_stopped():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    sub = Addresses()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    disc.startService()
    await disc.ready
    assert sub.addresses == {"tcp://127.0.0.1:7001"}
    await disc.stopService()
    assert sub.addresses == set()
    # A control event, or a row announced, after the stop: nothing is read
    # and nobody is connected again.
    await disc.observe(DbUpdate.control("dbrestart"))
    await disc.observe(DbUpdate.control("sync", "D"))
    row = PublisherRow("n2", "tcp://127.0.0.1:7002", NEUTRON_SERVER, 1000)
    await disc.observe(DbUpdate(T, "n2", "create", row.to_json()))
    await disc.refresh()
    clock.advance(5)
    assert sub.addresses == set() and disc.connected == set()


@pytest_twisted.ensureDeferred
async def test_discovery_stopped_during_a_read_ignores_what_it_read():
    pending = []

    class Slow(MemoryDbDriver):
        def get_all_entries(self, table, topic=None):
            d = defer.Deferred()
            pending.append((d, super().get_all_entries(table, topic)))
            return d

    db, clock = Slow(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    sub = Addresses()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    disc.startService()
    [(read, rows)] = pending
    stopped = disc.stopService()
    read.callback(await rows)
    await stopped
    await disc.ready
    assert sub.addresses == set() and disc.connected == set()
