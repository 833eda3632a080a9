"""From configured hosts and discovered addresses to client endpoints, and
TLS options (against an in-process TLS server)."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, endpoints, protocol, reactor, ssl

from dftx.db.redis import RedisDbDriver
from dftx.endpoints import TLSOptions, client_endpoint, tls_from_config
from dftx.redis.endpoints import NodeEndpoints
from dftx.harness import RedisServer


def test_seed_addresses_of_every_form():
    e = NodeEndpoints([
        "127.0.0.1:7000",
        "[::1]:7001",
        "redis.example:7002",
        "tcp:host=10.0.0.1:port=7003",
        "tcp:10.0.0.2:7004:timeout=3",
        r"ssl:host=fe80\:\:1:port=7005:caCertsDir=/etc/ca",
        "unix:/run/redis.sock",
        "unix:path=/run/other.sock",
    ], reactor)
    assert e.seeds == [
        "127.0.0.1:7000", "[::1]:7001", "redis.example:7002", "10.0.0.1:7003",
        "10.0.0.2:7004", "[fe80::1]:7005", "unix:/run/redis.sock", "unix:/run/other.sock",
    ]


@pytest.mark.parametrize("bad", ["", "nohost", "127.0.0.1", "h:0", "tcp:host=h", "unix:"])
def test_bad_hosts_are_refused(bad):
    with pytest.raises(ValueError):
        NodeEndpoints([bad], reactor)
    with pytest.raises(ValueError):
        NodeEndpoints([], reactor)


def test_plain_hosts_use_tcp_or_hostname_endpoints():
    e = NodeEndpoints(["127.0.0.1:7000"], reactor)
    assert isinstance(e.endpoint("127.0.0.1:7001"), endpoints.TCP4ClientEndpoint)
    assert isinstance(e.endpoint("[::1]:7001"), endpoints.TCP6ClientEndpoint)
    assert isinstance(e.endpoint("redis.example:7001"), endpoints.HostnameEndpoint)


def test_discovered_nodes_are_reached_like_the_first_endpoint_string():
    e = NodeEndpoints([r"ssl:host=10.0.0.1:port=7000:caCertsDir=/etc/ca:certKey=/c\:x.pem"],
                      reactor, timeout=2)
    # Same scheme and options; the certificate is checked against each
    # node's own host unless the seed names a hostname.
    assert e.description("10.0.0.9:7003") == (
        r"ssl:host=10.0.0.9:port=7003:caCertsDir=/etc/ca:certKey=/c\:x.pem"
        ":hostname=10.0.0.9:timeout=2"
    )
    named = NodeEndpoints(["ssl:10.0.0.1:7000:hostname=redis.example:timeout=9"], reactor)
    assert named.description("[fe80::2]:7001") == (
        r"ssl:host=fe80\:\:2:port=7001:hostname=redis.example:timeout=9"
    )


@pytest_twisted.ensureDeferred
async def test_single_server_on_a_unix_socket(tmp_path, unique):
    sock = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, extra_args=["--unixsocket", str(sock)])
    await server.start()
    try:
        driver = RedisDbDriver([f"unix:path={sock}"])
        await driver.initialize()
        try:
            assert driver.client.topology.masters == [f"unix:{sock}"]
            await driver.create_key(unique, "k", "v", topic="t")
            assert await driver.get_key(unique, "k") == "v"
            assert await server.cli("GET", f"{{{unique}.t}}k") == "v"
        finally:
            await driver.close()
    finally:
        await server.kill()


def test_client_endpoint_of_one_host():
    assert isinstance(client_endpoint(reactor, "127.0.0.1:6640"), endpoints.TCP4ClientEndpoint)
    assert isinstance(client_endpoint(reactor, "tcp:127.0.0.1:6640"), endpoints.TCP4ClientEndpoint)
    assert isinstance(client_endpoint(reactor, "unix:/run/db.sock"), endpoints.UNIXClientEndpoint)
    with pytest.raises(ValueError):
        client_endpoint(reactor, "tcp:host=h")


def test_tls_from_config():
    off = SimpleNamespace(tls=False, ca_file="ca.pem", cert_file="", key_file="")
    assert tls_from_config(off) is None
    on = SimpleNamespace(tls=True, ca_file="ca.pem", cert_file="", key_file="")
    assert tls_from_config(on) == TLSOptions("ca.pem")
    client = SimpleNamespace(tls=True, ca_file="ca.pem", cert_file="c.pem", key_file="c.key")
    assert tls_from_config(client) == TLSOptions("ca.pem", "c.pem", "c.key")


# --- TLS options against an in-process TLS server ------------------------------


def _cert(subject, key, issuer, issuer_key, ca=False):
    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject)).issuer_name(name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory):
    """A bundle of two CAs; the server's certificate is signed by the second."""
    d = tmp_path_factory.mktemp("two-cas")
    first_key, second_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    first = _cert("dftx first CA", first_key, "dftx first CA", first_key, ca=True)
    second = _cert("dftx second CA", second_key, "dftx second CA", second_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("localhost", server_key, "dftx second CA", second_key)
    (d / "bundle.pem").write_bytes(_pem(first) + _pem(second))
    (d / "first.pem").write_bytes(_pem(first))
    key_pem = server_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    return SimpleNamespace(dir=d, bundle=str(d / "bundle.pem"), first=str(d / "first.pem"),
                           server=ssl.PrivateCertificate.loadPEM(_pem(server) + key_pem))


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Ping(protocol.Protocol):
    """Fires C{done} with the echo of its ping, or fails with the loss."""

    def __init__(self):
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        if not self.done.called:
            self.done.callback(data)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)


@pytest_twisted.async_yield_fixture
async def tls_port(two_cas):
    server = endpoints.SSL4ServerEndpoint(reactor, 0, two_cas.server.options(),
                                          interface="127.0.0.1")
    port = await server.listen(protocol.Factory.forProtocol(_Echo))
    yield port.getHost().port
    await port.stopListening()


async def _ping(nodes, address):
    proto = await nodes.endpoint(address).connect(protocol.Factory.forProtocol(_Ping))
    return await proto.done


@pytest_twisted.ensureDeferred
async def test_every_ca_of_the_bundle_is_trusted(two_cas, tls_port):
    address = f"127.0.0.1:{tls_port}"
    tls = TLSOptions(two_cas.bundle, hostname="localhost")
    assert await _ping(NodeEndpoints([address], reactor, tls), address) == b"ping"
    # The first CA alone did not sign the server's certificate.
    alone = NodeEndpoints([address], reactor, TLSOptions(two_cas.first, hostname="localhost"))
    with pytest.raises(Exception, match="certificate verify failed"):
        await _ping(alone, address)


@pytest_twisted.ensureDeferred
async def test_the_files_are_read_once(two_cas, tls_port, tmp_path):
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(open(two_cas.bundle, "rb").read())
    address = f"127.0.0.1:{tls_port}"
    nodes = NodeEndpoints([address], reactor, TLSOptions(str(bundle), hostname="localhost"))
    assert await _ping(nodes, address) == b"ping"
    bundle.unlink()
    # Another endpoint (every connection attempt builds one): the options
    # read with the first are used again.
    assert await _ping(nodes, address) == b"ping"
