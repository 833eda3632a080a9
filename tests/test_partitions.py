"""
Network partitions under load, in a lab of network namespaces
(L{dftx.harness.netns.Lab}; doc/reliability.md has the table, doc/testing.md
the lab).

Every Redis node (3 masters, 3 replicas), dfpublisher and each compute host
(a dfcontroller with its ovsdb-server) runs on a host of its own: a network
namespace with its own address on the lab's bridge.  This test process is
the neutron-server host: it runs the NB writer (the load and invariant of
tests/faults_common.py, as tests/test_faults.py uses them) on the root
namespace's address in the lab, and hands its updates to dfpublisher over
dfpublisher's ipc socket (the two share that host's filesystem, as
neutron-server and df-publisher-service do; the ipc socket is not cut by a
route).

Marked C{partitions}: not run by C{make test}; C{make partitions} runs them
(root only: without network namespaces the lab fails, it never skips).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from dftx.db.redis import RedisDbDriver
from dftx.harness import RedisCluster, poll
from dftx.harness.netns import PREFIX, Lab, LabUnavailable, sweep
from dftx.sandbox import Deployment

from .faults_common import TABLE, Faulted, tenant_topics

pytestmark = pytest.mark.partitions
aio = pytest_twisted.ensureDeferred

HEARTBEAT_BOUND = 10.0  # [df] zmq_heartbeat_interval + zmq_heartbeat_timeout = 8 s by default
DEGRADED_BOUND = 20.0  # publisher_timeout / 3 (2 s here) + a refresh's retries (3 x 5 s timeout)
PUBLISHER_TIMEOUT = 6  # Deployment's publisher_timeout: rows refreshed every 2 s
DROP_BOUND = 20.0  # publisher_timeout + two discovery intervals (2 s) + slack


def _block(coro: Any) -> Any:
    return pytest_twisted.blockon(defer.ensureDeferred(coro))


def _lab_namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}{pid}-")]


def test_lab_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabUnavailable, match="needs root .* uid 1000"):
        Lab().start()


@pytest.mark.parametrize("ending", ["exit", "sigterm", "kill -9, then a sweep"])
def test_lab_leaves_nothing_behind(ending):
    """A lab in a child process: its namespaces, the processes in them, its
    links and its routes are gone after a normal exit (atexit), a SIGTERM,
    or a kill -9 followed by another lab's sweep."""
    script = (
        "import os, signal, subprocess\n"
        "from dftx.harness.netns import Lab\n"
        "lab = Lab().start()\n"
        "host = lab.host('a')\n"
        "lab.cut(lab.root, host)\n"
        "sleeper = subprocess.Popen([*host.prefix, 'sleep', '600'], stdout=subprocess.DEVNULL,\n"
        "                           stderr=subprocess.DEVNULL)\n"
        "print(os.getpid(), sleeper.pid, flush=True)\n"
        f"if {ending!r} == 'sigterm': os.kill(os.getpid(), signal.SIGTERM)\n"
        f"if {ending!r}.startswith('kill'): os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    pid, sleeper = map(int, child.stdout.split())
    if ending.startswith("kill"):
        assert _lab_namespaces(pid), "a killed lab leaves its namespaces"
        assert set(sweep()) >= {f"{PREFIX}{pid}-a", f"{PREFIX}{pid}-br"}
    assert not _lab_namespaces(pid), child.stderr
    assert not _alive(sleeper)
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert f"dl{pid}" not in routes and "blackhole" not in routes, routes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def lab():
    try:
        lab = Lab().start()
    except LabUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def lab_cluster(lab, tmp_path_factory):
    hosts = [lab.host(f"redis{i + 1}") for i in range(6)]
    cluster = RedisCluster(tmp_path_factory.mktemp("lab-cluster"), hosts=hosts)
    try:
        _block(cluster.start())
        yield cluster
    finally:
        _block(cluster.stop())


async def _empty_table(cluster: RedisCluster) -> None:
    db = RedisDbDriver(hosts=cluster.seeds)
    await db.initialize()
    try:
        await db.delete_table(TABLE)
    finally:
        await db.close()


@pytest_twisted.async_yield_fixture
async def partitioned(request, tmp_path, lab, lab_cluster):
    """A lab deployment under load (ZeroMQ through dfpublisher).  Indirect
    parameter: C{wait_replicas} for the NB writer (the application then has
    no db_restart hook: its losses are what the test measures)."""
    cluster = lab_cluster
    wait_replicas = getattr(request, "param", None)
    topics = await tenant_topics(cluster)
    await _empty_table(cluster)
    d = Deployment(tmp_path, cluster, controllers=2, db_sync_time=600, topics=topics,
                   lab=lab, wait_replicas=wait_replicas or 0)
    f = None
    try:
        await d.start()
        f = Faulted(d, topics, rewrite=wait_replicas is None)
        yield await f.start()
    finally:
        lab.heal()
        if f is not None:
            await f.stop()
        await d.stop()
        for node in cluster.nodes:
            if node.running:
                await node.cli("CONFIG", "SET", "min-replicas-to-write", "0")
        await cluster.repair()
        await cluster.flushall()


def _hosts(d: Deployment) -> dict[str, Any]:
    return {"publisher": d.publisher.host,
            "computes": [c.host for c in d.controllers],
            "redis": [n.host for n in d.cluster.nodes]}


async def _counter(service: Any, name: str) -> int:
    return (await service.json("/v1/status"))["counters"].get(name, 0)


async def _health(service: Any) -> str:
    return (await service.get("/healthz"))[1].decode()


def _say(text: str) -> None:
    print(f"\n{text}", flush=True)


async def _role(node: Any) -> str:
    return (await node.info("replication")).get("role", "")


async def _isolate_a_master(f: Faulted) -> tuple[Any, Any]:
    """Cut the first master off from every other Redis node and from the
    services (the majority side); the NB writer (this process) still
    reaches it.  Wait until its replica took over, then heal.
    @return: (old master, promoted replica)."""
    d, lab = f.d, f.d.lab
    cluster = d.cluster
    master = (await cluster.masters())[0]
    [replica] = await cluster.replicas_of(master)
    hosts = _hosts(d)
    majority = [n.host for n in cluster.nodes if n is not master]
    lab.partition([master.host], [*majority, hosts["publisher"], *hosts["computes"]])
    t0 = time.monotonic()
    await poll(lambda: _is_master(replica), 30, f"{replica.address} promoted")
    promoted = time.monotonic() - t0
    await poll(lambda: _cluster_down(master), 30, f"{master.address} refusing writes")
    await f.load.acked_more(100)  # writes go on at the new master
    lab.heal()
    await cluster.wait_healthy(60)  # the old master rejoined as a replica
    _say(f"isolated master: replica promoted {promoted:.2f}s after the cut")
    return master, replica


async def _is_master(node: Any) -> bool:
    return await _role(node) == "master"


async def _cluster_down(node: Any) -> bool:
    return (await node.info("cluster")).get("cluster_state") == "fail"


@pytest.mark.parametrize("partitioned", [0], indirect=True)
@aio
async def test_isolated_master_wait_replicas_0_loses_acknowledged_writes(partitioned):
    f = partitioned
    await _isolate_a_master(f)
    f.losses_expected = True
    await f.recovered("isolated master, wait_replicas 0", min_resyncs=0)
    # What the isolated master acknowledged before it stepped down is gone.
    assert f.lost, "no acknowledged write was lost: the fault did not happen"
    _say(f"isolated master, wait_replicas 0: {len(f.lost)} acknowledged writes lost")


@pytest.mark.parametrize("partitioned", [1], indirect=True)
@aio
async def test_isolated_master_wait_replicas_1_loses_none(partitioned):
    f = partitioned
    # Redis's advice for bounding the window: a master refuses writes
    # while it has no replica that acknowledged within the lag.
    for node in f.d.cluster.nodes:
        await node.cli("CONFIG", "SET", "min-replicas-to-write", "1")
        await node.cli("CONFIG", "SET", "min-replicas-max-lag", "2")
    refused_before = len(f.load.failed)
    await _isolate_a_master(f)
    await f.recovered("isolated master, wait_replicas 1", min_resyncs=0)
    assert len(f.load.failed) > refused_before  # writes to the isolated master were refused
    assert not f.lost


@aio
async def test_controller_cut_off_from_redis(partitioned):
    f = partitioned
    d, lab = f.d, f.d.lab
    controller = d.controllers[0]
    assert await _health(controller) == "ok\n"
    lab.partition([controller.host], _hosts(d)["redis"])
    t0 = time.monotonic()
    await poll(lambda: _starts(_health(controller), "degraded: NB database"),
               DEGRADED_BOUND, "controller degraded")
    detected = time.monotonic() - t0
    status = await controller.json("/v1/status")
    assert status["degraded"].startswith("NB database") and status["ready"]
    # It keeps serving its cache, and dfpublisher's updates keep coming.
    await f.load.acked_more(100)
    await poll(lambda: _cache_has(controller, f.load.acked), 15, "updates during the cut")
    lab.heal()
    t1 = time.monotonic()
    await poll(lambda: _starts(_health(controller), "ok"), DEGRADED_BOUND, "degraded cleared")
    cleared = time.monotonic() - t1
    _say(f"controller cut off from Redis: degraded {detected:.2f}s after the cut, "
         f"ok {cleared:.2f}s after the heal")
    await f.recovered("controller cut off from Redis", min_resyncs=0)


async def _starts(text: Any, prefix: str) -> bool:
    return (await text).startswith(prefix)


async def _cache_has(controller: Any, acked: dict[str, Any]) -> bool:
    cache = await controller.json(f"/v1/tables/{TABLE}")
    return set(acked) <= set(cache)


@aio
async def test_controller_silently_cut_off_from_dfpublisher(partitioned):
    f = partitioned
    d, lab = f.d, f.d.lab
    controller = d.controllers[0]
    before = await _counter(controller, "subscriber_disconnects")
    lab.partition([controller.host], [d.publisher.host])
    t0 = time.monotonic()
    await poll(lambda: _counter_above(controller, "subscriber_disconnects", before),
               HEARTBEAT_BOUND, "the controller noticing the silent cut")
    detected = time.monotonic() - t0
    await f.load.acked_more(100)  # writes it misses
    lab.heal()
    _say(f"controller silently cut off from dfpublisher: noticed {detected:.2f}s after the cut")
    await f.recovered("controller silently cut off from dfpublisher", min_resyncs=[1, 0])


async def _counter_above(service: Any, name: str, value: int) -> bool:
    return await _counter(service, name) > value


@aio
async def test_dfpublisher_cut_off_from_redis(partitioned):
    """
    dfpublisher's relay needs no Redis, but its registration does: its row
    goes stale after publisher_timeout (6 s here).  The controllers keep it
    while their ZeroMQ connection to it is up (heartbeats prove it alive),
    so updates keep flowing through the cut, nothing is missed and nobody
    resyncs.  (Before that, they dropped it once its row was stale, missed
    what it relayed, and all resynced when it came back.)
    """
    f = partitioned
    d, lab = f.d, f.d.lab
    resyncs = [await _counter(c, "resyncs") for c in d.controllers]
    lab.partition([d.publisher.host], _hosts(d)["redis"])
    t0 = time.monotonic()
    await poll(lambda: _starts(_health(d.publisher), "degraded: NB database"),
               DEGRADED_BOUND, "dfpublisher degraded")
    detected = time.monotonic() - t0
    await poll(lambda: _publisher_row_stale(f), DROP_BOUND, "the publisher row stale")
    await f.load.acked_more(100)
    for controller in d.controllers:
        assert await _subscribed(controller, d.publisher.uri)
        await poll(lambda c=controller: _cache_has(c, f.load.acked), 15,
                   "updates relayed during the cut")
    lab.heal()
    t1 = time.monotonic()
    await poll(lambda: _starts(_health(d.publisher), "ok"), DEGRADED_BOUND, "degraded cleared")
    _say(f"dfpublisher cut off from Redis: degraded {detected:.2f}s after the cut; kept by "
         f"the controllers; ok {time.monotonic() - t1:.2f}s after the heal")
    await f.recovered("dfpublisher cut off from Redis", min_resyncs=0)
    assert [await _counter(c, "resyncs") for c in d.controllers] == resyncs


async def _publisher_row_stale(f: Faulted) -> bool:
    """Whether dfpublisher's registration row is older than publisher_timeout."""
    rows = await f.d.db_table("dftx_publisher")
    [row] = [r for r in rows.values() if r["uri"] == f.d.publisher.uri]
    return time.time() - row["last_activity_timestamp"] > PUBLISHER_TIMEOUT


async def _subscribed(controller: Any, uri: str) -> bool:
    return uri in (await controller.json("/v1/status"))["subscriptions"]["publishers"]


@aio
async def test_asymmetric_cut_between_a_controller_and_a_master(partitioned):
    f = partitioned
    d, lab = f.d, f.d.lab
    controller = d.controllers[0]
    master = (await d.cluster.masters())[0]
    # The controller reaches the master; the master does not reach it back.
    lab.cut(master.host, controller.host)
    errors = await _counter(controller, "resync_errors")
    # Every controller resyncs now: this one cannot read that master's slots.
    await d.nb.db_restart()
    t0 = time.monotonic()
    await poll(lambda: _counter_above(controller, "resync_errors", errors), 30,
               "the controller's resync failing")
    failed = time.monotonic() - t0
    await f.load.acked_more(100)
    lab.heal()
    _say(f"asymmetric cut: the controller's resync failed {failed:.2f}s after the dbrestart "
         f"({await _counter(controller, 'resync_errors') - errors} failed attempts before the heal)")
    await f.recovered("asymmetric cut controller -> master", min_resyncs=1)


@aio
async def test_flapping_compute_link(partitioned):
    f = partitioned
    d, lab = f.d, f.d.lab
    controller = d.controllers[0]
    host = controller.host
    before = (await controller.json("/v1/status"))["counters"]
    for _ in range(30):  # the fault's shape: down 0.5 s, up 0.5 s, for 30 s
        lab.link(host, False)
        await task.deferLater(reactor, 0.5, lambda: None)
        lab.link(host, True)
        await task.deferLater(reactor, 0.5, lambda: None)
    after = (await controller.json("/v1/status"))["counters"]
    _say("flapping link: " + ", ".join(
        f"{k} +{after.get(k, 0) - before.get(k, 0)}"
        for k in ("subscriber_disconnects", "subscriber_gaps", "resyncs", "resync_errors")))
    await f.recovered("compute link down/up every second for 30 s", min_resyncs=0)
