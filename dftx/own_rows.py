"""
A node's own rows (a controller's chassis row, its VM ports' status), written
through L{dftx.nb.NbApi} soon and until the write succeeds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dftx.deferreds import deferred
from dftx.errors import DftxError

__all__ = ["OwnRows"]

log = Logger()


class OwnRows:
    """
    Rows waiting to be written, one at a time, in the order first asked; a row
    asked again before it was written is written once, with its latest value.
    A failed write is retried, with every row still waiting, C{retry_delay}
    seconds later.  Nothing is written before L{start} or after L{stop}.

    @ivar pending: C{(table, key) -> value} of the rows not yet written.
    @ivar counters: C{<table>_writes} and C{<table>_errors}.
    """

    def __init__(self, clock: IReactorTime, counters: Counter[str], retry_delay: float = 1.0) -> None:
        self.clock = clock
        self.counters = counters
        self.retry_delay = retry_delay
        self.pending: dict[tuple[str, str], str] = {}
        self._nb: Any = None
        self._flush: defer.Deferred[None] | None = None
        self._retry: Any = None

    def start(self, nb: Any) -> None:
        """Write through C{nb} (an L{dftx.nb.NbApi}) from now on."""
        self._nb = nb
        self._retry_now()

    def stop(self) -> None:
        """Write no more (a write under way ends on its own)."""
        self._nb = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def write(self, table: str, key: str, value: str) -> None:
        """Write C{value} at C{key} of C{table} (no topic), soon."""
        self.pending[table, key] = value
        self._retry_now()

    def _retry_now(self) -> None:
        if self._flush is None and self._nb is not None and self.pending:
            self._flush = self._write_pending()

    @deferred
    async def _write_pending(self) -> None:
        try:
            while self.pending and self._nb is not None:
                row = next(iter(self.pending))
                table, key = row
                value = self.pending[row]
                try:
                    await self._nb.create(table, key, value)
                except DftxError as e:
                    self.counters[f"{table}_errors"] += 1
                    log.warn("writing {table} {key} failed (retrying): {error}",
                             table=table, key=key, error=e)
                    self._retry = self.clock.callLater(self.retry_delay, self._retry_now)
                    return
                self.counters[f"{table}_writes"] += 1
                if self.pending.get(row) == value:
                    del self.pending[row]
        finally:
            self._flush = None
