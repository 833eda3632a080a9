"""
What the two twistd services share: the C{--config} option, loading the
configuration for a role (a bad file ends the process with status 1 and a
message naming file, section and key), and L{RoleService}, the life cycle
of a service that starts asynchronously and must exit non-zero when it
cannot start.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from dftx import config as dfconfig
from dftx.errors import ConfigError

log = Logger()


class Options(usage.Options):
    optParameters = [["config", "c", None, "The INI file (see doc/design.md)."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


class RoleService(service.Service):
    """
    A service that starts with the coroutine L{_start} and stops with
    L{_stop}.  When L{_start} fails the reason is logged, the reactor
    stopped and L{exit_code} set to 1.  L{ready} says what is still
    missing (None once ready), as the HTTP C{/healthz} reports it.
    """

    def __init__(self, config: dfconfig.Config) -> None:
        self.config = config
        self.exit_code = 0
        self.missing: str | None = "starting"

    def ready(self) -> str | None:
        return self.missing

    def startService(self) -> None:
        super().startService()
        defer.ensureDeferred(self._start()).addErrback(self._fatal)

    async def _start(self) -> None:
        raise NotImplementedError

    def _fatal(self, failure: Failure) -> None:
        from twisted.internet import reactor

        log.critical("{name} cannot start: {error}", name=self.name,
                     error=failure.getErrorMessage())
        self.exit_code = 1
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> defer.Deferred[None]:
        """@return: Deferred firing once everything is closed."""
        super().stopService()
        self.missing = "stopping"
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        raise NotImplementedError


def make_service(
    options: Options, role: str, factory: Callable[[dfconfig.Config], RoleService]
) -> RoleService:
    """
    twistd's entry point for C{role}: load the configuration and build the
    service; the process exits with the service's L{RoleService.exit_code}.
    """
    from twisted.internet import reactor

    try:
        cfg = dfconfig.load(options["config"], role)
    except ConfigError as e:
        raise SystemExit(f"{factory.name}: bad configuration: {e}") from None
    svc = factory(cfg)
    reactor.addSystemEventTrigger("after", "shutdown", _exit_if_failed, svc)
    return svc


def _exit_if_failed(svc: Any) -> None:
    """After shutdown: end with the service's failure status (twistd has none)."""
    if svc.exit_code:
        os._exit(svc.exit_code)
