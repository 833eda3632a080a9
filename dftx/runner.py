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

__all__ = ["CONFIG_REFERENCE", "Options", "build", "make_service"]

CONFIG_REFERENCE = "doc/operator.md#configuration-reference"
"""Where every configuration key is described (the operator guide)."""


class Options(usage.Options):
    optParameters = [["config", "c", None,
                      f"The INI file; its sections and keys: {CONFIG_REFERENCE}."]]
    longdesc = (f"{CONFIG_REFERENCE} (the operator guide's configuration reference) lists "
                f"every key of the configuration file, with its type and default.  "
                f"`dftx check-config FILE --role dfpublisher|dfcontroller` checks a file "
                f"as the service does at start, without starting it.")

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def build(path: str, factory: type[RoleService], reactor: Any) -> RoleService:
    """
    The service C{factory} (a L{RoleService} class) for the configuration
    file C{path}, loaded for its role, built with C{reactor} and not
    started: what twistd runs, and what C{dftx check-config} checks.

    @raise ConfigError: naming the file, section and key.
    """
    return factory(dfconfig.load(path, factory.role), reactor=reactor)


def make_service(options: Options, reactor: Any, factory: type[RoleService]) -> RoleService:
    """
    twistd's entry point for the service C{factory} (a L{RoleService}
    class): load the configuration for its role and build it with
    C{reactor}, the reactor twistd runs; the process exits with the
    service's L{RoleService.exit_code}.
    """
    try:
        svc = build(options["config"], factory, reactor)
    except ConfigError as e:
        raise SystemExit(f"{factory.name}: bad configuration: {e}") from None
    reactor.addSystemEventTrigger("after", "shutdown", _exit_if_failed, svc)
    return svc


def _exit_if_failed(svc: RoleService) -> None:
    """After shutdown: end with the service's failure status (twistd has none)."""
    if svc.exit_code:
        os._exit(svc.exit_code)
