"""
Publisher registration, stale cleanup and discovery (tables "publisher" and
"dftx_publisher"), and the rows Dragonflow shares (its code at commit
4dc36ed6): its rows are found and connected to, dftx's pass its model.
"""

from __future__ import annotations

import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from dftx.db.memory import MemoryDbDriver
from dftx.db.redis import RedisDbDriver, row_key
from dftx.errors import DBConnectionError, ProtocolError
from dftx.harness import poll
from dftx.pubsub.zmq import ZmqPubSub
from dftx.registry import (
    DFTX_PUBLISHER_TABLE, PUBLISHER_TABLE, Discovery, PublisherRow, Registration, other_role,
    read_rows, remove_stale,
)
from dftx.update import LOCAL_CONTROLLER, NEUTRON_SERVER, DbUpdate

from .helpers import Received

T, D = PUBLISHER_TABLE, DFTX_PUBLISHER_TABLE
KEY = "rq8/ZXSR6$B2uc^Lq=4%:H-vo5fDbZ8yEHwUR7Zo"  # a z85 CURVE public key


# --- Dragonflow, as its code at commit 4dc36ed6 does it --------------------------

def dragonflow_row(id: str, uri: str, ts: float) -> str:
    """
    The value df-publisher-service writes at key {publisher.}id
    (dragonflow/controller/df_publisher_service.py, _register_as_publisher
    and _update_timestamp_in_db: core.Publisher(id, uri,
    last_activity_timestamp=time.time()), no topic, through NbApi.create and
    update): model_framework's to_json is jsonutils.dumps(to_struct()), and
    jsonmodels 2.1.5 lists fields by dir(), sorted by name; json.dumps's
    default separators.  Checked against the real code:
    '{"id": "a1b2", "last_activity_timestamp": 1700000000.25, "uri": "tcp://10.0.0.1:8866"}'.
    """
    return f'{{"id": "{id}", "last_activity_timestamp": {ts!r}, "uri": "{uri}"}}'


def dragonflow_id() -> str:
    """pub_sub_api.generate_publisher_uuid(): uuid5 of "process.fqdn"."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"df-publisher-service.{uuid.uuid4().hex}.test"))


# dragonflow/db/models/core.py: Publisher(ModelBase, mixins.Name) has id
# (ModelBase, StringField, required), name (mixins.Name, StringField), uri
# (StringField) and last_activity_timestamp (FloatField: float or int).
DRAGONFLOW_PUBLISHER_FIELDS = {"id": str, "name": str, "uri": str,
                               "last_activity_timestamp": (float, int)}


def dragonflow_parse(text: str, now: float, timeout: float = 300) -> dict | None:
    """
    What NbApi.get_all(core.Publisher) does with one row: Publisher.from_json
    (model_framework._CommonBase.__init__ raises TypeError "{field} is not a
    field of {model}" for any other field; jsonmodels refuses a value of the
    wrong type), then Publisher.on_get_all_post drops a stale row (None).
    """
    data = json.loads(text)
    for field, value in data.items():
        if field not in DRAGONFLOW_PUBLISHER_FIELDS:
            raise TypeError(f"{field} is not a field of Publisher")
        if value is not None and not isinstance(value, DRAGONFLOW_PUBLISHER_FIELDS[field]):
            raise ValueError(f"Value is wrong, expected type for {field}: {value!r}")
    stale = now - data["last_activity_timestamp"] > timeout
    return None if stale else data


# --- helpers ---------------------------------------------------------------------

async def put(db, id, uri, role, ts, key=None):
    """Write a publisher's rows as a L{Registration} does."""
    row = PublisherRow(id, uri, role, ts, key)
    await db.create_key(D, id, row.to_json(), topic=role)
    if role == NEUTRON_SERVER:
        await db.create_key(T, id, row.dragonflow_json())


async def drop(db, id, role):
    """Lose a publisher's rows without an announcement."""
    await db.delete_key(D, id, topic=role)
    if role == NEUTRON_SERVER:
        await db.delete_key(T, id)


async def rows(db, role):
    return {r.id: r for r in await read_rows(db, role)}


class Addresses:
    """A subscriber that only records the addresses (and keys) it is told."""

    def __init__(self):
        self.addresses = set()
        self.keys = {}

    def register_listen_address(self, uri, server_key=None):
        self.addresses.add(uri)
        self.keys[uri] = server_key
        return defer.succeed(None)

    def unregister_listen_address(self, uri):
        self.addresses.discard(uri)
        return defer.succeed(None)


# --- rows --------------------------------------------------------------------------

def test_row_formats_and_roles():
    row = PublisherRow("p1", "tcp://10.0.0.1:8866", NEUTRON_SERVER, 12.5)
    assert row.dragonflow_json() == dragonflow_row("p1", "tcp://10.0.0.1:8866", 12.5)
    assert row.to_json() == row.dragonflow_json()
    keyed = PublisherRow("p1", "tcp://10.0.0.1:8866", NEUTRON_SERVER, 12, KEY)
    assert keyed.dragonflow_json() == dragonflow_row("p1", "tcp://10.0.0.1:8866", 12.0)
    assert keyed.to_json() == (
        f'{{"curve_public_key": "{KEY}", "id": "p1", "last_activity_timestamp": 12.0, '
        '"uri": "tcp://10.0.0.1:8866"}')
    assert PublisherRow.from_json(keyed.to_json(), NEUTRON_SERVER) == keyed
    assert PublisherRow.from_json(row.to_json(), LOCAL_CONTROLLER).role == LOCAL_CONTROLLER
    # Dragonflow's optional name is no obstacle.
    named = json.dumps({"id": "d", "name": "pub", "uri": "tcp://a:1",
                        "last_activity_timestamp": 5})
    assert PublisherRow.from_json(named, NEUTRON_SERVER) == PublisherRow(
        "d", "tcp://a:1", NEUTRON_SERVER, 5)
    for bad in ("nope", "[]", '{"id": "x"}', '{"id":1,"uri":"u","last_activity_timestamp":1}',
                '{"id":"x","uri":"u","last_activity_timestamp":"soon"}',
                '{"id":"x","uri":"u","last_activity_timestamp":1,"curve_public_key":7}'):
        with pytest.raises(ProtocolError):
            PublisherRow.from_json(bad, NEUTRON_SERVER)
    assert other_role(NEUTRON_SERVER) == LOCAL_CONTROLLER
    assert other_role(LOCAL_CONTROLLER) == NEUTRON_SERVER
    with pytest.raises(ValueError):
        other_role("compute")


def test_the_dragonflow_model_check_refuses_what_dftx_wrote_before():
    """The check the tests rely on fails as Dragonflow did on dftx's old rows."""
    old = '{"id": "p", "last_activity_timestamp": 1.0, "role": "neutron_server", "uri": "u"}'
    with pytest.raises(TypeError, match="role is not a field of Publisher"):
        dragonflow_parse(old, now=1)
    keyed = PublisherRow("p", "u", NEUTRON_SERVER, 1, KEY)
    with pytest.raises(TypeError, match="curve_public_key is not a field of Publisher"):
        dragonflow_parse(keyed.to_json(), now=1)
    assert dragonflow_parse(keyed.dragonflow_json(), now=1) == {
        "id": "p", "uri": "u", "last_activity_timestamp": 1.0}
    with pytest.raises(ValueError):
        dragonflow_parse('{"id": "p", "uri": "u", "last_activity_timestamp": "1"}', now=1)
    assert dragonflow_parse(keyed.dragonflow_json(), now=302) is None  # stale


@pytest_twisted.ensureDeferred
async def test_registration_writes_refreshes_every_third_and_deletes_on_stop():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    reg = Registration(db, "me", "tcp://127.0.0.1:8866", NEUTRON_SERVER, timeout=30,
                       clock=clock, curve_public_key=KEY)
    ctl = Registration(db, "c1", "tcp://127.0.0.1:8867", LOCAL_CONTROLLER, timeout=30,
                       clock=clock, curve_public_key=KEY)
    for r in (reg, ctl):
        r.startService()
        await r.started
    assert (await rows(db, NEUTRON_SERVER))["me"] == PublisherRow(
        "me", "tcp://127.0.0.1:8866", NEUTRON_SERVER, 1000, KEY)
    assert await db.get_all_rows(T) == [
        (None, "me", dragonflow_row("me", "tcp://127.0.0.1:8866", 1000.0))]
    # A controller's row is dftx's only: Dragonflow's table does not have it.
    assert sorted(await db.get_all_rows(D)) == [
        (LOCAL_CONTROLLER, "c1", PublisherRow(
            "c1", "tcp://127.0.0.1:8867", LOCAL_CONTROLLER, 1000, KEY).to_json()),
        (NEUTRON_SERVER, "me", PublisherRow(
            "me", "tcp://127.0.0.1:8866", NEUTRON_SERVER, 1000, KEY).to_json())]
    assert list(await rows(db, LOCAL_CONTROLLER)) == ["c1"]
    clock.advance(9.9)
    assert (await rows(db, NEUTRON_SERVER))["me"].last_activity_timestamp == 1000
    clock.advance(0.1)
    assert (await rows(db, NEUTRON_SERVER))["me"].last_activity_timestamp == 1010
    assert json.loads(await db.get_key(T, "me"))["last_activity_timestamp"] == 1010
    clock.pump([10, 10])
    assert (await rows(db, NEUTRON_SERVER))["me"].last_activity_timestamp == 1030
    assert reg.refreshes == 3
    for r in (reg, ctl):
        await r.stopService()
    assert await db.get_all_rows(T) == [] and await db.get_all_rows(D) == []
    clock.advance(100)  # no refresh after stop
    assert await db.get_all_rows(T) == [] and await db.get_all_rows(D) == []


@pytest_twisted.ensureDeferred
async def test_remove_stale_deletes_only_rows_older_than_timeout_in_both_tables():
    db = MemoryDbDriver()
    await put(db, "old", "tcp://a:1", NEUTRON_SERVER, 100, KEY)
    await put(db, "edge", "tcp://b:1", LOCAL_CONTROLLER, 170)
    await put(db, "gone", "tcp://c:1", LOCAL_CONTROLLER, 120)
    await put(db, "new", "tcp://d:1", NEUTRON_SERVER, 199)
    await db.create_key(T, "df-old", dragonflow_row("df-old", "tcp://e:1", 150.5))
    await db.create_key(T, "df-new", dragonflow_row("df-new", "tcp://f:1", 190.5))
    await db.create_key(T, "garbage", "not json")
    assert sorted(await remove_stale(db, timeout=30, now=200)) == ["df-old", "gone", "old"]
    assert sorted(await db.get_all_keys(T)) == ["df-new", "garbage", "new"]
    assert sorted(await db.get_all_keys(D)) == ["edge", "new"]
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
    assert sorted(await db.get_all_keys(D)) == ["alive", "me"]
    assert await db.get_all_keys(T) == ["me"]
    clock.advance(30)  # "alive" was not refreshed: 35 s old now
    assert sorted(await db.get_all_keys(D)) == ["me"]
    assert reg.removed == ["killed", "alive"]
    await reg.stopService()


@pytest_twisted.ensureDeferred
async def test_registration_says_why_its_refresh_fails_until_one_succeeds():
    db, clock = MemoryDbDriver(), task.Clock()
    reg = Registration(db, "c1", "tcp://c:1", LOCAL_CONTROLLER, timeout=30, clock=clock)
    reg.startService()
    await reg.started
    assert reg.failing is None
    create = db.create_key

    def unreachable(*args, **kwargs):
        return defer.fail(DBConnectionError("10.0.0.1:6379", "connection refused"))

    db.create_key = unreachable
    clock.advance(10)  # a refresh (every timeout / 3)
    assert "refreshing publisher row c1 failed" in reg.failing
    assert "10.0.0.1:6379" in reg.failing
    db.create_key = create
    clock.advance(10)
    assert reg.failing is None
    await reg.stopService()


# --- discovery -----------------------------------------------------------------------

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
        await drop(db, "n3", NEUTRON_SERVER)
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
async def test_discovery_keeps_a_stale_publisher_while_its_connection_is_up():
    """A publisher cut off from the NB DB cannot refresh its row but still
    relays: its subscribers keep it while their connection to it is up."""
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    sub = Addresses()
    up = {"tcp://127.0.0.1:7001"}
    sub.is_connected = lambda uri: uri in up
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    disc.startService()
    await disc.ready
    clock.advance(60)  # its row is 60 s old: stale
    assert disc.connected == {"tcp://127.0.0.1:7001"}
    up.clear()  # the connection is lost (a heartbeat timeout, the process gone)
    clock.advance(5)
    assert disc.connected == set() and sub.addresses == set()
    await disc.stopService()


@pytest_twisted.ensureDeferred
async def test_discovery_of_the_publisher_service_reads_the_controllers_rows_only():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    await db.create_key(T, "df", dragonflow_row("df", "tcp://127.0.0.1:7002", 1000.0))
    await put(db, "c1", "tcp://127.0.0.1:7101", LOCAL_CONTROLLER, 1000, KEY)
    sub = Addresses()
    disc = Discovery(db, sub, NEUTRON_SERVER, timeout=30, clock=clock)
    disc.startService()
    await disc.ready
    assert sub.keys == {"tcp://127.0.0.1:7101": KEY}
    await disc.stopService()


@pytest_twisted.ensureDeferred
async def test_discovery_takes_the_key_of_the_dftx_row_over_the_dragonflow_row():
    db, clock = MemoryDbDriver(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000, KEY)
    await db.create_key(T, "df", dragonflow_row("df", "tcp://127.0.0.1:7002", 1000.0))
    sub = Addresses()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    disc.startService()
    await disc.ready
    assert sub.keys == {"tcp://127.0.0.1:7001": KEY, "tcp://127.0.0.1:7002": None}
    # A publisher back at the same uri with another key is reconnected with it.
    await put(db, "n2", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1001, KEY[::-1])
    clock.advance(5)
    assert sub.keys["tcp://127.0.0.1:7001"] == KEY[::-1]
    await disc.stopService()


class Counting(MemoryDbDriver):
    """A memory NB DB that counts the table reads."""

    reads = 0

    def get_all_entries(self, table, topic=None):
        self.reads += 1
        return super().get_all_entries(table, topic)

    def get_all_rows(self, table, topic=None):
        self.reads += 1
        return super().get_all_rows(table, topic)


@pytest_twisted.ensureDeferred
async def test_discovery_observe_acts_at_once():
    db, clock = Counting(), task.Clock()
    clock.advance(1000)
    await put(db, "c1", "tcp://127.0.0.1:7101", LOCAL_CONTROLLER, 1000, KEY)
    sub = Addresses()
    disc = Discovery(db, sub, NEUTRON_SERVER, timeout=30, interval=1000, clock=clock)
    disc.startService()
    await disc.ready
    assert sub.keys == {"tcp://127.0.0.1:7101": KEY}

    def announce(id, uri, ts=1000.0, action="create"):
        return disc.observe(DbUpdate(T, id, action, dragonflow_row(id, uri, ts)))

    # A known row, set (its key is not in the update): kept with its key.
    await announce("c1", "tcp://127.0.0.1:7101", 1020.0, "set")
    assert disc.rows["c1"] == PublisherRow("c1", "tcp://127.0.0.1:7101", LOCAL_CONTROLLER,
                                           1020.0, KEY)
    # A new id at a uri it is connected to (a publisher restarted there,
    # announcing itself over the connection): same key, no read.
    reads = db.reads
    await announce("c1b", "tcp://127.0.0.1:7101", 1021.0)
    assert disc.rows["c1b"].curve_public_key == KEY and db.reads == reads
    # A new id elsewhere: its rows are read (for the key); one not in the
    # table is not connected.
    await put(db, "c9", "tcp://127.0.0.1:7109", LOCAL_CONTROLLER, 1000, KEY[::-1])
    await announce("c9", "tcp://127.0.0.1:7109")
    await announce("c8", "tcp://127.0.0.1:7108")
    assert sub.keys == {"tcp://127.0.0.1:7101": KEY, "tcp://127.0.0.1:7109": KEY[::-1]}
    await disc.observe(DbUpdate(T, "bad", "create", "garbage"))
    await disc.observe(DbUpdate("lport", "x", "create", dragonflow_row("x", "tcp://x:1", 1.0)))
    assert sub.addresses == {"tcp://127.0.0.1:7101", "tcp://127.0.0.1:7109"}
    await disc.observe(DbUpdate(T, "c9", "delete", None))
    assert sub.addresses == {"tcp://127.0.0.1:7101"}
    # A resync re-reads the table.
    await disc.observe(DbUpdate.control("sync", "D"))
    assert sub.addresses == {"tcp://127.0.0.1:7101", "tcp://127.0.0.1:7109"}
    await disc.stopService()


class Outage(MemoryDbDriver):
    """A memory NB DB that can be made unreachable, and lose everything."""

    down = False

    def _refused(self):
        return defer.fail(DBConnectionError("127.0.0.1:7000", "connection refused"))

    def get_all_entries(self, table, topic=None):
        return self._refused() if self.down else super().get_all_entries(table, topic)

    def get_all_rows(self, table, topic=None):
        return self._refused() if self.down else super().get_all_rows(table, topic)


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
        await drop(db, "n1", NEUTRON_SERVER)
        db.down = False
        clock.advance(5)  # 1065: readable again
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        clock.advance(10)  # within timeout/3 + interval of 1065
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1075)  # refreshed
        clock.pump([5] * 4)
        assert disc.connected == {"tcp://127.0.0.1:7001"}
        # A publisher that really is gone goes once the grace is over.
        await drop(db, "n1", NEUTRON_SERVER)
        clock.pump([5] * 7)  # 1110: 35 s since its last refresh
        assert disc.connected == set()
    finally:
        await disc.stopService()
        await sub.close()


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
    await put(db, "n2", "tcp://127.0.0.1:7002", NEUTRON_SERVER, 1000)
    await disc.observe(DbUpdate.control("dbrestart"))
    await disc.observe(DbUpdate.control("sync", "D"))
    await disc.observe(DbUpdate(T, "n2", "create", dragonflow_row("n2", "tcp://127.0.0.1:7002",
                                                                  1000.0)))
    await disc.refresh()
    clock.advance(5)
    assert sub.addresses == set() and disc.connected == set()


@pytest_twisted.ensureDeferred
async def test_discovery_stopped_during_a_read_ignores_what_it_read():
    pending = []

    class Slow(MemoryDbDriver):
        def get_topic_rows(self, table, topic):
            d = defer.Deferred()
            pending.append((d, super().get_topic_rows(table, topic)))
            return d

    db, clock = Slow(), task.Clock()
    clock.advance(1000)
    await put(db, "n1", "tcp://127.0.0.1:7001", NEUTRON_SERVER, 1000)
    sub = Addresses()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=5, clock=clock)
    disc.startService()
    [(read, found)] = pending
    stopped = disc.stopService()
    read.callback(await found)
    await stopped
    await disc.ready
    assert sub.addresses == set() and disc.connected == set()


# --- on a real cluster ---------------------------------------------------------------

async def raw(cluster, *command):
    """One command with redis-cli on the master of its key (command[1])."""
    node = await cluster.owner(await cluster.keyslot(command[1]))
    return await node.cli(*command)


async def scan(cluster, pattern):
    """Every key matching C{pattern}, as Dragonflow's RedisDbDriver lists a
    table without topic ({table.*}*, every master)."""
    keys = []
    for node in await cluster.masters():
        keys += (await node.cli("--scan", "--pattern", pattern)).split()
    return keys


async def redis_db(cluster):
    db = RedisDbDriver(hosts=cluster.seeds, retries=3)
    await db.initialize()
    return db


@pytest_twisted.ensureDeferred
async def test_registered_publisher_is_found_and_dropped_at_once_on_clean_stop(
        redis_cluster, unique):
    """Real cluster, real sockets: a controller-side subscriber finds a
    neutron-side publisher through the table and drops it when it stops."""
    db = await redis_db(redis_cluster)
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

        await reg.stopService()  # deletes the rows and announces it
        await poll(lambda: pub.uri not in sub.addresses, 10, "disconnect on announce")
        assert pub.id not in await db.get_all_keys(T)
        assert pub.id not in await db.get_all_keys(D, topic=NEUTRON_SERVER)
        announced = [u for u in got.updates if u.table == T]
        assert [(u.action, u.key) for u in announced][-1] == ("delete", pub.id)
    finally:
        await disc.stopService()
        await sub.close()
        await pub.close()
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_dragonflow_publisher_service_is_found_and_subscribed_to(
        redis_cluster, unique):
    """Rows byte for byte as Dragonflow's df-publisher-service writes them
    (no role, no topic) are neutron_server publishers to a controller."""
    db = await redis_db(redis_cluster)
    pub = ZmqPubSub(bind="tcp://127.0.0.1:*").get_publisher()  # its PUB socket
    await pub.initialize()
    live, dead = dragonflow_id(), dragonflow_id()
    now = reactor.seconds()
    assert await raw(redis_cluster, "SET", f"{{publisher.}}{live}",
                     dragonflow_row(live, pub.uri, now)) == "OK"
    await raw(redis_cluster, "SET", f"{{publisher.}}{dead}",
              dragonflow_row(dead, "tcp://127.0.0.1:9", now - 100))
    sub = ZmqPubSub().get_subscriber()
    got = Received()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30, interval=1000)

    def callback(update):
        got(update)
        disc.observe(update)

    try:
        await sub.initialize(callback)
        disc.startService()
        await disc.ready
        assert pub.uri in disc.connected and "tcp://127.0.0.1:9" not in disc.connected
        assert disc.keys[pub.uri] is None and disc.rows[live].role == NEUTRON_SERVER

        async def probe():
            await pub.send_event(DbUpdate(unique, "hello", "create", "{}"))
            return "hello" in got.keys()
        await poll(probe, 10, "update from the Dragonflow publisher")

        # Its refresh (NbApi.update: the same bytes, a new timestamp), as
        # read and as relayed by its table monitor.
        await raw(redis_cluster, "SET", f"{{publisher.}}{live}",
                  dragonflow_row(live, pub.uri, now + 10))
        await disc.refresh()
        assert disc.rows[live].last_activity_timestamp == now + 10
        await pub.send_event(DbUpdate(T, live, "set", dragonflow_row(live, pub.uri, now + 20)))
        await poll(lambda: disc.rows[live].last_activity_timestamp == now + 20, 10,
                   "the relayed refresh")
        assert pub.uri in sub.addresses
        # Its row deleted (its stale-publisher monitor), relayed: dropped.
        await raw(redis_cluster, "DEL", f"{{publisher.}}{live}")
        await pub.send_event(DbUpdate(T, live, "delete", None))
        await poll(lambda: pub.uri not in sub.addresses, 10, "drop on the relayed delete")
    finally:
        await disc.stopService()
        await sub.close()
        await pub.close()
        for id in (live, dead):
            await raw(redis_cluster, "DEL", f"{{publisher.}}{id}")
        await db.close()


@pytest_twisted.ensureDeferred
async def test_every_row_dragonflow_reads_passes_its_model(redis_cluster):
    """
    Dragonflow's controller lists table publisher without topic ({publisher.*}*
    on every master) and parses every row with its Publisher model: a dftx
    publisher service is there, as Dragonflow writes its own rows, and no
    controller of dftx is; the keys are in dftx_publisher.
    """
    db = await redis_db(redis_cluster)
    regs = [Registration(db, uuid.uuid4().hex, "tcp://127.0.0.1:8866", NEUTRON_SERVER,
                         timeout=30, curve_public_key=KEY)]
    regs += [Registration(db, uuid.uuid4().hex, f"tcp://127.0.0.1:{9000 + i}",
                          LOCAL_CONTROLLER, timeout=30, curve_public_key=KEY[::-1])
             for i in range(3)]
    try:
        for r in regs:
            r.startService()
            await r.started
        now = reactor.seconds()
        seen = {}
        for key in await scan(redis_cluster, "{publisher.*}*"):
            data = dragonflow_parse(await raw(redis_cluster, "GET", key), now)
            assert data is not None and key == f"{{publisher.}}{data['id']}"
            seen[data["id"]] = data
        service, controllers = regs[0], regs[1:]
        assert service.id in seen and not {c.id for c in controllers} & set(seen)
        ts = seen[service.id]["last_activity_timestamp"]
        assert isinstance(ts, float)
        assert await raw(redis_cluster, "GET", f"{{publisher.}}{service.id}") == dragonflow_row(
            service.id, "tcp://127.0.0.1:8866", ts)
        assert json.loads(await raw(redis_cluster, "GET", row_key(
            D, service.id, NEUTRON_SERVER))) == {
                "id": service.id, "uri": "tcp://127.0.0.1:8866",
                "last_activity_timestamp": ts, "curve_public_key": KEY}
        for c in controllers:
            assert json.loads(await raw(redis_cluster, "GET", row_key(
                D, c.id, LOCAL_CONTROLLER)))["curve_public_key"] == KEY[::-1]
    finally:
        for r in regs:
            await r.stopService()
        await db.close()


@pytest_twisted.ensureDeferred
async def test_the_curve_key_reaches_register_listen_address(redis_cluster):
    db = await redis_db(redis_cluster)
    service = Registration(db, uuid.uuid4().hex, "tcp://127.0.0.1:18866", NEUTRON_SERVER,
                           timeout=30, curve_public_key=KEY)
    controller = Registration(db, uuid.uuid4().hex, "tcp://127.0.0.1:18867",
                              LOCAL_CONTROLLER, timeout=30, curve_public_key=KEY[::-1])
    subs = {role: Addresses() for role in (NEUTRON_SERVER, LOCAL_CONTROLLER)}
    discs = [Discovery(db, sub, role, timeout=30, interval=1000) for role, sub in subs.items()]
    try:
        for s in (service, controller, *discs):
            s.startService()
        await service.started
        await controller.started
        for d in discs:
            await d.refresh()
        assert subs[LOCAL_CONTROLLER].keys["tcp://127.0.0.1:18866"] == KEY
        assert subs[NEUTRON_SERVER].keys["tcp://127.0.0.1:18867"] == KEY[::-1]
        assert "tcp://127.0.0.1:18867" not in subs[LOCAL_CONTROLLER].addresses
    finally:
        for s in (*discs, service, controller):
            await s.stopService()
        await db.close()


# Commands that are not the read: replication, the measurement's own, the
# harness's lookups of the cluster.
BACKGROUND = {"info", "replconf", "ping", "psync", "cluster|nodes", "cluster|keyslot"}


async def counters(cluster):
    """Keys read (keyspace_hits) per node, and command calls, of every node."""
    hits, calls = {}, {}
    for node in cluster.nodes:
        hits[node.address] = int((await node.info("stats"))["keyspace_hits"])
        for name, stats in (await node.info("commandstats")).items():
            command = name.removeprefix("cmdstat_")
            if command not in BACKGROUND:
                n = int(stats.split(",")[0].split("=")[1])
                calls[command] = calls.get(command, 0) + n
    return hits, calls


async def measured(cluster, read):
    """(keys read per node, calls per command) of C{read()}."""
    hits0, calls0 = await counters(cluster)
    await read()
    hits1, calls1 = await counters(cluster)
    return ({a: hits1[a] - hits0[a] for a in hits1 if hits1[a] != hits0[a]},
            {c: calls1[c] - calls0.get(c, 0) for c in calls1 if calls1[c] != calls0.get(c, 0)})


async def fleet(cluster, controllers):
    """An NB DB with nothing else in tables publisher and dftx_publisher
    than the rows of a publisher service (dftx's), a Dragonflow one and
    C{controllers} controllers (a L{Discovery} reads nothing else)."""
    db = await redis_db(cluster)
    await db.delete_table(T)  # rows of earlier tests
    await db.delete_table(D)
    now = reactor.seconds()
    await put(db, "svc-" + uuid.uuid4().hex, "tcp://127.0.0.1:8866", NEUTRON_SERVER, now, KEY)
    df = dragonflow_id()
    await raw(cluster, "SET", f"{{publisher.}}{df}", dragonflow_row(df, "tcp://127.0.0.1:8868",
                                                                     now))
    await controllers_join(db, controllers)
    return db


async def controllers_join(db, n):
    for _ in range(n):
        await put(db, f"ctl-{uuid.uuid4().hex}", "tcp://127.0.0.1:20000", LOCAL_CONTROLLER,
                  reactor.seconds())


@pytest_twisted.ensureDeferred
async def test_discovery_reads_only_the_other_roles_rows_not_more_with_more_controllers(
        redis_cluster):
    """A controller's periodic read reads the publisher services' rows and
    nothing else: 50 more controllers cost it no key and no command."""
    db = await fleet(redis_cluster, 5)
    try:
        ctl = Discovery(db, Addresses(), LOCAL_CONTROLLER, timeout=30, interval=1000)
        svc = Discovery(db, Addresses(), NEUTRON_SERVER, timeout=30, interval=1000)
        for d in (ctl, svc):
            d.startService()
            await d.ready
        assert len(ctl.rows) == 2 and len(svc.rows) == 5
        wanted_slots = {await redis_cluster.keyslot(k) for k in ("{publisher.}", "{%s.%s}" % (
            D, NEUTRON_SERVER))}
        owners = {(await redis_cluster.owner(s)).address for s in wanted_slots}
        before = await measured(redis_cluster, ctl.refresh)
        await controllers_join(db, 50)
        after = await measured(redis_cluster, ctl.refresh)
        assert before == after
        hits, _ = after
        # The 2 publisher services: the Dragonflow row, dftx's 2 rows.
        assert sum(hits.values()) == 3 and set(hits) <= owners
        # The publisher service reads the controllers' rows only.
        hits, _ = await measured(redis_cluster, svc.refresh)
        assert sum(hits.values()) == 55 and len(svc.rows) == 55
        for d in (ctl, svc):
            await d.stopService()
    finally:
        await db.delete_table(T)
        await db.delete_table(D)
        await db.close()


@pytest_twisted.ensureDeferred
async def test_discovery_reads_issue_no_scan(redis_cluster):
    db = await fleet(redis_cluster, 5)
    try:
        for role in (LOCAL_CONTROLLER, NEUTRON_SERVER):
            disc = Discovery(db, Addresses(), role, timeout=30, interval=1000)
            disc.startService()
            await disc.ready
            _, calls = await measured(redis_cluster, disc.refresh)
            await disc.stopService()
            assert "scan" not in calls, (role, calls)
    finally:
        await db.delete_table(T)
        await db.delete_table(D)
        await db.close()
