"""
twistd plugins of dftx: C{twistd -n dfpublisher --config FILE} and
C{twistd -n dfcontroller --config FILE}.  Each is a ServiceMaker naming a
module that provides C{Options} and C{makeService}, so importing this file
(which twistd does for every plugin listing) imports no dftx code.
"""

from twisted.application.service import ServiceMaker

dfpublisher = ServiceMaker(
    "dftx publisher",
    "dftx.publisher",
    "Relay NB updates from API workers to subscribers (ZeroMQ), register as "
    "a neutron_server publisher, clean stale publishers.",
    "dfpublisher",
)

dfcontroller = ServiceMaker(
    "dftx local controller",
    "dftx.controller",
    "Keep a compute node's cache of the NB tables, resync after failures, "
    "report VM port status from the local ovsdb-server.",
    "dfcontroller",
)
