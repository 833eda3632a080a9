"""
Triggers that reach the whole fleet at once, as a controller takes them:
which of its topics one touches (L{topics_on_slots}) and when it reads them
(L{Spread}).

A C{dbrestart} (the HA watcher's after a failover, a publisher's, a
reconnection to a publisher service that restarted), a C{sync} and an HA
topology message reach every controller at the same instant.  Read at once,
they would make the whole fleet read the same masters in one burst.  So a
controller first narrows the trigger to its topics whose rows live on the
slots that changed (where the trigger says which), then reads them a random
delay into a window that grows with the fleet.  Updates that arrive
meanwhile are applied at once as always: only the repair read waits.
"""

from __future__ import annotations

import random as _random
from collections import Counter
from typing import Any, Callable, Container, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from dftx.cache import row_topic
from dftx.db.redis import row_key
from dftx.redis.slots import key_slot

__all__ = ["Scope", "Spread", "spread_window", "topics_on_slots"]

Scope = set[str] | None
"""Topics to resync (C{"D"}: rows without topic); None: every kept topic."""


def topics_on_slots(tables: Iterable[str], topics: Iterable[str],
                    slots: Container[int]) -> set[str]:
    """
    The topics of C{topics} that have a row of one of C{tables} on one of
    C{slots}: a row's topic fixes its slot (C{{table.topic}key}, or
    C{{table.}key} for C{"D"}).
    """
    tables = list(tables)
    return {t for t in topics
            if any(key_slot(row_key(table, "", row_topic(t))) in slots for table in tables)}


def spread_window(minimum: float, fleet: int, rate: float) -> float:
    """
    The window, in seconds, over which C{fleet} controllers spread the reads
    of one trigger: C{fleet / rate} (C{rate} reads starting per second
    across the fleet), and at least C{minimum}.
    """
    return max(minimum, fleet / rate)


class Spread:
    """
    Calls C{run(scope)} once, a random delay in [0, window) after a request
    that finds none pending.  Requests that arrive before it runs are merged
    into it (their topics united; None means every topic), so a burst of
    triggers costs one read, started at most one window after the first.

    @param run: called with the merged L{Scope}.
    @param window: gives the window in seconds (read at each first request).
    @param clock: times the delay.
    @param rng: the random source (a C{random.Random}; tests pass a seeded
        one); default, one seeded by the operating system.

    @ivar counters: C{requests}, C{runs}.
    """

    def __init__(self, run: Callable[[Scope], Any], window: Callable[[], float],
                 clock: IReactorTime, rng: _random.Random | None = None) -> None:
        self._run = run
        self._window = window
        self._clock = clock
        self._rng = rng if rng is not None else _random.Random()
        self._scope: Scope = set()
        self._call: IDelayedCall | None = None
        self.counters: Counter[str] = Counter()

    @property
    def due(self) -> float | None:
        """When the pending run is due (clock seconds), or None."""
        return self._call.getTime() if self._call is not None else None

    def request(self, scope: Iterable[str] | None) -> None:
        """Ask for a run covering C{scope} (None: everything): the pending
        one, or a new one a random delay from now."""
        self.counters["requests"] += 1
        if scope is None or self._scope is None:
            self._scope = None
        else:
            self._scope |= set(scope)
        if self._call is None:
            self._call = self._clock.callLater(self._rng.random() * self._window(), self._fire)

    def _fire(self) -> None:
        scope, self._scope, self._call = self._scope, set(), None
        self.counters["runs"] += 1
        self._run(scope)

    def cancel(self) -> None:
        """Drop the pending run, if any."""
        if self._call is not None:
            self._call.cancel()
        self._call, self._scope = None, set()
