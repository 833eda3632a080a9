"""The NB DB contract on MemoryDbDriver."""

import pytest_twisted

from dftx import db
from dftx.config import parse
from dftx.db.memory import MemoryDbDriver
from dftx.db.redis import RedisDbDriver

from .db_contract import DbDriverContract


class TestMemoryDbDriver(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self):
        driver = MemoryDbDriver()
        await driver.initialize()
        yield driver
        await driver.close()


def test_from_config_gives_the_named_driver(tmp_path):
    assert isinstance(db.from_config(parse("[df]\nnb_db_driver = memory\n")), MemoryDbDriver)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    redis = db.from_config(parse(
        "[df]\nnb_db_driver = redis\nremote_db_hosts = 127.0.0.1:7000,127.0.0.1:7001\n"
        f"[df_redis]\nwait_replicas = 1\ntls = true\nca_file = {ca}\n"))
    assert isinstance(redis, RedisDbDriver) and redis.wait_replicas == 1
    assert redis.client._nodes.seeds == ["127.0.0.1:7000", "127.0.0.1:7001"]
