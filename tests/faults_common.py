"""
What the fault suites share (tests/test_faults.py on loopback,
tests/test_partitions.py in the network-namespace lab): the steady NB write
load (L{Load}), a deployment under it and the invariant checked after a
fault (L{Faulted}), and tenant topics on every master (L{tenant_topics}).
See doc/reliability.md.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import defer, reactor, task

from dftx.errors import DftxError
from dftx.ha import ClusterWatcher
from dftx.harness import poll
from dftx.nb import NbApi
from dftx.redis.slots import key_slot
from dftx.sandbox import Deployment

__all__ = ["LANES", "MAX_RSS", "RATE", "RECOVERY", "TABLE", "Faulted", "Load", "resyncs",
           "rss_mb", "tenant_topics"]

TABLE = "lport"
MAX_RSS = 400  # MiB: the resident memory of each service after a fault (~60-70 measured)
RECOVERY = 30.0  # seconds from the end of a fault to the invariant holding
RATE = 100  # writes per second, all lanes together
LANES = 4


class Load:
    """
    Steady NB writes: LANES concurrent writers, each creating a new row,
    RATE writes a second in all, at most C{limit} writes.  C{acked} holds
    what each acknowledged write wrote; C{failed} the keys of the writes
    that errbacked (their rows may or may not exist).
    """

    def __init__(self, nb: NbApi, topics: list[str], limit: int = 20_000) -> None:
        self.nb = nb
        self.topics = topics
        self.limit = limit
        self.acked: dict[str, tuple[str, str]] = {}  # key -> (topic, value)
        self.failed: set[str] = set()
        self.rewrites = 0
        self.outage = 0.0  # the longest time between two acknowledged writes
        self._last_ack: float | None = None
        self._n = 0
        self._stopping = False
        self._lanes: list[defer.Deferred[None]] = []

    def start(self) -> None:
        self._lanes = [defer.ensureDeferred(self._lane()) for _ in range(LANES)]

    async def _lane(self) -> None:
        while not self._stopping and self._n < self.limit:
            n, self._n = self._n, self._n + 1
            key, topic = f"row{n}", self.topics[n % len(self.topics)]
            value = json.dumps({"id": key, "n": n})
            try:
                await self.nb.create(TABLE, key, value, topic)
            except DftxError:
                self.failed.add(key)
            else:
                self.acked[key] = (topic, value)
                now = time.monotonic()
                if self._last_ack is not None:
                    self.outage = max(self.outage, now - self._last_ack)
                self._last_ack = now
            await task.deferLater(reactor, LANES / RATE, lambda: None)

    async def acked_more(self, n: int, timeout: float = 60.0) -> None:
        """Wait until C{n} more writes were acknowledged (writes resumed)."""
        target = len(self.acked) + n
        await poll(lambda: len(self.acked) >= target, timeout, f"{n} more acknowledged writes")

    async def stop(self) -> None:
        self._stopping = True
        await defer.gatherResults(self._lanes)

    async def rewrite(self) -> None:
        """The db_restart hook: write every acknowledged row again."""
        self.rewrites += 1
        await defer.gatherResults([
            self.nb.db.create_key(TABLE, key, value, topic)
            for key, (topic, value) in list(self.acked.items())])


class Faulted:
    """A deployment under load, and the checks after a fault.  Without
    C{rewrite} the application has no db_restart hook: what a fault loses
    of its acknowledged writes stays lost (L{lost} counts it)."""

    def __init__(self, d: Deployment, topics: list[str], rewrite: bool = True) -> None:
        self.d = d
        self.topics = topics
        self.load = Load(d.nb, topics)
        if rewrite:
            d.nb.on_db_restart = self.load.rewrite
        self.watcher = ClusterWatcher(d.db.client, d._writer, 0.5, on_failover=d.nb.db_restart)
        self.resyncs_before: list[int] = []
        self.losses_expected = False  # the invariant then counts losses instead
        self.lost: list[str] = []

    async def start(self) -> "Faulted":
        self.watcher.startService()
        self.resyncs_before = [await resyncs(c) for c in self.d.controllers]
        self.load.start()
        await self.load.acked_more(100)
        return self

    async def recovered(self, fault: str, min_resyncs: int | list[int] = 1) -> float:
        """
        Let writes go on after the fault (100 more acknowledged: about a
        second), stop them, then wait for the invariant.  Each controller
        must have resynced C{min_resyncs} times since the start (a list:
        per controller).

        @return: seconds from the fault's end to the invariant.
        """
        t0 = time.monotonic()
        await self.load.acked_more(100)
        await self.load.stop()
        t1 = time.monotonic()
        await poll(self.invariant_holds, RECOVERY, f"invariant after {fault}")
        took = time.monotonic() - t0
        if isinstance(min_resyncs, int):
            min_resyncs = [min_resyncs] * len(self.d.controllers)
        for controller, before, n in zip(self.d.controllers, self.resyncs_before, min_resyncs):
            # A resync that a fleet-wide trigger set off waits a random
            # delay (resync_spread): the caches can be equal before it ran.
            await poll(lambda c=controller, want=before + n: _resynced(c, want), RECOVERY,
                       f"{controller.dir.name} resynced {n} times")
        print(f"\n{fault}: {len(self.load.acked)} writes acknowledged, "
              f"{len(self.load.failed)} refused, {len(self.lost)} acknowledged lost, "
              f"longest write outage "
              f"{self.load.outage:.2f}s, {self.load.rewrites} re-writes by the hook; "
              f"invariant {took:.2f}s after the fault ended "
              f"({time.monotonic() - t1:.2f}s after the writes stopped)")
        return took

    async def invariant_holds(self) -> bool:
        """True when it holds; otherwise AssertionError saying what differs
        (the poll's timeout error shows the last one)."""
        db = await self.d.db_table(TABLE)
        lost = [k for k, (_, v) in self.load.acked.items() if db.get(k) != json.loads(v)]
        self.lost = lost
        assert self.losses_expected or not lost, (f"{len(lost)} acknowledged writes not in the DB, e.g. {lost[:3]}; "
                          f"hook re-writes {self.load.rewrites}, watcher {dict(self.watcher.counters)}")
        for controller in self.d.controllers:
            cache = await controller.json(f"/v1/tables/{TABLE}")
            missing, extra = set(db) - set(cache), set(cache) - set(db)
            changed = [k for k in set(db) & set(cache) if db[k] != cache[k]]
            assert not (missing or extra or changed), (
                f"{controller.dir.name}: {len(missing)} rows missing (e.g. {sorted(missing)[:3]}), "
                f"{len(extra)} extra, {len(changed)} differ; hook re-writes {self.load.rewrites}, "
                f"watcher {dict(self.watcher.counters)}; controller "
                f"{(await controller.json('/v1/status'))['counters']}")
        for service in [self.d.publisher, *self.d.controllers]:
            assert service.process.running, f"{service.dir.name} exited"
            assert rss_mb(service) < MAX_RSS, f"{service.dir.name}: {rss_mb(service):.0f} MiB"
        return True

    async def stop(self) -> None:
        await self.load.stop()
        await self.watcher.stopService()


async def _resynced(controller: Any, want: int) -> bool:
    return await resyncs(controller) >= want


async def resyncs(controller: Any) -> int:
    return (await controller.json("/v1/status"))["counters"]["resyncs"]


async def tenant_topics(cluster: Any, per_master: int = 2) -> list[str]:
    """Tenant topics whose rows' slot ({lport.topic}) is on each master,
    C{per_master} of them for every master."""
    owners: dict[int, Any] = {}
    topics, count, i = [], {m.address: 0 for m in await cluster.masters()}, 0
    while any(n < per_master for n in count.values()):
        topic = f"tenant{i}"
        slot = key_slot("{%s.%s}" % (TABLE, topic))
        if slot not in owners:
            owners[slot] = await cluster.owner(slot)
        address = owners[slot].address
        if count[address] < per_master:
            count[address] += 1
            topics.append(topic)
        i += 1
    return topics


def rss_mb(service: Any) -> float:
    """The resident memory of a service's process, in MiB."""
    for line in open(f"/proc/{service.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
