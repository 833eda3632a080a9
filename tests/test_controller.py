"""
twistd dfcontroller in a whole deployment of real processes (dftx.sandbox):
the harness's Redis Cluster with replicas, one dfpublisher, two controllers
each with its own ovsdb-server, and an NB writer in this process.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from dftx import config
from dftx.controller import ControllerService
from dftx.errors import DftxError, InvalidNameError
from dftx.ha import HA_TOPIC, restart_update, topology_update
from dftx.redis.slots import SLOTS, key_slot
from dftx.redis.topology import Shard, Topology
from dftx.sandbox import Deployment
from dftx.harness import poll
from dftx.testing import MemoryDbDriver, MemoryPubSub
from dftx.update import DBRESTART, SYNC, DbUpdate

aio = pytest_twisted.ensureDeferred


@pytest_twisted.async_yield_fixture
async def deployment(tmp_path, redis_cluster):
    d = Deployment(tmp_path, redis_cluster, controllers=2)
    try:
        await d.start()
        yield d
    finally:
        await d.stop()


@pytest_twisted.async_yield_fixture
async def no_resync_deployment(tmp_path, redis_cluster):
    """A deployment whose periodic safety resync (db_sync_time) does not run
    within a test: what repairs the caches is the mechanism under test."""
    d = Deployment(tmp_path, redis_cluster, controllers=2, db_sync_time=600)
    try:
        await d.start()
        yield d
    finally:
        await d.stop()


async def write_rows(nb, table, n, prefix="p"):
    await defer.gatherResults([
        nb.create(table, f"{prefix}{i}", json.dumps({"id": f"{prefix}{i}", "n": i}))
        for i in range(n)])


async def port_status(d, iface_id):
    rows = await d.db_table("port_status")
    return rows.get(iface_id)


async def add_vm_port(ovsdb, name, iface_id, mac):
    await ovsdb.vsctl("add-port", "br-int", name, "--", "set", "Interface", name,
                      f"external_ids:iface-id={iface_id}", f"external_ids:attached-mac={mac}")


@aio
async def test_nb_writes_reach_both_controllers(deployment):
    d = deployment
    await write_rows(d.nb, "lport", 50)
    await d.nb.update("lport", "p1", '{"id": "p1", "n": "changed"}')
    await d.nb.delete("lport", "p2")
    await d.nb.create("lswitch", "s1", '{"id": "s1"}')
    await d.nb.create("other", "x", "not cached")
    await d.wait_converged("lport")
    await d.wait_converged("lswitch")
    for c in d.controllers:
        lport = await c.json("/v1/tables/lport")
        assert lport["p1"] == {"id": "p1", "n": "changed"} and "p2" not in lport
        assert (await c.get("/v1/tables/other"))[0] == 404
        # Each controller wrote its chassis row; the other one's arrives
        # with the periodic safety resync (db_sync_time).
        await poll(lambda: _has(lambda: c.json("/v1/tables/chassis"),
                                {"compute1", "compute2"}), 15, "both chassis rows")
        status = await c.json("/v1/status")
        assert status["ready"] and status["cache"]["lport"] == 49
        assert status["counters"]["resyncs"] >= 1
        metrics = (await c.get("/metrics"))[1].decode()
        assert 'dftx_cache_rows{table="lport"} 49' in metrics


@aio
async def test_vm_port_status_reaches_the_db_and_the_neutron_side(deployment):
    d = deployment
    ovsdb, controller = d.ovsdbs[0], d.controllers[0]
    await add_vm_port(ovsdb, "tap1", "vm-port-1", "fa:16:3e:00:00:01")
    await ovsdb.vsctl("add-port", "br-int", "vx1", "--", "set", "Interface", "vx1",
                      "type=vxlan", "options:remote_ip=10.0.0.2")

    async def online():
        ports = await controller.json("/v1/ports")
        return {p["name"]: p for p in ports}
    await poll(lambda: _has(online, {"tap1", "vx1"}), 15, "ports online")
    ports = await online()
    assert ports["tap1"]["kind"] == "vm" and ports["tap1"]["iface_id"] == "vm-port-1"
    assert ports["vx1"]["kind"] == "tunnel" and ports["vx1"]["remote_ip"] == "10.0.0.2"
    await poll(lambda: _status_is(d, "vm-port-1", "up"), 15, "port_status up in the NB DB")
    row = await port_status(d, "vm-port-1")
    assert row["chassis"] == "compute1"

    async def neutron_side(status):
        table = await d.publisher.json("/v1/tables/port_status")
        return table.get("vm-port-1", {}).get("status") == status
    await poll(lambda: neutron_side("up"), 15, "dfpublisher saw the port up")

    await ovsdb.vsctl("del-port", "br-int", "tap1")
    await poll(lambda: _status_is(d, "vm-port-1", "down"), 15, "port_status down")
    await poll(lambda: neutron_side("down"), 15, "dfpublisher saw the port down")
    assert "tap1" not in await online()


async def _has(getter, names):
    return names <= set(await getter())


async def _status_is(d, iface_id, status):
    row = await port_status(d, iface_id)
    return row is not None and row["status"] == status


async def _counter_at_least(service, name, n):
    return (await service.json("/v1/status"))["counters"].get(name, 0) >= n


async def _write_until_it_succeeds(nb, key, deadline=60.0):
    start = time.monotonic()
    while True:
        try:
            await nb.create("lport", key, json.dumps({"id": key}))
            return time.monotonic() - start
        except DftxError:
            if time.monotonic() - start > deadline:
                raise


@aio
async def test_master_killed_every_controller_resyncs_and_matches_the_db(no_resync_deployment):
    d = no_resync_deployment
    await write_rows(d.nb, "lport", 100)
    await d.wait_converged("lport")
    slot = key_slot("{lport.}p0")
    master = await d.cluster.owner(slot)
    await master.kill()
    t0 = time.monotonic()
    first_write = await _write_until_it_succeeds(d.nb, "after-kill")
    await write_rows(d.nb, "lport", 20, prefix="later")
    await d.wait_converged("lport", timeout=60)
    converged = time.monotonic() - t0
    await poll(lambda: _counter_at_least(d.publisher, "ha_failovers", 1), 15,
               "the HA watcher saw the failover")
    await poll(lambda: _counter_at_least(d.publisher, "ha_restart_events", 1), 15,
               "the HA watcher published the dbrestart naming the slots lost")
    for c in d.controllers:
        await poll(lambda: _counter_at_least(c, "ha_topologies", 1), 15,
                   "the controller got the HA topology")
        # Its resync follows within the spread window.
        await poll(lambda: _counter_at_least(c, "resyncs", 2), 15, "the controller resynced")
    print(f"\nkill -9 of a master (cluster-node-timeout {d.cluster.node_timeout_ms} ms): "
          f"first NB write after {first_write:.2f}s, every cache equal to the DB after "
          f"{converged:.2f}s")


@aio
async def test_coordinated_failover_every_controller_matches_the_db(no_resync_deployment):
    d = no_resync_deployment
    await write_rows(d.nb, "lport", 50)
    await d.wait_converged("lport")
    master = await d.cluster.owner(key_slot("{lport.}p0"))
    [replica] = await d.cluster.replicas_of(master)
    writes = defer.ensureDeferred(write_rows(d.nb, "lport", 200, prefix="during"))
    await d.cluster.failover(replica)
    await writes
    await d.wait_converged("lport", timeout=30)
    await poll(lambda: _published_masters_include(d, replica.address), 15, "HA topology")


async def _published_masters_include(d, address):
    status = await d.publisher.json("/v1/status")
    return address in status["cluster"]["masters"]


@aio
async def test_dfpublisher_restarted_controllers_reconnect_and_resync(no_resync_deployment):
    d = no_resync_deployment
    await write_rows(d.nb, "lport", 10)
    await d.wait_converged("lport")
    await d.publisher.kill()
    # Writes while it is down wait in the writer's queue; some reach
    # subscribers before they resubscribe, some not: the resync covers it.
    writes = defer.ensureDeferred(write_rows(d.nb, "lport", 50, prefix="down"))
    await d.publisher.start()
    await writes
    await d.nb.delete("lport", "p0")
    await d.wait_converged("lport", timeout=30)


@aio
async def test_controller_restarted_reloads_and_reannounces_its_ports(no_resync_deployment):
    d = no_resync_deployment
    ovsdb, controller = d.ovsdbs[0], d.controllers[0]
    await add_vm_port(ovsdb, "tap1", "vm-a", "fa:16:3e:00:00:0a")
    await add_vm_port(ovsdb, "tap2", "vm-b", "fa:16:3e:00:00:0b")
    await poll(lambda: _status_is(d, "vm-b", "up"), 15, "vm-b up")
    await poll(lambda: _status_is(d, "vm-a", "up"), 15, "vm-a up")
    await controller.kill()
    await write_rows(d.nb, "lport", 30)
    await ovsdb.vsctl("del-port", "br-int", "tap1")
    await add_vm_port(ovsdb, "tap3", "vm-c", "fa:16:3e:00:00:0c")
    # Someone else marked vm-b down meanwhile: the restarted controller
    # announces it again.
    await d.db.create_key("port_status", "vm-b", json.dumps(
        {"status": "down", "chassis": "compute1", "ofport": None}))
    await controller.start()
    await d.wait_converged("lport")
    await poll(lambda: _status_is(d, "vm-a", "down"), 15, "vm-a (gone) down")
    await poll(lambda: _status_is(d, "vm-b", "up"), 15, "vm-b re-announced up")
    await poll(lambda: _status_is(d, "vm-c", "up"), 15, "vm-c (new) up")


@pytest_twisted.ensureDeferred
async def test_over_redis_pub_sub_classic_and_sharded(tmp_path, redis_cluster):
    for driver in ("redis", "redis_sharded"):
        d = Deployment(tmp_path / driver, redis_cluster, controllers=2, pub_sub_driver=driver)
        try:
            await d.start()
            await write_rows(d.nb, "lport", 30, prefix=driver)
            await d.nb.delete("lport", f"{driver}3")
            await d.wait_converged("lport")
            await add_vm_port(d.ovsdbs[1], "tap1", f"vm-{driver}", "fa:16:3e:00:00:01")

            async def neutron_side():
                table = await d.publisher.json("/v1/tables/port_status")
                return table.get(f"vm-{driver}", {}).get("chassis") == "compute2"
            await poll(neutron_side, 15, f"port status over {driver}")
        finally:
            await d.stop()


async def _no_resync_due(controller):
    return (await controller.json("/v1/status"))["resync_spread"]["due"] is None


@aio
async def test_a_slot_migration_resyncs_only_the_topics_on_that_slot(tmp_path, redis_cluster):
    table = "stampede"  # its own table: rows of other topics would stay behind in lport
    slot = key_slot(f"{{{table}.t3}}")
    assert slot not in {key_slot(f"{{{table}.t1}}"), key_slot(f"{{{table}.}}"),
                        key_slot("{chassis.}")}
    d = Deployment(tmp_path, redis_cluster, controllers=2, tables=f"{table},chassis",
                   topics=["t1", "t3"], db_sync_time=600)
    try:
        await d.start()
        for c in d.controllers:  # the resyncs their start asked for are done
            await poll(lambda c=c: _no_resync_due(c), 15, "no resync waiting")
        # Rows nobody was told about, on the slot that moves and on one that stays.
        await d.db.create_key(table, "silent-t3", "3", topic="t3")
        await d.db.create_key(table, "silent-t1", "1", topic="t1")
        src = await d.cluster.owner(slot)
        await d.cluster.migrate_slot(slot, await d.cluster.other_master(src))
        for c in d.controllers:
            await poll(lambda c=c: _has(lambda: c.json(f"/v1/tables/{table}"), {"silent-t3"}),
                       30, "the moved topic resynced")
            await poll(lambda c=c: _no_resync_due(c), 15, "no resync waiting")
            assert "silent-t1" not in await c.json(f"/v1/tables/{table}")
            counters = (await c.json("/v1/status"))["counters"]
            assert counters["ha_topologies"] >= 1 and counters["spread_resyncs"] >= 1
    finally:
        try:
            if d.db is not None:
                await d.db.delete_table(table)
        finally:
            await d.stop()


def unstarted_controller():
    """A controller built in memory, not started: no server, no reactor run."""
    cfg = config.parse("[df]\nnb_db_driver = memory\n[df_local_controller]\n"
                       "chassis_name = c1\ntopics = t1\n", role=config.LOCAL_CONTROLLER)
    return ControllerService(cfg, MemoryReactorClock())


@pytest_twisted.ensureDeferred
async def test_topics_registered_and_unregistered_before_start():
    svc = unstarted_controller()
    await svc.register_topic("t2")
    assert svc.mirror.topics == {"D", "t1", "t2"}
    await svc.unregister_topic("t1")
    await svc.unregister_topic("t2")
    assert svc.mirror.topics == {"D"}


@pytest.mark.parametrize("topic", ["redis", "D"])
@pytest_twisted.ensureDeferred
async def test_reserved_topics_are_refused(topic):
    svc = unstarted_controller()
    for call in (svc.register_topic, svc.unregister_topic):
        with pytest.raises(InvalidNameError, match=repr(topic)):
            await call(topic)
    assert svc.mirror.topics == {"D", "t1"}


# --- fleet-wide triggers: what a controller resyncs, and when (memory DB and bus, a clock)


class ReadLog:
    """The shared NB DB as controller C{who} sees it: each read of rows it
    makes is logged as (who, clock time, method, topic), everything else
    (writes, version checks) passed on."""

    def __init__(self, db, clock, who, reads, client=None):
        self.db, self.clock, self.who, self.reads, self.client = db, clock, who, reads, client

    def __getattr__(self, name):
        attr = getattr(self.db, name)
        if name not in ("get_topic_rows", "get_all_rows", "get_all_entries", "get_all_keys"):
            return attr

        def read(table, topic=None, *args, **kw):
            self.reads.append((self.who, self.clock.seconds(), name, topic))
            return attr(table, topic, *args, **kw)
        return read


class FakeCluster:
    """What a controller uses of its ClusterClient when an HA message comes."""

    def __init__(self, topology):
        self.topology = topology

    def apply_topology(self, topology):
        self.topology = topology


ONE_MASTER = Topology([Shard(0, SLOTS - 1, "m1:1")])


def moving(slot):
    """ONE_MASTER with C{slot} moved to another master."""
    shards = [Shard(slot, slot, "m2:1")]
    if slot > 0:
        shards.append(Shard(0, slot - 1, "m1:1"))
    if slot < SLOTS - 1:
        shards.append(Shard(slot + 1, SLOTS - 1, "m1:1"))
    return Topology(shards)


class Fleet:
    """
    C{n} controllers (topics t1 and t3, the default tables) on one clock,
    one memory NB DB and one memory bus, their delays drawn from one seeded
    random source.
    """

    def __init__(self, n, spread=1.0, rate=200, seed=17):
        self.clock = MemoryReactorClock()
        self.db = MemoryDbDriver()
        self.bus = MemoryPubSub()
        self.pub = self.bus.get_publisher()
        self.seed = seed
        self.reads = []
        rng = random.Random(seed)
        cfg = config.parse(
            "[df]\nnb_db_driver = memory\n[df_local_controller]\nchassis_name = c\n"
            f"topics = t1,t3\nresync_spread = {spread}\nfleet_resync_rate = {rate}\n",
            role=config.LOCAL_CONTROLLER)
        self.controllers = [ControllerService(cfg, self.clock, rng=rng) for _ in range(n)]
        for i, svc in enumerate(self.controllers):
            svc.db = svc.mirror.db = ReadLog(self.db, self.clock, i, self.reads,
                                             FakeCluster(ONE_MASTER))

    async def start(self):
        """Subscribe each controller and load its cache."""
        for svc in self.controllers:
            sub = self.bus.get_subscriber()
            await sub.register_topic(HA_TOPIC)
            await sub.initialize(svc._received)  # what the service's subscriber calls
            await svc.mirror.resync()
        self.reads.clear()
        return self

    def run_timers(self):
        """Advance the clock to each timer in turn until none is left."""
        while self.clock.getDelayedCalls():
            due = min(c.getTime() for c in self.clock.getDelayedCalls())
            self.clock.advance(due - self.clock.seconds())

    def has(self, i, topic, key):
        return self.controllers[i].cache.get("lport", key, topic=topic) is not None


def pair_slots(tables, topics):
    return {key_slot(f"{{{t}.{'' if topic == 'D' else topic}}}") for t in tables for topic in topics}


@pytest_twisted.ensureDeferred
async def test_a_topology_that_moves_one_slot_resyncs_only_the_topics_on_it():
    fleet = await Fleet(1).start()
    svc = fleet.controllers[0]
    slot = key_slot("{lport.t3}")
    others = pair_slots(svc.cache.tables, {"D", "t1", "t3"}) - {slot}
    assert slot not in others and len(others) == 14
    # Rows the controller was not told about, in a topic that moves and in one that does not.
    await fleet.db.create_key("lport", "silent", "1", topic="t3")
    await fleet.db.create_key("lport", "silent", "1", topic="t1")
    await fleet.pub.send_event(topology_update(moving(slot)))
    assert svc.db.client.topology == moving(slot)  # routed by it at once
    assert fleet.reads == [] and svc.counters["resync_triggers"] == 1
    fleet.run_timers()
    assert fleet.reads and {r[3] for r in fleet.reads} == {"t3"}
    assert fleet.has(0, "t3", "silent") and not fleet.has(0, "t1", "silent")
    assert svc.mirror.counters["resyncs"] == 2  # the load, then this one


@pytest_twisted.ensureDeferred
async def test_a_topology_that_moves_none_of_its_slots_resyncs_nothing():
    fleet = await Fleet(1).start()
    svc = fleet.controllers[0]
    slot = min(set(range(SLOTS)) - pair_slots(svc.cache.tables, {"D", "t1", "t3"}))
    await fleet.db.create_key("lport", "silent", "1", topic="t3")
    await fleet.pub.send_event(topology_update(moving(slot)))
    await fleet.pub.send_event(topology_update(moving(slot)))  # the same again
    assert svc.db.client.topology == moving(slot)
    assert fleet.clock.getDelayedCalls() == [] and svc.resync_window() == 1.0
    fleet.clock.advance(60)
    assert fleet.reads == [] and not fleet.has(0, "t3", "silent")
    assert svc.counters["resync_triggers_skipped"] == 2 and svc.counters["ha_topologies"] == 2
    assert svc.mirror.counters["resyncs"] == 1


@pytest_twisted.ensureDeferred
async def test_a_dbrestart_naming_lost_slots_resyncs_only_the_topics_on_them():
    fleet = await Fleet(1).start()
    svc = fleet.controllers[0]
    await fleet.db.create_key("lport", "silent", "1", topic="t3")
    await fleet.db.create_key("lport", "silent", "1", topic="t1")
    # Slots of no row it keeps nor of its own rows (chassis, port_status)
    # nor of the publisher registry rows it reads.
    elsewhere = (set(range(SLOTS)) - pair_slots(svc.cache.tables, {"D", "t1", "t3"})
                 - {key_slot("{port_status.}"), key_slot("{publisher.}"),
                    key_slot("{dftx_publisher.neutron_server}")})
    await fleet.pub.send_event(restart_update(elsewhere))
    assert svc.counters["resync_triggers_skipped"] == 1 and fleet.clock.getDelayedCalls() == []
    await fleet.pub.send_event(restart_update({key_slot("{lport.t3}"), *elsewhere}))
    fleet.run_timers()
    assert {r[3] for r in fleet.reads} == {"t3"}
    assert fleet.has(0, "t3", "silent") and not fleet.has(0, "t1", "silent")
    # A dbrestart that does not say which slots (Dragonflow's, a reconnection's): all.
    await fleet.pub.send_event(DbUpdate.control(DBRESTART))
    fleet.run_timers()
    assert fleet.has(0, "t1", "silent")


@pytest_twisted.ensureDeferred
async def test_a_dbrestart_spreads_the_resyncs_of_20_controllers_over_the_window():
    fleet = Fleet(20, spread=1.0, rate=4)
    for i in range(20):  # each controller's chassis row: the fleet is 20
        await fleet.db.create_key("chassis", f"compute{i}", "{}")
    await fleet.start()
    window = 20 / 4
    assert all(svc.resync_window() == window for svc in fleet.controllers)
    await fleet.pub.send_event(DbUpdate.control(DBRESTART))
    assert fleet.reads == []  # nobody reads at the instant the trigger arrives
    fleet.clock.advance(0.001)
    await fleet.pub.send_event(DbUpdate.control(SYNC))  # merged into the pending one
    fleet.run_timers()
    # The delays drawn, in the order the controllers got the dbrestart.
    replay = random.Random(fleet.seed)
    delays = [replay.random() * window for _ in fleet.controllers]
    first = {}
    for who, at, _, _ in fleet.reads:
        first.setdefault(who, at)
    assert sorted(first) == list(range(20))
    assert [first[i] for i in range(20)] == delays  # none before its delay
    assert len(set(delays)) == 20 and all(0 <= d < window for d in delays)
    assert max(delays) - min(delays) > window / 2  # not the 1 s minimum: grown with the fleet
    assert all(svc.mirror.counters["resyncs"] == 2 for svc in fleet.controllers)
    assert all(svc.counters["resync_triggers"] == 2 for svc in fleet.controllers)


class RefreshLog:
    """Stands for a controller's Discovery: when it was told to read the registry again."""

    def __init__(self, clock, who, log):
        self.clock, self.who, self.log = clock, who, log

    def refresh(self):
        self.log.append((self.who, self.clock.seconds()))
        return defer.succeed(None)

    def observe(self, update):
        raise AssertionError(f"a controller passes {update!r} to discovery at once")


@pytest_twisted.ensureDeferred
async def test_a_dbrestart_spreads_the_registry_reads_of_20_controllers_with_their_resyncs():
    fleet = Fleet(20, spread=1.0, rate=4)
    for i in range(20):
        await fleet.db.create_key("chassis", f"compute{i}", "{}")
    await fleet.start()
    refreshes = []
    for i, svc in enumerate(fleet.controllers):
        svc.discovery = RefreshLog(fleet.clock, i, refreshes)
    # Lost slots that hold the registry's rows and nothing of theirs: no
    # resync, but the registry is read again.
    await fleet.pub.send_event(restart_update({key_slot("{publisher.}")}))
    assert refreshes == []  # nobody reads the registry at the instant the trigger arrives
    fleet.run_timers()
    assert sorted(who for who, _ in refreshes) == list(range(20))
    times = [at for _, at in refreshes]
    assert len(set(times)) == 20 and all(0 < at < 20 / 4 for at in times)
