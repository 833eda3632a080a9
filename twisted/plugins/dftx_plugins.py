"""
twistd plugins of dftx: C{twistd -n dfpublisher --config FILE} and
C{twistd -n dfcontroller --config FILE}.  Each names a module that provides
C{Options} and C{makeService(options, reactor)}; the module is imported only
when the plugin is used, so importing this file (which twistd does for every
plugin listing) imports no dftx code.
"""

from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class DftxServiceMaker:
    """Like twisted's ServiceMaker, but it gives the service the reactor
    twistd installed and runs."""

    def __init__(self, name: str, module: str, description: str, tapname: str) -> None:
        self.name = name
        self.module = module
        self.description = description
        self.tapname = tapname

    @property
    def options(self) -> Any:
        return namedAny(self.module).Options

    def makeService(self, options: Any) -> IService:
        # twistd installed its reactor before asking for the service.
        from twisted.internet import reactor

        return namedAny(self.module).makeService(options, reactor)


dfpublisher = DftxServiceMaker(
    "dftx publisher",
    "dftx.publisher",
    "Relay NB updates from API workers to subscribers (ZeroMQ), register as "
    "a neutron_server publisher, clean stale publishers.",
    "dfpublisher",
)

dfcontroller = DftxServiceMaker(
    "dftx local controller",
    "dftx.controller",
    "Keep a compute node's cache of the NB tables, resync after failures, "
    "report VM port status from the local ovsdb-server.",
    "dfcontroller",
)
