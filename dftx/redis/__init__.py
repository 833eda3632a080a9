"""
The Redis Cluster client dftx is built on: slots (L{dftx.redis.slots}),
topology (L{dftx.redis.topology}), endpoints (L{dftx.redis.endpoints}, on
L{dftx.endpoints}), the RESP protocol (L{dftx.redis.resp}), one
reconnecting connection per node (L{dftx.redis.connection}), the
connections to a cluster's nodes (L{dftx.redis.nodes}), its slot map
(L{dftx.redis.slotmap}) and the routing client (L{dftx.redis.cluster}).  Nothing here knows about the NB database or
pub/sub; those layers build on it.
"""

from dftx.endpoints import TLSOptions
from dftx.errors import NotReplicated, ReplyError
from dftx.redis.cluster import ClusterClient
from dftx.redis.slots import key_slot
from dftx.redis.topology import Topology

__all__ = ["ClusterClient", "NotReplicated", "ReplyError", "TLSOptions", "Topology", "key_slot"]
