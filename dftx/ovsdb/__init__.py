"""
The local ovsdb-server, monitored: RFC 7047 JSON-RPC (L{dftx.ovsdb.jsonrpc}),
the Interface table's rows (L{dftx.ovsdb.rows}), port classification and
the fold of rows into port events (L{dftx.ovsdb.ports}), and the Interface
table monitor (L{dftx.ovsdb.monitor}).
"""

from dftx.ovsdb.monitor import InterfaceMonitor
from dftx.ovsdb.ports import PortEvent

__all__ = ["InterfaceMonitor", "PortEvent"]
