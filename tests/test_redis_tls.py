"""
TLS (ssl: endpoint strings and [df_redis]-style TLS settings, hostname
checked through service-identity) and AUTH, against a real redis-server
listening with TLS.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from dftx.db.redis import RedisDbDriver
from dftx.errors import DBConnectionError
from dftx.endpoints import TLSOptions
from dftx.harness import RedisServer, free_port

aio = pytest_twisted.ensureDeferred


@pytest.fixture(scope="module")
def tls_server(pki):
    """redis-server with a TLS port (and its plain port, for the harness)."""
    tls_port = free_port()
    server = RedisServer(
        pki["dir"],
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", pki["server_cert"],
            "--tls-key-file", pki["server_key"],
            "--tls-ca-cert-file", pki["ca"],
            "--tls-auth-clients", "optional",
        ],
    )
    server.tls_port = tls_port
    pytest_twisted.blockon(defer.ensureDeferred(server.start()))
    yield server
    pytest_twisted.blockon(defer.ensureDeferred(server.kill()))


async def _roundtrip(driver, unique):
    await driver.initialize()
    try:
        await driver.create_key(unique, "k", "über TLS")
        assert await driver.get_key(unique, "k") == "über TLS"
    finally:
        await driver.close()


@aio
async def test_ssl_endpoint_string_checks_the_hostname(tls_server, pki, unique):
    port, ca_dir = tls_server.tls_port, pki["ca_dir"]
    await _roundtrip(RedisDbDriver(
        [f"ssl:host=127.0.0.1:port={port}:caCertsDir={ca_dir}:hostname=localhost"]
    ), unique)
    # Without hostname=, the certificate is checked against the host: an IP.
    await _roundtrip(RedisDbDriver([f"ssl:127.0.0.1:{port}:caCertsDir={ca_dir}"]), unique)
    wrong = RedisDbDriver(
        [f"ssl:host=127.0.0.1:port={port}:caCertsDir={ca_dir}:hostname=redis.example"],
        retries=1,
    )
    with pytest.raises(DBConnectionError) as info:
        await wrong.initialize()
    await wrong.close()
    # service-identity's verdict reaches the caller.
    assert f"127.0.0.1:{port}" in str(info.value) and "DNSMismatch" in str(info.value)


@aio
async def test_a_server_certificate_from_an_untrusted_ca_is_refused(tls_server, pki, unique):
    # The same subject name as the real CA, another key: only the signature
    # tells them apart.
    port = tls_server.tls_port
    untrusted = RedisDbDriver(
        [f"ssl:host=127.0.0.1:port={port}:caCertsDir={pki['untrusted_ca_dir']}:"
         "hostname=localhost"], retries=1)
    with pytest.raises(DBConnectionError) as info:
        await untrusted.initialize()
    await untrusted.close()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "certificate verify failed" in str(info.value)


@aio
async def test_tls_settings_with_client_certificate(tls_server, pki, unique):
    address = f"127.0.0.1:{tls_server.tls_port}"
    await _roundtrip(RedisDbDriver([address], tls=TLSOptions(pki["ca"])), unique)
    await tls_server.cli("CONFIG", "SET", "tls-auth-clients", "yes")
    try:
        anonymous = RedisDbDriver([address], retries=1, tls=TLSOptions(pki["ca"]))
        with pytest.raises(DBConnectionError):
            await anonymous.initialize()
        await anonymous.close()
        await _roundtrip(RedisDbDriver([address], tls=TLSOptions(
            pki["ca"], pki["client_cert"], pki["client_key"]
        )), unique)
    finally:
        await tls_server.cli("CONFIG", "SET", "tls-auth-clients", "optional")
    mismatch = RedisDbDriver(
        [address], retries=1, tls=TLSOptions(pki["ca"], hostname="redis.example")
    )
    with pytest.raises(DBConnectionError):
        await mismatch.initialize()
    await mismatch.close()


@aio
async def test_auth_over_tls(tls_server, pki, unique):
    address = f"127.0.0.1:{tls_server.tls_port}"
    tls = TLSOptions(pki["ca"])
    await tls_server.cli("CONFIG", "SET", "requirepass", "s3cret")
    try:
        await _roundtrip(RedisDbDriver([address], tls=tls, password="s3cret"), unique)
        for password, reason in ((None, "NOAUTH"), ("wrong", "WRONGPASS")):
            driver = RedisDbDriver([address], retries=1, tls=tls, password=password)
            with pytest.raises(DBConnectionError) as info:
                await driver.initialize()
            await driver.close()
            assert reason in str(info.value) and address in str(info.value)
    finally:
        await tls_server.cli("-a", "s3cret", "--no-auth-warning", "CONFIG", "SET", "requirepass", "")
