"""
Real servers on loopback, for the test suite, the benchmarks and the
sandbox: redis-server (one node, or a Redis Cluster with replicas),
ovsdb-server, and dftx's own twistd services, started from the system
binaries on free ports in temporary directories.  There is one way to run
and break a server: kill -9 and restart a node, pause and resume it
(SIGSTOP/SIGCONT), fail a replica over, migrate a slot, run
C{ovs-vsctl --no-wait}.

Everything that waits is a coroutine (use it with C{await}, or
C{defer.ensureDeferred}) that polls with a deadline; nothing blocks the
reactor.  Every class and function takes a C{reactor} and uses the global
one only when called without it: importing the harness installs no reactor
and starts nothing.  Every process started here is killed by PID at
interpreter exit if it is still running, so a failing test cannot leave
servers behind (see L{dftx.harness.process}).

Nothing in the runtime (the rest of C{dftx}) imports this package.

The Redis server run is C{redis-server} from C{PATH}, or the binary that
C{$DFTX_REDIS_SERVER} names (Valkey's C{valkey-server}: see doc/testing.md).

Modules: L{process} (commands, child processes, ports, polling), L{redis}
(one redis-server, which binary), L{cluster_nodes} (CLUSTER NODES parsed), L{cluster}
(Redis Cluster), L{ovsdb} (ovsdb-server), L{services} (dfpublisher and
dfcontroller), L{netns} (a lab of hosts as network namespaces, for
partitions: import it from there).  Every server takes a L{Host} (where it
runs), L{LOOPBACK} unless told otherwise.
"""

from dftx.harness.cluster import RedisCluster
from dftx.harness.cluster_nodes import CLUSTER_SLOTS, ClusterNode, parse_cluster_nodes
from dftx.harness.ovsdb import VSWITCH_SCHEMA, OvsdbServer
from dftx.harness.process import (
    LOOPBACK,
    NO_SERVERS_ENV,
    ChildProcess,
    Host,
    ServerProcess,
    ServersOff,
    CommandFailed,
    find_binary,
    free_port,
    poll,
    run,
)
from dftx.harness.redis import (
    SERVER_ENV,
    RedisServer,
    ServerVersion,
    server_binary,
    server_has_tls,
    server_version,
)
from dftx.harness.services import TWISTD_MAIN, DftxService

__all__ = [
    "CLUSTER_SLOTS",
    "LOOPBACK",
    "NO_SERVERS_ENV",
    "ChildProcess",
    "ServerProcess",
    "ClusterNode",
    "CommandFailed",
    "DftxService",
    "Host",
    "OvsdbServer",
    "RedisCluster",
    "RedisServer",
    "SERVER_ENV",
    "ServerVersion",
    "ServersOff",
    "TWISTD_MAIN",
    "VSWITCH_SCHEMA",
    "find_binary",
    "free_port",
    "parse_cluster_nodes",
    "poll",
    "run",
    "server_binary",
    "server_has_tls",
    "server_version",
]
