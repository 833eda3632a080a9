"""
Security (doc/security.md): ZeroMQ CURVE with the reactor's ZAP handler on
real sockets and in a real dfpublisher, key files and their configuration
errors, HTTP on loopback by default, and no password or secret key in
logs, /v1/status or error messages.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import pytest_twisted
import zmq
import zmq.auth
from twisted.internet import endpoints, reactor
from twisted.logger import globalLogPublisher

from dftx import cli
from dftx import config as dfconfig
from dftx.config import LOCAL_CONTROLLER, NEUTRON_SERVER
from dftx.db.memory import MemoryDbDriver
from dftx.db.redis import RedisDbDriver
from dftx.errors import ConfigError, DBConnectionError, PublishError, SubscribeError
from dftx.pubsub import curve
from dftx.pubsub.curve import CurveSettings, KeyPair, load_key_pair, load_public_keys
from dftx.harness import DftxService, free_port, poll
from dftx.pubsub.zmq import ZmqPubSub
from dftx.pubsub.zmq_relay import ZmqRelay
from dftx.registry import Discovery, Registration, read_rows

from .helpers import Received, joined, row

aio = pytest_twisted.ensureDeferred
ANY_PORT = "tcp://127.0.0.1:*"
PASSWORD = "pw-5f3a9c-never-logged"


def pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def settings(keys: KeyPair, allowed=(), servers=None) -> CurveSettings:
    return CurveSettings(keys, frozenset(k.public for k in allowed),
                         None if servers is None else frozenset(k.public for k in servers))


async def curve_publisher(server: KeyPair, allowed):
    pub = ZmqPubSub(bind=ANY_PORT, curve=settings(server, allowed)).get_publisher()
    await pub.initialize()
    return pub


async def curve_subscriber(uri, keys: KeyPair | None, server_key: bytes | None):
    sub = ZmqPubSub(curve=None if keys is None else settings(keys)).get_subscriber()
    got = Received()
    await sub.initialize(got)
    if keys is None:
        await sub.register_listen_address(uri)
    else:
        await sub.register_listen_address(uri, server_key=server_key)
    return sub, got


async def refused(pub, good, bad_subs):
    """Every bad subscriber has failed a handshake and, while the good one
    receives message after message, none of them gets anything."""
    await poll(lambda: all(s.counters["handshake_failures"] >= 1 for s, _ in bad_subs), 10,
               "every bad subscriber tried and failed a handshake")
    for i in range(5):
        await pub.send_event(row(f"after-{i}"))
        await poll(lambda i=i: f"after-{i}" in good.keys(), 10, f"good subscriber gets after-{i}")
    for sub, got in bad_subs:
        assert got.updates == [], got.updates  # not even a sync
        assert sub.counters["delivered"] == 0


@aio
async def test_only_allowed_clients_expecting_the_right_server_key_receive():
    server, good_keys, stranger = pair(), pair(), pair()
    pub = await curve_publisher(server, [good_keys])
    good, good_got = await curve_subscriber(pub.uri, good_keys, server.public)
    keyless = await curve_subscriber(pub.uri, None, None)
    unknown = await curve_subscriber(pub.uri, stranger, server.public)
    wrong_server = await curve_subscriber(pub.uri, good_keys, pair().public)
    try:
        await joined(pub, good_got)
        await refused(pub, good_got, [keyless, unknown, wrong_server])
        counters = pub.curve_counters
        assert counters["allowed"] >= 1 and counters["denied"] >= 1  # the stranger's key
    finally:
        for sub, _ in (keyless, unknown, wrong_server, (good, None)):
            await sub.close()
        await pub.close()
    assert curve.zap_handler().domains.get(pub.curve_domain) is None


@aio
async def test_one_subscriber_many_publishers_each_with_its_own_server_key():
    client = pair()
    servers = [pair(), pair()]
    pubs = [await curve_publisher(s, [client]) for s in servers]
    sub = ZmqPubSub(curve=settings(client)).get_subscriber()
    got = Received()
    await sub.initialize(got)
    try:
        for p, s in zip(pubs, servers):
            await sub.register_listen_address(p.uri, server_key=s.public.decode())
        for n, p in enumerate(pubs):
            await joined(p, got, key=f"from{n}")
        # A publisher's allowed list is its own: a second client key is
        # refused by one and served by the other.
        other = pair()
        pub3 = await curve_publisher(pair(), [other])
        try:
            with pytest.raises(SubscribeError):  # no key given and no trusted list
                await sub.register_listen_address(pub3.uri)
            await sub.register_listen_address(pub3.uri, server_key=pub3.public_key)
            await refused(pubs[0], got, [])
            await poll(lambda: sub.counters["handshake_failures"] >= 1, 10,
                       "refused by the third publisher")
        finally:
            await pub3.close()
    finally:
        await sub.close()
        for p in pubs:
            await p.close()


@aio
async def test_a_tcp_relay_with_curve_takes_only_keyed_pushers():
    relay_keys, worker_keys, stranger = pair(), pair(), pair()
    out = await curve_publisher(pair(), [worker_keys])
    sub, got = await curve_subscriber(out.uri, worker_keys, out.curve.keys.public)
    relay = ZmqRelay(ANY_PORT, out, curve=settings(relay_keys, [worker_keys]))
    relay.start()
    address = relay._socket.socket.get(zmq.LAST_ENDPOINT).decode()
    good = ZmqPubSub(relay=address, curve=settings(worker_keys),
                     relay_server_key=relay_keys.public).get_publisher()
    await good.initialize()
    strangers = [ZmqPubSub(relay=address, linger=0.1).get_publisher(),
                 ZmqPubSub(relay=address, curve=settings(stranger), linger=0.1,
                           relay_server_key=relay_keys.public).get_publisher()]
    for p in strangers:
        await p.initialize()
    try:
        with pytest.raises(PublishError):  # CURVE over tcp without the relay's key
            await ZmqPubSub(relay=address, curve=settings(worker_keys)).get_publisher() \
                .initialize()
        await joined(good, got)
        for n, p in enumerate(strangers):
            p.send_event(row(f"stranger{n}")).addErrback(lambda f: None)
        for i in range(5):
            await good.send_event(row(f"pushed-{i}"))
        await poll(lambda: "pushed-4" in got.keys(), 10, "keyed pushes relayed")
        await poll(lambda: relay.curve and curve.zap_handler().counters[
            relay.curve_domain]["denied"] >= 1, 10, "the stranger's key refused")
        assert not [k for k in got.keys() if k.startswith("stranger")]
        assert all(p.queued == 1 for p in strangers)  # never taken
    finally:
        for p in [good, *strangers]:
            await p.close()
        await relay.close()
        await sub.close()
        await out.close()


@aio
async def test_discovery_takes_the_server_key_from_the_registry_row_and_trusts_the_list():
    db = MemoryDbDriver()
    await db.initialize()
    client, server, rogue = pair(), pair(), pair()
    pub = await curve_publisher(server, [client])
    reg = Registration(db, pub.id, pub.uri, NEUTRON_SERVER, timeout=30,
                       curve_public_key=pub.public_key)
    reg.startService()
    await reg.started
    assert [r.curve_public_key for r in await read_rows(db, NEUTRON_SERVER)] == [
        server.public.decode()]
    sub = ZmqPubSub(curve=settings(client)).get_subscriber()
    got = Received()
    await sub.initialize(got)
    disc = Discovery(db, sub, LOCAL_CONTROLLER, timeout=30)
    disc.startService()
    # With a trusted list that lacks the row's key, the publisher is not used.
    picky = ZmqPubSub(curve=settings(client, servers=[rogue])).get_subscriber()
    await picky.initialize(Received())
    picky_disc = Discovery(db, picky, LOCAL_CONTROLLER, timeout=30)
    picky_disc.startService()
    try:
        await disc.ready
        await picky_disc.ready
        assert disc.connected == {pub.uri} and disc.keys[pub.uri] == pub.public_key
        await joined(pub, got)
        assert picky_disc.connected == set() and picky.addresses == set()
    finally:
        for d in (disc, picky_disc):
            await d.stopService()
        await sub.close()
        await picky.close()
        await reg.stopService()
        await pub.close()


@aio
async def test_key_files_of_zmq_auth_and_bare_z85(tmp_path):
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    expected_public, expected_secret = zmq.auth.load_certificate(secret_file)
    keys = load_key_pair(secret_file)
    assert (keys.public, keys.secret) == (expected_public, expected_secret)
    assert expected_secret.decode() not in repr(keys)
    assert load_public_keys(public_file) == {expected_public}
    bare = tmp_path / "bare.secret"
    bare.write_bytes(expected_secret + b"\n")
    assert load_key_pair(str(bare)) == keys
    # A directory: every *.key, never the secret files beside them.
    zmq.auth.create_certificates(str(tmp_path), "client")
    assert len(load_public_keys(str(tmp_path))) == 2
    # dftx curve-keygen writes the same format, secret file 0600.
    out = io.StringIO()
    code = await cli.run(["curve-keygen", str(tmp_path / "gen"), "--name", "c1"], out)
    assert code == 0
    made = load_key_pair(str(tmp_path / "gen" / "c1.key_secret"))
    assert zmq.auth.load_certificate(str(tmp_path / "gen" / "c1.key")) == (made.public, None)
    assert os.stat(tmp_path / "gen" / "c1.key_secret").st_mode & 0o777 == 0o600
    assert made.public.decode() in out.getvalue() and made.secret.decode() not in out.getvalue()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_errors_name_file_section_key_and_never_quote_the_secret(tmp_path):
    _, secret_file = zmq.auth.create_certificates(str(tmp_path), "me")
    public_file = str(tmp_path / "me.key")
    secret_text = load_key_pair(secret_file).secret.decode()
    base = "[df]\nnb_db_driver = memory\n"
    good = base + (f"zmq_curve = true\nzmq_curve_secret_key_file = {secret_file}\n"
                   f"zmq_curve_allowed_keys = {tmp_path}\n")
    cfg = dfconfig.load(write(tmp_path / "good.ini", good), NEUTRON_SERVER)
    made = CurveSettings.from_config(cfg)
    assert made is not None and made.keys == load_key_pair(secret_file)
    assert secret_text not in repr(cfg) and secret_text not in repr(made)

    broken = tmp_path / "broken.key_secret"
    broken.write_text(f'curve\n    secret-key = "{secret_text[:-3]}"\n')
    mismatched = tmp_path / "mismatched.key_secret"
    other_public = zmq.curve_keypair()[0].decode()
    mismatched.write_text(f'curve\n    public-key = "{other_public}"\n'
                          f'    secret-key = "{secret_text}"\n')
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        ("zmq_curve_secret_key_file", str(tmp_path / "missing.key_secret"), "cannot read"),
        ("zmq_curve_secret_key_file", str(broken), "not a z85 CURVE key"),
        ("zmq_curve_secret_key_file", str(mismatched), "does not belong"),
        ("zmq_curve_secret_key_file", public_file, "no CURVE secret key"),
        ("zmq_curve_allowed_keys", str(empty_dir), "no *.key file"),
        ("zmq_curve_server_keys", str(tmp_path / "nope"), "cannot read"),
    ]
    for key, value, reason in cases:
        path = write(tmp_path / f"{key}.ini", f"{base}{key} = {value}\n")
        with pytest.raises(ConfigError) as info:
            dfconfig.load(path, NEUTRON_SERVER)
        message = str(info.value)
        assert message.startswith(f"{path}: [df] {key}: ") and reason in message, message
        assert secret_text[:20] not in message and secret_text[-20:] not in message
    for missing in ("zmq_curve_secret_key_file", "zmq_curve_allowed_keys"):
        text = "".join(line + "\n" for line in good.splitlines() if not line.startswith(missing))
        path = write(tmp_path / "missing.ini", text)
        with pytest.raises(ConfigError, match=rf"\[df\] {missing}: required when zmq_curve"):
            dfconfig.load(path, NEUTRON_SERVER)
    path = write(tmp_path / "redis.ini", good.replace(
        "nb_db_driver = memory", "nb_db_driver = memory\npub_sub_driver = redis\n"
        "remote_db_hosts = 127.0.0.1:7000"))
    with pytest.raises(ConfigError, match=r"\[df\] zmq_curve: only with pub_sub_driver = zmq"):
        dfconfig.load(path, NEUTRON_SERVER)


def test_a_malformed_line_with_a_password_is_not_quoted(tmp_path):
    for text in (f"[df_redis]\npassword {PASSWORD}\n", f"password = {PASSWORD}\n"):
        path = write(tmp_path / "bad.ini", text)
        with pytest.raises(ConfigError) as info:
            dfconfig.load(path, NEUTRON_SERVER)
        assert str(info.value).startswith(f"{path}: line ") and PASSWORD not in str(info.value)
    path = write(tmp_path / "bad.ini", "[df]\nnb_db_driver\n")
    with pytest.raises(ConfigError, match="cannot parse 'nb_db_driver'"):
        dfconfig.load(path, NEUTRON_SERVER)


def test_http_and_publishers_default_to_loopback():
    cfg = dfconfig.parse("[df]\nnb_db_driver = memory\n[df_local_controller]\n"
                         "chassis_name = c1\n")
    for section in (cfg.neutron_server, cfg.df_local_controller):
        endpoint = endpoints.serverFromString(reactor, section.http_endpoint)
        assert isinstance(endpoint, endpoints.TCP4ServerEndpoint)
        assert endpoint._interface == "127.0.0.1"
        assert section.publisher_bind_address == "127.0.0.1"
    # Binding elsewhere is a choice written in the file (no interface=:
    # every address), accepted as configured.
    wide = dfconfig.parse("[df]\nnb_db_driver = memory\n[neutron_server]\n"
                          "http_endpoint = tcp:8080\n")
    assert endpoints.serverFromString(reactor, wide.neutron_server.http_endpoint)._interface == ""


# --- a real dfpublisher: CURVE, an ACL user's password, nothing leaked ------------------

@pytest_twisted.async_yield_fixture
async def acl_user(redis_cluster, unique):
    """An ACL user with PASSWORD on every node of the cluster (the default
    user is left as it is, so other tests are not affected)."""
    name = f"u{unique}"

    async def every_node(*args):
        for node in redis_cluster.nodes:
            if node.running:
                await node.cli(*args)

    await every_node("ACL", "SETUSER", name, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    yield name
    await every_node("ACL", "DELUSER", name)


class Logged:
    """Every event of the global log publisher, as text."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(repr(event))

    @property
    def text(self):
        return "\n".join(self.events)


def service(tmp_path: Path, name: str, seeds, df: str, redis: str) -> DftxService:
    directory = tmp_path / name
    directory.mkdir()
    http_port, port = free_port(), free_port()
    svc = DftxService("dfpublisher", directory, f"""\
[df]
nb_db_driver = redis
remote_db_hosts = {','.join(seeds[:2])}
pub_sub_driver = zmq
publisher_timeout = 30
{df}
[df_redis]
{redis}
[neutron_server]
publisher_port = {port}
publisher_multiproc_socket = {directory / "publisher.sock"}
http_endpoint = tcp:{http_port}:interface=127.0.0.1
""", http_port)
    svc.uri = f"tcp://127.0.0.1:{port}"
    svc.ipc = f"ipc://{directory / 'publisher.sock'}"
    return svc


@aio
async def test_dfpublisher_with_curve_and_a_password_serves_keyed_subscribers_only_and_leaks_nothing(
        tmp_path, redis_cluster, acl_user):
    keys = tmp_path / "keys"
    keys.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "dfpublisher")
    _, client_secret = zmq.auth.create_certificates(str(keys), "compute1")
    os.chmod(server_secret, 0o600)
    server_keys, client_keys = load_key_pair(server_secret), load_key_pair(client_secret)
    secrets = [PASSWORD, server_keys.secret.decode(), client_keys.secret.decode()]
    logged = Logged()
    globalLogPublisher.addObserver(logged)
    svc = service(tmp_path, "dfpub", redis_cluster.seeds,
                  f"zmq_curve = true\nzmq_curve_secret_key_file = {server_secret}\n"
                  f"zmq_curve_allowed_keys = {keys}\n",
                  f"username = {acl_user}\npassword = {PASSWORD}\n")
    db = RedisDbDriver(hosts=redis_cluster.seeds, username=acl_user, password=PASSWORD)
    subs = []
    try:
        await svc.start()
        await db.initialize()
        status = await svc.json("/v1/status")
        assert status["curve"]["public_key"] == server_keys.public.decode()
        assert status["curve"]["allowed_client_keys"] == 2
        rows = {r.id: r for r in await read_rows(db, NEUTRON_SERVER)}
        assert rows[status["publisher"]["id"]].curve_public_key == server_keys.public.decode()

        # A controller-side subscriber with its key pair finds it through the
        # table (the row's key) and receives what workers push over ipc.
        keyed = ZmqPubSub(curve=CurveSettings(client_keys, frozenset())).get_subscriber()
        got = Received()
        disc = Discovery(db, keyed, LOCAL_CONTROLLER, timeout=30)

        def callback(update):
            got(update)
            disc.observe(update)
        await keyed.initialize(callback)
        disc.startService()
        await disc.ready
        subs.append((keyed, disc))
        assert svc.uri in keyed.addresses
        keyless = ZmqPubSub().get_subscriber()
        keyless_got = Received()
        await keyless.initialize(keyless_got)
        await keyless.register_listen_address(svc.uri)
        subs.append((keyless, None))
        worker = ZmqPubSub(relay=svc.ipc).get_publisher()
        await worker.initialize()
        try:
            await joined(worker, got)
            await poll(lambda: keyless.counters["handshake_failures"] >= 1, 10,
                       "the keyless subscriber is refused")
            for i in range(3):
                await worker.send_event(row(f"w{i}"))
                await poll(lambda i=i: f"w{i}" in got.keys(), 10, f"w{i} at the keyed subscriber")
            assert keyless_got.updates == []
        finally:
            await worker.close()
        status = await svc.json("/v1/status")
        assert status["curve"]["clients"]["allowed"] >= 1
        assert status["curve"]["clients"]["denied"] == 0  # keyless: no CURVE, no ZAP request
        status_text = json.dumps(status)
        code, metrics = await svc.get("/metrics")
        assert code == 200
        await svc.stop()
        # The same service with a wrong password: it cannot start and says
        # so, without the password it was given.
        wrong = service(tmp_path, "dfpub-wrong", redis_cluster.seeds, "",
                        f"username = {acl_user}\npassword = {PASSWORD}-wrong\nretries = 1\n")
        wrong.process.start()
        await wrong.process.wait_ended(30)
        assert "dfpublisher cannot start" in wrong.log and "WRONGPASS" in wrong.log
        failed_text = wrong.log
        # In this process: a failed connect's error and the settings' repr.
        bad = RedisDbDriver(hosts=redis_cluster.seeds[:1], retries=1, username=acl_user,
                            password=PASSWORD + "-wrong")
        with pytest.raises(DBConnectionError) as bad_info:
            await bad.initialize()
        await bad.close()
        cfg = dfconfig.load(svc.config, NEUTRON_SERVER)
        texts = {
            "dfpublisher log": svc.log, "/v1/status": status_text,
            "/metrics": metrics.decode(), "failed start": failed_text,
            "connect error": str(bad_info.value) + repr(bad_info.value),
            "config repr": repr(cfg) + repr(CurveSettings.from_config(cfg)),
            "this process's log": logged.text,
        }
        assert cfg.df_redis.password == PASSWORD  # it was there to leak
        for where, text in texts.items():
            for secret in secrets + [PASSWORD + "-wrong"]:
                assert secret not in text, f"{where} shows a secret"
    finally:
        globalLogPublisher.removeObserver(logged)
        for sub, disc in subs:
            if disc is not None:
                await disc.stopService()
            await sub.close()
        await db.close()
        await svc.kill()


@aio
async def test_dfpublisher_and_dfcontroller_with_curve_both_ways(
        tmp_path, redis_cluster, ovsdb_server, unique):
    """Each service allows the other's key (one directory of public keys):
    NB updates reach the controller, its port status reaches dfpublisher."""
    secret_dir, public_dir = tmp_path / "secret", tmp_path / "public"
    secret_dir.mkdir()
    public_dir.mkdir()
    out = io.StringIO()
    for name in ("dfpublisher", "compute1"):
        assert await cli.run(["curve-keygen", str(secret_dir), "--name", name], out) == 0
        os.rename(secret_dir / f"{name}.key", public_dir / f"{name}.key")

    def curve_keys(name):
        return (f"zmq_curve = true\nzmq_curve_secret_key_file = {secret_dir}/{name}.key_secret\n"
                f"zmq_curve_allowed_keys = {public_dir}\n")
    await ovsdb_server.vsctl("add-br", "br-int")
    publisher = service(tmp_path, "dfpub", redis_cluster.seeds, curve_keys("dfpublisher"), "")
    http_port, port = free_port(), free_port()
    controller = DftxService("dfcontroller", tmp_path / "compute1", f"""\
[df]
nb_db_driver = redis
remote_db_hosts = {','.join(redis_cluster.seeds[:2])}
pub_sub_driver = zmq
publisher_timeout = 30
{curve_keys("compute1")}
[df_local_controller]
chassis_name = compute1-{unique}
publisher_port = {port}
ovsdb_connection = {ovsdb_server.tcp}
tables = lport
db_sync_time = 120
http_endpoint = tcp:{http_port}:interface=127.0.0.1
""", http_port)
    db = RedisDbDriver(hosts=redis_cluster.seeds)
    worker = None
    try:
        await publisher.start()
        await controller.start()
        await db.initialize()
        from dftx.nb import NbApi

        worker = ZmqPubSub(relay=publisher.ipc).get_publisher()
        await worker.initialize()
        nb = NbApi(db, worker)
        await poll(lambda: _connected(controller, publisher.uri), 15,
                   "the controller found dfpublisher")
        n = 0

        async def arrived():
            nonlocal n
            n += 1
            await nb.create("lport", f"{unique}-{n}", json.dumps({"n": n}))
            return f"{unique}-{n}" in await controller.json("/v1/tables/lport")
        await poll(arrived, 20, "an NB update at the controller through CURVE")
        status = await controller.json("/v1/status")
        assert status["counters"]["subscriber_delivered"] >= 1
        assert status["counters"].get("subscriber_handshake_failures", 0) == 0
        assert status["curve"]["public_key"]

        await ovsdb_server.vsctl(
            "add-port", "br-int", "tap1", "--", "set", "Interface", "tap1",
            f"external_ids:iface-id={unique}-vm", "external_ids:attached-mac=fa:16:3e:00:00:01")

        async def neutron_side():
            table = await publisher.json("/v1/tables/port_status")
            return table.get(f"{unique}-vm", {}).get("status") == "up"
        await poll(neutron_side, 20, "port status at dfpublisher through CURVE")
        pub_status = await publisher.json("/v1/status")
        assert pub_status["curve"]["clients"]["allowed"] >= 1
        assert pub_status["counters"].get("subscriber_handshake_failures", 0) == 0
        for svc in (publisher, controller):
            assert "secret-key" not in svc.log and "Traceback" not in svc.log
    finally:
        if worker is not None:
            await worker.close()
        await db.close()
        for svc in (controller, publisher):
            await svc.kill()


async def _connected(svc, uri):
    status = await svc.json("/v1/status")
    return uri in status["subscriptions"]["publishers"]
