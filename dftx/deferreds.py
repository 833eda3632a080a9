"""Small Deferred and reactor helpers the layers share."""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, Coroutine, Iterable, ParamSpec, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure


__all__ = ["Joined", "Shared", "deferred", "gather", "or_global_reactor"]

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


def or_global_reactor(reactor: Any) -> Any:
    """
    C{reactor}, or the global reactor when it is None: imported only then,
    so that a module of dftx never installs a reactor when it is imported
    (an embedding application that passes no reactor gets the one it runs).
    """
    if reactor is None:
        from twisted.internet import reactor
    return reactor


class Joined:
    """
    An operation that runs once at a time: a call while a run is under way
    joins that run instead of starting another.

    @param start: starts one run; returns a Deferred of its result.
    """

    def __init__(self, start: Callable[[], defer.Deferred[Any]]) -> None:
        self._start = start
        self._run: Shared | None = None

    @property
    def running(self) -> bool:
        """Whether a run is under way."""
        return self._run is not None

    def __call__(self) -> defer.Deferred[Any]:
        """
        Join the run under way, or start one.  @return: Deferred firing with
        the run's result, or failing with its failure.
        """
        if self._run is not None:
            return self._run.wait()
        run = self._run = Shared()
        waiter = run.wait()  # before starting: the run may end at once
        self._start().addBoth(self._finished, run)
        return waiter

    def wait(self) -> defer.Deferred[None]:
        """@return: Deferred firing with None when the run under way ends
        (at once when none is), whatever its result."""
        if self._run is None:
            return defer.succeed(None)
        return self._run.wait().addErrback(lambda _: None)

    def _finished(self, result: Any, run: Shared) -> None:
        self._run = None
        run.fire(result)


async def gather(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run coroutines together; the first exception (after all are done)."""
    ds = [defer.ensureDeferred(c) for c in coros]
    results = await defer.DeferredList(ds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]
