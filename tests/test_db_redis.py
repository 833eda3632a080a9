"""
RedisDbDriver: the NB DB contract on a real Redis Cluster and on a single
non-cluster server, and what the driver adds (key layout, replicas, rollback,
failures).
"""

from __future__ import annotations

import pytest_twisted

from dftx.db.redis import RedisDbDriver

from .db_contract import DbDriverContract


class TestRedisDbDriverOnCluster(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self, redis_cluster):
        driver = RedisDbDriver(hosts=redis_cluster.seeds[:2], retries=3)
        await driver.initialize()
        yield driver
        await driver.close()


class TestRedisDbDriverOnSingleNode(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self, redis_single):
        driver = RedisDbDriver(hosts=[redis_single.address], retries=3)
        await driver.initialize()
        yield driver
        await driver.close()
