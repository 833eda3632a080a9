"""dftx.testing: the in-memory fakes honour the same contracts as the real drivers."""

from __future__ import annotations

import pytest
import pytest_twisted

from dftx.errors import PublishError
from dftx.nb import NbApi
from dftx.pubsub.redis import RedisPubSub
from dftx.testing import FakeInterfaceSource, MemoryDbDriver, MemoryPubSub

from .db_contract import DbDriverContract
from .pubsub_contract import PubSubContract

aio = pytest_twisted.ensureDeferred


class TestMemoryPubSubContract(PubSubContract):
    @pytest.fixture
    def pubsub(self):
        return MemoryPubSub()


class TestRedisPubSubContract(PubSubContract):
    @pytest.fixture(params=[False, True], ids=["classic", "sharded"])
    def pubsub(self, request, redis_cluster):
        return RedisPubSub(redis_cluster.seeds[:2], sharded=request.param)


class TestTestingDbDriverContract(DbDriverContract):
    @pytest_twisted.async_yield_fixture
    async def driver(self):
        d = MemoryDbDriver()
        await d.initialize()
        yield d


@aio
async def test_an_application_tests_its_undo_without_servers():
    db, bus = MemoryDbDriver(), MemoryPubSub()
    nb = NbApi(db, bus.get_publisher())
    sub, got = bus.get_subscriber(), []
    await sub.initialize(got.append)
    await nb.create("lport", "p1", "{}")
    assert [u.key for u in got] == ["p1"]
    bus.fail_sends = True
    with pytest.raises(PublishError):
        await nb.create("lport", "p2", "{}")
    assert await db.get_all_keys("lport") == ["p1"]  # undone
    sub.restart()
    assert got[-1].action == "dbrestart"


def test_fake_interface_source_gives_the_monitors_events():
    events, marks = [], []
    src = FakeInterfaceSource(callback=events.append, on_sync_end=lambda: marks.append("end"))
    src.startService()
    assert marks == ["end"] and src.synced
    src.set_port("br-int", type="internal")
    src.set_port("tap1", external_ids={"iface-id": "p1"}, ofport=-1)
    src.set_port("tap1", external_ids={"iface-id": "p1"}, ofport=5)
    src.set_port("tap1", external_ids={"iface-id": "p1", "attached-mac": "m"}, ofport=5)
    src.remove_port("tap1")
    assert [(e.name, e.kind, e.action) for e in events] == [
        ("br-int", "bridge", "online"), ("tap1", "vm", "online"), ("tap1", "vm", "update"),
        ("tap1", "vm", "offline")]
    assert [e.name for e in src.ports.values()] == ["br-int"]
