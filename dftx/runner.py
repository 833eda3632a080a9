"""
The twistd side of the two services: the C{--config} option and
L{make_service}, which loads the configuration for the service's role (a
bad file ends the process with status 1 and a message naming file, section
and key), builds the service with the reactor twistd runs, and makes the
process exit with the service's status.  The services themselves, which an
application can also run in its own reactor, are L{dftx.service.RoleService}s.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage

from dftx import config as dfconfig
from dftx.errors import ConfigError
from dftx.service import RoleService

__all__ = ["Options", "make_service"]


class Options(usage.Options):
    optParameters = [["config", "c", None, "The INI file (see doc/design.md)."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def make_service(options: Options, reactor: Any, factory: type[RoleService]) -> RoleService:
    """
    twistd's entry point for the service C{factory} (a L{RoleService}
    class): load the configuration for its role and build it with
    C{reactor}, the reactor twistd runs; the process exits with the
    service's L{RoleService.exit_code}.
    """
    try:
        cfg = dfconfig.load(options["config"], factory.role)
    except ConfigError as e:
        raise SystemExit(f"{factory.name}: bad configuration: {e}") from None
    svc = factory(cfg, reactor=reactor)
    reactor.addSystemEventTrigger("after", "shutdown", _exit_if_failed, svc)
    return svc


def _exit_if_failed(svc: RoleService) -> None:
    """After shutdown: end with the service's failure status (twistd has none)."""
    if svc.exit_code:
        os._exit(svc.exit_code)
