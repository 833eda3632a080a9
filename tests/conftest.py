"""
Fixtures that give tests real servers (see L{dftx.servers}).

- C{redis_cluster}: one 3-master + 3-replica Redis Cluster for the session.
  A test may kill, pause, fail over or migrate: after it, the cluster is
  repaired (paused nodes resumed, dead ones restarted) and waited healthy,
  so the next test starts from a working cluster (masters may have moved).
- C{redis_single}: one non-cluster redis-server for the session, restarted
  after a test that killed or paused it.
- C{ovsdb_server}: a fresh ovsdb-server on a new Open_vSwitch database per
  test; C{make_ovsdb_server(clustered=True)} for a RAFT database.

Session fixtures run their Deferreds with C{pytest_twisted.blockon}; the
per-test ones are async fixtures.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import defer

from dftx.servers import OvsdbServer, RedisCluster, RedisServer


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


@pytest_twisted.async_yield_fixture
async def make_ovsdb_server(tmp_path):
    servers = []

    async def make(clustered: bool = False) -> OvsdbServer:
        server = OvsdbServer(tmp_path / f"ovsdb-{len(servers)}", clustered=clustered)
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
def unique():
    """A short random name, so tests sharing a server do not collide."""
    return f"t{uuid.uuid4().hex[:10]}"
