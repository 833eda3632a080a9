"""
dftx: Dragonflow's distribution layer on Twisted.

The names an embedding application needs, from the modules that define them:
the NB database drivers (L{dftx.db}), the pub/sub drivers (L{dftx.pubsub}),
writes that reach subscribers (L{NbApi}), Redis failover detection
(L{ClusterWatcher}), the node's Open vSwitch ports (L{InterfaceMonitor}) and
every error dftx raises (L{dftx.errors}).  Importing dftx installs no reactor
and starts nothing.
"""

from dftx.db.memory import MemoryDbDriver
from dftx.db.redis import RedisDbDriver
from dftx.errors import (
    ClusterDownError, ConfigError, DBConnectionError, DBKeyAmbiguous, DBKeyNotFound,
    DftxError, InvalidNameError, OvsdbError, ProtocolError, PublishError, SubscribeError,
)
from dftx.ha import ClusterWatcher
from dftx.nb import NbApi
from dftx.ovsdb.monitor import InterfaceMonitor
from dftx.ovsdb.ports import PortEvent
from dftx.pubsub.redis import RedisPubSub
from dftx.pubsub.zmq import ZmqPubSub
from dftx.update import SEND_ALL_TOPIC, DbUpdate

__version__ = "0.1.0.dev0"

__all__ = [
    "ClusterDownError", "ClusterWatcher", "ConfigError", "DBConnectionError",
    "DBKeyAmbiguous", "DBKeyNotFound", "DbUpdate", "DftxError", "InterfaceMonitor",
    "InvalidNameError", "MemoryDbDriver", "NbApi", "OvsdbError", "PortEvent",
    "ProtocolError", "PublishError", "RedisDbDriver", "RedisPubSub", "SEND_ALL_TOPIC",
    "SubscribeError", "ZmqPubSub", "__version__",
]
