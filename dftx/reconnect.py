"""
What the reconnecting clients (a Redis node's L{NodeConnection}, the OVSDB
L{InterfaceMonitor}) add to Twisted's C{ClientService}.

Both have a session to set up on each new connection (Redis: C{AUTH};
OVSDB: the monitor request and its initial table) before the connection is
of any use.  They run it from the connection, not from C{ClientService}'s
C{prepareConnection}: a connection lost while C{prepareConnection} runs, or
left open after it failed, reaches C{ClientService}'s state machine in a
state with no transition for it (C{NoTransition} logged as an unhandled
error, measured with Twisted 26.10).  A session that fails aborts its
connection, which C{ClientService} handles like any lost connection.

What C{prepareConnection} gave for free, backing off from a server that
accepts connections and then fails every session (a wrong password, a
database that refuses the monitor request), comes from L{SessionBackoff}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer


__all__ = ["ReportingEndpoint", "SessionBackoff"]


class SessionBackoff:
    """
    A C{ClientService} C{retryPolicy} that also counts sessions.

    C{ClientService} counts failed connection attempts and starts its count
    again at every connection made.  This policy takes the larger of that
    count and its own: sessions in a row that failed before they were
    ready (L{failed}; L{ready} resets it).
    """

    def __init__(self, policy: Callable[[int], float]) -> None:
        """
        @param policy: the delay for a count of failures in a row, as
            C{twisted.application.internet.backoffPolicy} gives.
        """
        self._policy = policy
        self._failures = 0

    def __call__(self, attempt: int) -> float:
        return self._policy(max(attempt, self._failures))

    def failed(self) -> None:
        """A connection was made but its session failed before it was ready."""
        self._failures += 1

    def ready(self) -> None:
        """A session is ready: the next failure is the first again."""
        self._failures = 0


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """An endpoint that tells its owner when each attempt starts and when it
    fails; the attempt's result is passed on unchanged."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        failed: Callable[[Failure], object],
        attempting: Callable[[], object] = lambda: None,
    ) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._attempting = attempting

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        """@return: the wrapped endpoint's C{connect(factory)}."""

        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        self._attempting()
        return self._endpoint.connect(factory).addErrback(failed)
