"""
twistd dfpublisher as a real process against the harness's Redis Cluster,
with writer processes pushing over ipc and subscribers in this process.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
import zmq
from twisted.internet import defer

from dftx.codec import encode
from dftx.config import LOCAL_CONTROLLER, NEUTRON_SERVER
from dftx.db.redis import RedisDbDriver
from dftx.harness import ChildProcess, CommandFailed, free_port, poll, run
from dftx.pubsub.zmq import ZmqPubSub
from dftx.pubsub.zmq_socket import ZmqSocket
from dftx.registry import PUBLISHER_TABLE, Discovery, Registration, read_rows
from dftx.update import DbUpdate

from .helpers import Received

TWISTD = str(Path(sys.executable).parent / "twistd")

WRITER = """
import sys
from twisted.internet import defer, task
from dftx.db.redis import RedisDbDriver
from dftx.nb import NbApi
from dftx.pubsub.zmq import ZmqPubSub

async def main(reactor, relay, hosts, name, table, count):
    db = RedisDbDriver(hosts=hosts.split(","))
    await db.initialize()
    pub = ZmqPubSub(relay=relay, linger=10).get_publisher()
    await pub.initialize()
    nb = NbApi(db, pub)
    writes = []
    for i in range(int(count)):
        for topic in ("t1", "t2", None):
            writes.append(nb.create(table, f"{name}-{topic or 'D'}-{i}", "{}", topic))
    await defer.gatherResults(writes)
    await pub.close()
    await db.close()

task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
"""


class DfPublisher:
    """One twistd dfpublisher process and its configuration file."""

    def __init__(self, tmp: Path, seeds: list[str], timeout: int = 30, name: str = "dfpub"):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.ipc_path = self.dir / "run" / "publisher.sock"
        self.ipc = f"ipc://{self.ipc_path}"
        self.uri = f"tcp://127.0.0.1:{self.port}"
        self.config = self.dir / "dftx.ini"
        self.config.write_text(f"""
[df]
nb_db_driver = redis
remote_db_hosts = {",".join(seeds[:2])}
pub_sub_driver = zmq
publisher_timeout = {timeout}   # seconds
[neutron_server]
publisher_port = {self.port}
publisher_bind_address = 127.0.0.1
pub_sub_use_multiproc = true
publisher_multiproc_socket = {self.ipc_path}
http_endpoint = tcp:{self.http_port}:interface=127.0.0.1
""")
        self.process = ChildProcess(
            [TWISTD, "-n", "--pidfile=", "dfpublisher", "--config", str(self.config)],
            self.dir / "twistd.log", self.dir)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await treq.get(self.url(path), persistent=False)
        return response.code, await response.content()

    async def status(self) -> dict:
        code, body = await self.get("/v1/status")
        assert code == 200
        return json.loads(body)

    async def start(self) -> None:
        self.process.start()

        async def healthy():
            if not self.process.running:
                raise RuntimeError(f"exited: {self.process.log_path.read_text()}")
            return (await self.get("/healthz"))[0] == 200
        await poll(healthy, 20, "dfpublisher /healthz 200")

    @property
    def log(self) -> str:
        return self.process.log_path.read_text()


@pytest_twisted.async_yield_fixture
async def db(redis_cluster):
    driver = RedisDbDriver(hosts=redis_cluster.seeds, retries=3)
    await driver.initialize()
    yield driver
    await driver.close()


@pytest_twisted.async_yield_fixture
async def services(tmp_path, redis_cluster):
    started = []

    async def make(**kw) -> DfPublisher:
        svc = DfPublisher(tmp_path, redis_cluster.seeds, name=f"dfpub{len(started)}", **kw)
        started.append(svc)
        await svc.start()
        return svc

    yield make
    for svc in started:
        await svc.process.kill()


async def discovering_subscriber(db, topics, timeout=30, interval=0.2):
    """A controller-side subscriber that finds neutron_server publishers."""
    sub = ZmqPubSub().get_subscriber()
    got = Received()
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=timeout, interval=interval)

    def callback(update):
        got(update)
        disc.observe(update)

    for t in topics:
        await sub.register_topic(t)
    await sub.initialize(callback)
    disc.startService()
    await disc.ready
    return sub, got, disc


async def joined_via_relay(ipc, subs):
    """Push probes through the relay until every subscriber got one per topic."""
    probe = ZmqPubSub(relay=ipc).get_publisher()
    await probe.initialize()
    try:
        for topic, got in subs:
            key = f"~probe-{topic}"

            async def send(topic=topic, got=got, key=key):
                await probe.send_event(DbUpdate("probe", key, "create", "{}", topic))
                return key in got.keys(topic, probes=True)
            await poll(send, 15, f"relay path to subscriber of {topic}")
    finally:
        await probe.close()


@pytest_twisted.ensureDeferred
async def test_bad_config_exits_non_zero_naming_file_section_and_key(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[df]\nnb_db_driver = memory\n[neutron_server]\npublisher_port = 99999\n")
    with pytest.raises(CommandFailed) as info:
        await run([TWISTD, "-n", "--pidfile=", "dfpublisher", "--config", str(bad)])
    message = str(info.value)
    assert "exit code 1" in message
    assert f"{bad}: [neutron_server] publisher_port: 99999 is out of range" in message


@pytest_twisted.ensureDeferred
async def test_two_writers_over_ipc_reach_two_subscribers_each_exactly_its_topics(
        services, db, redis_cluster, unique):
    svc = await services()
    # The registration row: role, uri, refreshed.
    rows = {r.id: r for r in await read_rows(db, NEUTRON_SERVER)}
    me = (await svc.status())["publisher"]["id"]
    assert rows[me].role == NEUTRON_SERVER and rows[me].uri == svc.uri

    # A controller-side publisher on the same host: no conflict, and each
    # side discovers only the other role.
    controller_pub = ZmqPubSub(bind="tcp://127.0.0.1:*").get_publisher()
    await controller_pub.initialize()
    controller_reg = Registration(db, controller_pub.id, controller_pub.uri,
                                  LOCAL_CONTROLLER, timeout=30)
    controller_reg.startService()
    await controller_reg.started
    neutron_side = ZmqPubSub().get_subscriber()
    await neutron_side.initialize(Received())
    neutron_disc = Discovery(db, neutron_side, NEUTRON_SERVER, timeout=30)
    neutron_disc.startService()
    await neutron_disc.ready

    sub1, got1, disc1 = await discovering_subscriber(db, ["t1"])
    sub2, got2, disc2 = await discovering_subscriber(db, ["t2"])
    try:
        assert svc.uri in disc1.connected and svc.uri in disc2.connected
        assert controller_pub.uri not in disc1.connected
        assert controller_pub.uri in neutron_disc.connected
        assert svc.uri not in neutron_disc.connected
        await joined_via_relay(svc.ipc, [("t1", got1), ("t2", got2), ("D", got1), ("D", got2)])

        count = 200
        await defer.gatherResults([
            defer.ensureDeferred(run([sys.executable, "-c", WRITER, svc.ipc,
                                      ",".join(redis_cluster.seeds[:2]), name, unique,
                                      str(count)], timeout=60))
            for name in ("w1", "w2")])

        def done():
            return all(len([k for k in got.keys() if not k.startswith("~")]) >= 2 * count * 2
                       for got in (got1, got2))
        await poll(done, 20, "every update at both subscribers")
        for got, topic, other in ((got1, "t1", "t2"), (got2, "t2", "t1")):
            rows = [u for u in got.updates if u.table == unique]
            assert not [u for u in rows if u.topic == other]
            for name in ("w1", "w2"):
                for t in (topic, "D"):
                    keys = [u.key for u in rows if u.topic == t and u.key.startswith(name)]
                    assert keys == [f"{name}-{t}-{i}" for i in range(count)]
            publishers = {u.publisher for u in rows}
            assert len(publishers) == 2 and None not in publishers  # the writers' ids, kept
        assert got1.updates and sub1.counters["gaps"] == 0 and sub2.counters["gaps"] == 0
        assert len(await db.get_all_keys(unique)) == 2 * count * 3
        status = await svc.status()
        assert status["counters"]["relay_relayed"] >= 2 * count * 3
        code, metrics = await svc.get("/metrics")
        assert code == 200 and b'dftx_relay_messages_total{result="relayed"}' in metrics
    finally:
        for d in (disc1, disc2, neutron_disc):
            await d.stopService()
        for s in (sub1, sub2, neutron_side):
            await s.close()
        await controller_reg.stopService()
        await controller_pub.close()


@pytest_twisted.ensureDeferred
async def test_garbage_on_pull_is_counted_and_dropped(services, db):
    svc = await services()
    sub, got, disc = await discovering_subscriber(db, [])
    raw = ZmqSocket(zmq.PUSH, "raw PUSH")
    raw.connect(svc.ipc)
    try:
        await joined_via_relay(svc.ipc, [("D", got)])
        garbage = [[b"D"], [b"D", b"\xc1"], [b"\xff", b"x"], [b"D", b"a", b"b"]]
        for frames in garbage:
            await raw.send_frames(frames)
        await raw.send_frames([b"D", encode(DbUpdate("x", "after", "create", "{}"))])
        await poll(lambda: "after" in got.keys(), 10, "good message after garbage")
        assert (await svc.status())["counters"]["relay_malformed"] == len(garbage)
        assert sub.counters["undecodable"] == 0
        code, metrics = await svc.get("/metrics")
        assert b'dftx_relay_messages_total{result="malformed"} 4' in metrics
    finally:
        await raw.close(0)
        await disc.stopService()
        await sub.close()


@pytest_twisted.ensureDeferred
async def test_killed_service_goes_stale_is_dropped_and_a_restart_is_found(
        services, db, tmp_path):
    timeout = 2
    first = await services(timeout=timeout)
    first_id = (await first.status())["publisher"]["id"]
    sub, got, disc = await discovering_subscriber(db, [], timeout=timeout)
    try:
        assert first.uri in disc.connected
        stamp = (await _rows(db))[first_id].last_activity_timestamp

        async def refreshed():
            return (await _rows(db))[first_id].last_activity_timestamp > stamp
        await poll(refreshed, 10, "a refresh of the row")

        await first.process.kill()  # kill -9: the row stays, unrefreshed
        await poll(lambda: first.uri not in sub.addresses, 10, "subscriber drops the killed one")
        assert first_id in await db.get_all_keys(PUBLISHER_TABLE)

        # Restarted (same configuration, a new id): it removes the stale row
        # and the subscriber finds it.
        first.process = ChildProcess(first.process.argv, first.dir / "twistd2.log", first.dir)
        await first.start()
        second_id = (await first.status())["publisher"]["id"]
        assert second_id != first_id
        await poll(lambda: _gone(db, first_id), 10, "stale row removed")
        await poll(lambda: first.uri in sub.addresses, 10, "subscriber finds the restart")
        await joined_via_relay(first.ipc, [("D", got)])

        # SIGTERM: row deleted and announced, ipc file removed, exit.
        assert first.ipc_path.exists()
        first.process.signal("TERM")
        await first.process.wait_ended(10)
        assert not first.ipc_path.exists()
        assert await _gone(db, second_id)
        await poll(lambda: first.uri not in sub.addresses, 5, "subscriber drops it")
        assert ("delete", second_id) in [(u.action, u.key) for u in got.updates
                                         if u.table == PUBLISHER_TABLE]
        assert "Traceback" not in first.log
    finally:
        await disc.stopService()
        await sub.close()


async def _rows(db):
    return {r.id: r for r in await read_rows(db, NEUTRON_SERVER)}


async def _gone(db, id) -> bool:
    return id not in await db.get_all_keys(PUBLISHER_TABLE)


def test_both_services_report_the_shared_status_and_their_own(tmp_path):
    """Built (not started) from a memory configuration by the twistd entry
    point, with the reactor it is given: what /v1/status and /metrics show
    before start (the keys doc/publisher.md and doc/controller.md list)."""
    from prometheus_client import REGISTRY, generate_latest
    from twisted.internet.testing import MemoryReactorClock
    from zope.interface.verify import verifyObject

    from dftx import __version__, controller, publisher, runner
    from dftx.http import IStatusSource

    path = tmp_path / "dftx.ini"
    path.write_text("[df]\nnb_db_driver = memory\n[df_local_controller]\nchassis_name = c1\n")
    options = runner.Options()
    options.parseOptions(["--config", str(path)])
    shared = {"role", "version", "ready", "not_ready", "degraded", "publisher", "curve", "cluster",
              "subscriptions", "counters"}
    shared_metrics = [("dftx_ready", "gauge"), ("dftx_build_info", "gauge")]
    histograms = [("dftx_delivery_lag_seconds", "histogram"), ("dftx_resync_seconds", "histogram")]
    for module, own, metrics in (
        (publisher, {"relay", "port_status_rows"},
         [("dftx_relay_messages_total", "counter"), ("dftx_publisher_queued_messages", "gauge"),
          ("dftx_ha_topologies_published_total", "counter"), ("dftx_port_status_rows", "gauge"),
          ("dftx_registry_refreshes_total", "counter"),
          ("dftx_registry_stale_removed_total", "counter"), *histograms]),
        (controller, {"chassis", "cache", "ports_online", "resync_spread"},
         [("dftx_cache_rows", "gauge"), ("dftx_subscriber_messages_total", "counter"),
          ("dftx_resyncs_total", "counter"), ("dftx_cache_changes_total", "counter"),
          ("dftx_ports_online", "gauge"), ("dftx_port_status_writes_total", "counter"),
          *histograms, ("dftx_nb_write_seconds", "histogram"),
          ("dftx_nb_publish_seconds", "histogram")]),
    ):
        reactor = MemoryReactorClock()
        svc = module.makeService(options, reactor)
        assert svc.reactor is reactor and svc.mirror.cache is not None
        assert verifyObject(IStatusSource, svc)
        status = svc.status()
        assert set(status) == shared | own
        assert status["role"] == svc.role and status["not_ready"] == "starting"
        assert status["version"] == __version__
        text = generate_latest(svc.registry).decode()
        assert _types(text, "dftx_") == [*shared_metrics, *metrics]
        assert f'dftx_build_info{{version="{__version__}"}} 1.0' in text
        assert f'dftx_ready{{role="{svc.role}"}} 0.0' in text
        # The process metrics of a default prometheus_client registry.
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
                "process_open_fds", "python_info",
                "python_gc_collections_total"} <= {n for n, _ in _types(text, "p")}
    # Nothing on prometheus_client's global registry: each service has its own.
    assert not [m for m in REGISTRY.collect() if m.name.startswith("dftx")]
    (tmp_path / "bad.ini").write_text("[df]\nnb_db_driver = mysql\n")
    options.parseOptions(["--config", str(tmp_path / "bad.ini")])
    with pytest.raises(SystemExit, match="dfpublisher: bad configuration"):
        publisher.makeService(options, MemoryReactorClock())


def _types(text: str, prefix: str) -> list[tuple[str, str]]:
    """The (name, type) of each metric family in the exposition C{text}
    whose name starts with C{prefix}, in order (without the C{_created}
    gauges prometheus_client adds)."""
    return [(n, t) for n, t in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
            if n.startswith(prefix) and not n.endswith("_created")]


async def _samples(svc, accept: str | None = None) -> dict[tuple, float]:
    """The samples of C{svc}'s /metrics: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await treq.get(svc.url("/metrics"), persistent=False,
                              headers={"Accept": accept} if accept else None)
    assert response.code == 200
    text = (await response.content()).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest_twisted.ensureDeferred
async def test_latency_histograms_of_a_deployment(tmp_path, redis_cluster, unique):
    """In a deployment (dfpublisher, a controller with its ovsdb-server, an
    NbApi writer through the relay): each histogram counts what happened,
    and each service's /metrics shows only its own metrics."""
    from dftx import __version__
    from dftx.sandbox import Deployment

    d = Deployment(tmp_path, redis_cluster, controllers=1)
    await d.start()
    try:
        controller, ovsdb = d.controllers[0], d.ovsdbs[0]
        lag = ("dftx_delivery_lag_seconds_count", ())
        numbers = itertools.count()

        async def write_until_observed(svc, write) -> None:
            """Write again until C{svc} has observed one delivery lag (a
            ZeroMQ subscriber may miss what is sent while it joins)."""
            async def observed():
                await write(next(numbers))
                return (await _samples(svc))[lag] >= 1
            await poll(observed, 30, "a delivery lag observed", interval=0.5)

        # NB writes from NbApi through the relay, to the controller.
        await write_until_observed(
            controller, lambda n: d.nb.create("lport", f"{unique}-{n}", "{}"))
        await d.wait_converged("lport")
        # VM ports: the controller writes their port_status rows through its
        # NbApi and publishes them, to dfpublisher.
        await write_until_observed(d.publisher, lambda n: ovsdb.vsctl(
            "add-port", "br-int", f"tap{n}", "--", "set", "Interface", f"tap{n}",
            f"external_ids:iface-id={unique}-{n}"))
        c = await _samples(controller)
        p = await _samples(d.publisher)
        # The initial load is a resync; none failed.
        assert c[("dftx_resync_seconds_count", (("result", "ok"),))] >= 1
        assert c[("dftx_resync_seconds_count", (("result", "error"),))] == 0
        # Its own rows through NbApi: the chassis row and the port's row.
        writes = c[("dftx_nb_write_seconds_count", ())]
        assert writes >= 2 and c[("dftx_nb_publish_seconds_count", ())] == writes
        assert c[("dftx_nb_publish_seconds_sum", ())] <= c[("dftx_nb_write_seconds_sum", ())]
        assert p[("dftx_resync_seconds_count", (("result", "ok"),))] >= 1
        for samples, role in ((c, "df_local_controller"), (p, "neutron_server")):
            assert samples[("dftx_build_info", (("version", __version__),))] == 1
            assert samples[("dftx_ready", (("role", role),))] == 1
            assert samples[("process_cpu_seconds_total", ())] > 0
        assert ("dftx_cache_rows", (("table", "lport"),)) in c
        assert not [k for k in p if k[0].startswith(("dftx_cache", "dftx_nb_"))]
        assert not [k for k in c if k[0].startswith(("dftx_relay", "dftx_registry"))]
        # OpenMetrics when the scraper asks for it.
        response = await treq.get(controller.url("/metrics"), persistent=False,
                                  headers={"Accept": "application/openmetrics-text"})
        assert response.headers.getRawHeaders("content-type")[0].startswith(
            "application/openmetrics-text")
        assert (await response.content()).endswith(b"# EOF\n")
    finally:
        await d.stop()


def test_delivery_lag_needs_the_send_time_and_ignores_clock_skew(tmp_path):
    """Updates without a send time (Dragonflow's, older dftx's) are not
    observed; one sent "in the future" (the sender's clock ahead) counts as
    no lag."""
    from twisted.internet.testing import MemoryReactorClock

    from dftx.publisher import PublisherService
    from dftx.config import parse

    reactor = MemoryReactorClock()
    reactor.advance(1000.0)
    svc = PublisherService(parse("[df]\nnb_db_driver = memory\n"), reactor)

    def lag() -> tuple[float, float]:
        return (svc.registry.get_sample_value("dftx_delivery_lag_seconds_count"),
                svc.registry.get_sample_value("dftx_delivery_lag_seconds_sum"))

    svc._delivered(DbUpdate("port_status", "p", "create", "{}"))
    assert lag() == (0, 0)
    svc._delivered(DbUpdate("port_status", "p", "create", "{}", sent=999.75))
    svc._delivered(DbUpdate("port_status", "p", "create", "{}", sent=1002.0))
    assert lag() == (2, 0.25)
    assert svc.registry.get_sample_value(
        "dftx_delivery_lag_seconds_bucket", {"le": "0.25"}) == 2


def test_the_operator_guide_lists_every_metric_and_alerts_on_real_ones(tmp_path):
    """doc/operator.md: its metrics table has every dftx_ metric the two
    services export, and its scrape config and alert rules are YAML whose
    expressions name only metrics that exist."""
    import yaml
    from prometheus_client import generate_latest
    from twisted.internet.testing import MemoryReactorClock

    from dftx.config import parse
    from dftx.controller import ControllerService
    from dftx.publisher import PublisherService

    cfg = parse("[df]\nnb_db_driver = memory\n[df_local_controller]\nchassis_name = c1\n")
    exported = set()
    for factory in (PublisherService, ControllerService):
        text = generate_latest(factory(cfg, MemoryReactorClock()).registry).decode()
        exported |= {n for n, _ in _types(text, "dftx_")}
    guide = (Path(__file__).resolve().parent.parent / "doc" / "operator.md").read_text()
    listed = set(re.findall(r"^\| `(dftx_\w+)` \|", guide, re.M))
    assert listed == exported
    scrape, rules = [yaml.safe_load(block)
                     for block in re.findall(r"```yaml\n(.*?)```", guide, re.S)]
    assert [job["job_name"] for job in scrape["scrape_configs"]] == ["dfpublisher",
                                                                    "dfcontroller"]
    alerts = {r["alert"]: r["expr"] for group in rules["groups"] for r in group["rules"]}
    assert {"DftxNotReady", "DftxSeqGapsRising", "DftxResyncErrors",
            "DftxPublisherQueueGrowing", "DftxDeliveryLagHigh"} <= set(alerts)
    for name, expr in alerts.items():
        for metric in re.findall(r"\bdftx_\w+", expr):
            assert re.sub(r"_(bucket|count|sum)$", "", metric) in exported, (name, metric)
