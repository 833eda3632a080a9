"""Small Deferred helpers the layers share."""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, Coroutine, Iterable, ParamSpec, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure


__all__ = ["Shared", "deferred", "gather"]

P = ParamSpec("P")
T = TypeVar("T")


def deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, defer.Deferred[T]]:
    """
    Make an C{async def} function (or method) return a Deferred: it fires with
    what the coroutine returns, or fails with what it raises.  The coroutine
    starts running at once, as with C{defer.ensureDeferred}.
    """

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        return defer.ensureDeferred(f(*args, **kwargs))

    return wrapper


class Shared:
    """One result that any number of callers wait for."""

    def __init__(self) -> None:
        self._waiters: list[defer.Deferred[Any]] = []

    def wait(self) -> defer.Deferred[Any]:
        """A Deferred that fires with the result given to L{fire}."""
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self, result: Any) -> None:
        """Give C{result} (a value or a Failure) to every waiter."""
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


async def gather(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run coroutines together; the first exception (after all are done)."""
    ds = [defer.ensureDeferred(c) for c in coros]
    results = await defer.DeferredList(ds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]
