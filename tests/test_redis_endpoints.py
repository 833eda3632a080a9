"""From configured hosts and discovered addresses to client endpoints."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import endpoints, reactor

from dftx.db.redis import RedisDbDriver
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
