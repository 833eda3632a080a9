"""The NB DB contract on MemoryDbDriver."""

import pytest_twisted

from dftx.db.memory import MemoryDbDriver

from .db_contract import DbDriverContract


class TestMemoryDbDriver(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self):
        driver = MemoryDbDriver()
        await driver.initialize()
        yield driver
        await driver.close()
