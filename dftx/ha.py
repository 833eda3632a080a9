"""
Redis HA across roles.

The publisher service runs a L{ClusterWatcher}: every
C{cluster_watch_interval} seconds it reads CLUSTER SHARDS from any reachable
node and, when the topology differs from the one it last published,
publishes the new one on the HA topic (L{HA_TOPIC}) as a C{set} of row
C{ha/topology} whose value is the JSON of L{Topology.as_dict}.  When the
set of masters changed (a failover, which may have lost writes
acknowledged just before it) it also runs its C{on_failover} hook: the
embedding application passes L{dftx.nb.NbApi.db_restart} so it re-writes
its authoritative rows and every subscriber resyncs.  The hook runs too when
a master keeps its place but restarted (its C{run_id}, from C{INFO server},
changed): a node without persistence comes back empty and still serves its
slots, whether it alone restarted before its replica took over or the whole
cluster went down and came back; the topology alone cannot show it.

With C{restart_event}, the watcher itself then publishes the C{dbrestart}
on C{"D"} (L{restart_update}), after the hook: its value names the slot
ranges whose data may be lost (L{lost_slots}: the slots of masters that
left or restarted, and of masters that joined), so that a dftx controller
resyncs only its topics on those slots (L{restart_slots}).  Dragonflow's
subscribers ignore the value of a C{dbrestart} and resync everything, as
they would after a plain one.  dfpublisher runs it that way; an embedding
application may keep C{on_failover=NbApi.db_restart}, whose C{dbrestart}
carries no slots (every controller resyncs everything).

Controllers subscribe to the HA topic and do not poll Redis for topology:
L{topology_from_update} gives them the topology to install with
L{dftx.redis.cluster.ClusterClient.apply_topology}, after which they
resync the topics whose slots changed owner (L{Topology.moved_slots}).
Their own MOVED replies and lost connections still correct a topology that
is out of date.

A check, a publish or a hook that fails is logged and counted and the
watcher keeps going: a publish that failed is retried at the next check,
and so is a hook (and the C{dbrestart} after it) that failed, for every
slot lost since the last one that succeeded.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Awaitable, Callable, Iterable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import Joined, deferred, or_global_reactor
from dftx.errors import DftxError, ProtocolError
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Topology
from dftx.update import DBRESTART, SEND_ALL_TOPIC, SET, DbUpdate

__all__ = [
    "HA_TABLE", "HA_TOPIC", "LOST_SLOTS", "TOPOLOGY_KEY", "ClusterWatcher", "FailoverHook",
    "is_failover", "lost_slots", "restart_slots", "restart_update", "run_id",
    "topology_from_update", "topology_update",
]

HA_TOPIC = "redis"
HA_TABLE = "ha"
TOPOLOGY_KEY = "topology"
LOST_SLOTS = "lost_slots"
"""The field of a C{dbrestart}'s JSON value that lists the slot ranges lost."""

log = Logger()

FailoverHook = Callable[[], Awaitable[Any] | Any]


def topology_update(topology: Topology) -> DbUpdate:
    """The HA message announcing C{topology}."""
    return DbUpdate(HA_TABLE, TOPOLOGY_KEY, SET, json.dumps(topology.as_dict(), sort_keys=True),
                    HA_TOPIC)


def topology_from_update(update: DbUpdate) -> Topology | None:
    """
    The topology an HA message announces; None for any other update.

    @raise ProtocolError: for an HA message whose value is not a topology.
    """
    if update.table != HA_TABLE or update.key != TOPOLOGY_KEY or update.action != SET:
        return None
    try:
        data = json.loads(update.value or "")
    except ValueError as e:
        raise ProtocolError(f"HA message: value is not JSON: {e}") from None
    return Topology.from_dict(data)


def restart_update(slots: Iterable[int]) -> DbUpdate:
    """
    The C{dbrestart} control event (for topic C{"D"}) that says the data of
    C{slots} may be lost: its value is C{{"lost_slots": [[start, end],
    ...]}} (inclusive ranges).
    """
    ranges: list[list[int]] = []
    for slot in sorted(set(slots)):
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1][1] = slot
        else:
            ranges.append([slot, slot])
    return DbUpdate(None, None, DBRESTART, json.dumps({LOST_SLOTS: ranges}), SEND_ALL_TOPIC)


def restart_slots(update: DbUpdate) -> frozenset[int] | None:
    """
    The slots whose data a C{dbrestart} says may be lost; None for a
    C{dbrestart} that does not say (Dragonflow's, a reconnection's, or one
    whose value is not L{restart_update}'s): everything may be lost.
    """
    try:
        listed = json.loads(update.value or "")[LOST_SLOTS]
        ranges = [(int(start), int(end)) for start, end in listed]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    if not all(0 <= start <= end < SLOTS for start, end in ranges):
        return None
    return frozenset(s for start, end in ranges for s in range(start, end + 1))


def lost_slots(old: Topology, new: Topology, restarted: Iterable[str] = ()) -> frozenset[int]:
    """
    The slots whose data may be lost between C{old} and C{new}: those whose
    old master is no master in C{new} (it failed over: writes it
    acknowledged may not have reached the replica that took over), those
    whose new master was no master in C{old} (it may have come back empty),
    those served by a master of C{restarted}, and those without a master in
    either.  A slot migrated between two masters that stay loses nothing.
    """
    old_masters, new_masters, restarted = set(old.masters), set(new.masters), set(restarted)
    before, after = old.owners(), new.owners()
    return frozenset(
        s for s in range(SLOTS)
        if before[s] not in new_masters or after[s] not in old_masters or after[s] in restarted)


def run_id(info: Any) -> str | None:
    """The C{run_id} in the text of C{INFO server}, or None."""
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name == "run_id":
            return value.strip()
    return None


def is_failover(old: Topology | None, new: Topology) -> bool:
    """A master left or joined: writes acknowledged by the old one may be lost."""
    return old is not None and set(old.masters) != set(new.masters)


class ClusterWatcher(service.Service):
    """
    Watches the cluster behind C{client} (a started
    L{dftx.redis.cluster.ClusterClient}) and publishes its topology on
    C{publisher} (an initialized L{dftx.pubsub.api.IPublisher}); see the
    module docstring.  The first check runs at start and publishes the
    topology found.

    @param interval: seconds between the starts of two checks.
    @param on_failover: called with no argument after a failover or a
        master's restart; may return a Deferred or be a coroutine function.
    @param restart_event: after a failover or a master's restart (and after
        C{on_failover}), publish L{restart_update} of the slots lost.
    @param clock: what the checks are timed by (the global reactor when
        omitted).

    @ivar counters: C{checks}, C{check_errors}, C{published},
        C{publish_errors}, C{failovers}, C{restarts} (a master that kept its
        place restarted), C{hook_errors}, C{restart_events} (published).
    """

    def __init__(
        self,
        client: Any,
        publisher: Any,
        interval: float,
        on_failover: FailoverHook | None = None,
        clock: IReactorTime | None = None,
        restart_event: bool = False,
    ) -> None:
        clock = or_global_reactor(clock)
        self.client = client
        self.publisher = publisher
        self.interval = interval
        self.on_failover = on_failover
        self.restart_event = restart_event
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.published: Topology | None = None
        self._seen: Topology | None = None
        # Slots lost since the hook and the restart event last succeeded;
        # None when nothing waits for them.
        self._lost: set[int] | None = None
        self._run_ids: dict[str, str] = {}
        self._loop: task.LoopingCall | None = None
        self._checks = Joined(lambda: self._check().addErrback(self._check_failed))

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> defer.Deferred[None]:
        """@return: Deferred firing once a check under way has ended."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._checks.wait()

    def check(self) -> defer.Deferred[None]:
        """
        Check now (a check under way is joined).  @return: Deferred that
        fires (never fails) when the check is done.
        """
        return self._checks()

    async def _restarted_masters(self, topology: Topology) -> list[str]:
        """
        Masters of C{topology} whose run_id changed since the last check
        (a master that does not answer keeps its last known run_id; a new
        master is only recorded).
        """
        masters = list(topology.masters)
        replies = await defer.DeferredList(
            [defer.maybeDeferred(lambda m=m: self.client.connection(m).execute("INFO", "server"))
             for m in masters], consumeErrors=True)
        restarted, known = [], self._run_ids
        self._run_ids = {}
        for master, (ok, reply) in zip(masters, replies):
            current = run_id(reply) if ok else None
            previous = known.get(master)
            if current is None:
                current = previous
            elif previous is not None and current != previous:
                restarted.append(master)
            if current is not None:
                self._run_ids[master] = current
        return restarted

    def _check_failed(self, failure: Failure) -> None:
        log.failure("cluster check failed", failure)

    @deferred
    async def _check(self) -> None:
        """@return: Deferred firing with None when the check is done."""
        self.counters["checks"] += 1
        try:
            topology = await self.client.refresh()
        except DftxError as e:
            self.counters["check_errors"] += 1
            log.warn("cluster check: {error}", error=e)
            return
        failover = is_failover(self._seen, topology)
        if failover:
            self.counters["failovers"] += 1
            log.warn("Redis masters changed: {old} -> {new}",
                     old=self._seen.masters if self._seen else None, new=topology.masters)
        restarted = await self._restarted_masters(topology)
        if restarted:
            self.counters["restarts"] += 1
            log.warn("Redis masters restarted (their data may be gone): {masters}",
                     masters=restarted)
        wanted = self.on_failover is not None or self.restart_event
        if (failover or restarted) and wanted and self._seen is not None:
            self._lost = (self._lost or set()) | lost_slots(self._seen, topology, restarted)
        self._seen = topology
        if topology != self.published:
            try:
                await self.publisher.send_event(topology_update(topology))
            except DftxError as e:
                self.counters["publish_errors"] += 1
                log.warn("publishing the Redis topology failed (retried at the next "
                         "check): {error}", error=e)
            else:
                self.counters["published"] += 1
                self.published = topology
        if self._lost is not None:
            await self._after_loss(self._lost)

    async def _after_loss(self, lost: set[int]) -> None:
        """Run the hook, then publish the restart event; on a failure, both
        are retried at the next check."""
        try:
            if self.on_failover is not None:
                await defer.maybeDeferred(self.on_failover)
        except Exception:
            self.counters["hook_errors"] += 1
            log.failure("failover hook failed (retried at the next check)")
            return
        if self.restart_event:
            try:
                await self.publisher.send_event(restart_update(lost))
            except DftxError as e:
                self.counters["publish_errors"] += 1
                log.warn("publishing dbrestart failed (retried at the next check): {error}",
                         error=e)
                return
            self.counters["restart_events"] += 1
        self._lost = None
