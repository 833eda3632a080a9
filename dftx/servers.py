"""
Real servers on loopback: redis-server (one node, or a Redis Cluster with
replicas) and ovsdb-server, started from the system binaries on free ports in
temporary directories.

The test suite, the benchmarks and the sandbox all use this module, so that
there is one way to run and break a server: kill -9 and restart a node, pause
and resume it (SIGSTOP/SIGCONT), fail a replica over, migrate a slot, run
C{ovs-vsctl --no-wait}.

Everything that waits is a coroutine (use it with C{await}, or
C{defer.ensureDeferred}) that polls with a deadline; nothing blocks the
reactor.  Every process started here is killed by PID at interpreter exit if
it is still running, so a failing test cannot leave servers behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable
from typing import Any, Callable, Sequence

from twisted.internet import defer, error, protocol, reactor, task
from twisted.python.failure import Failure

VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
CLUSTER_SLOTS = 16384

_PACKAGES = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "ovsdb-server": "openvswitch-common",
    "ovsdb-tool": "openvswitch-common",
    "ovsdb-client": "openvswitch-common",
    "ovs-vsctl": "openvswitch-switch",
}

# pid -> ChildProcess, for the exit-time cleanup.
_live: dict[int, "ChildProcess"] = {}


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_live):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class CommandFailed(Exception):
    """A helper command exited non-zero, or did not finish in time."""

    def __init__(self, argv: Sequence[str], reason: str, output: str = "") -> None:
        self.argv = list(argv)
        self.output = output
        super().__init__(f"{' '.join(self.argv)}: {reason}\n{output}".rstrip())


def find_binary(name: str) -> str:
    """
    Return the path of a system binary, looking in C{PATH} and the sbin
    directories (ovsdb-server lives in /usr/sbin, which a non-root PATH may
    lack).

    @raise FileNotFoundError: naming the Debian package that provides it.
    """
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    dirs += ["/usr/sbin", "/usr/local/sbin", "/sbin"]
    for d in dirs:
        path = os.path.join(d, name)
        if d and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"{name} not found; install the Debian package "
        f"{_PACKAGES.get(name, name)}"
    )


def free_port(also_free: Sequence[int] = ()) -> int:
    """
    Return a TCP port on 127.0.0.1 that is free now, and such that port +
    each offset in C{also_free} is free too (Redis Cluster's bus listens on
    port + 10000).
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if all(port + off < 65536 and _port_free(port + off) for off in also_free):
            return port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def poll(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> Any:
    """
    Call C{check} (which may return a Deferred or a coroutine) until it
    returns a true value or the deadline passes; an exception from C{check}
    counts as "not yet".

    @return: the true value.
    @raise TimeoutError: naming C{what} and the last exception, if any.
    """
    deadline = reactor.seconds() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last = None
        except Exception as e:
            last = e
        if reactor.seconds() >= deadline:
            suffix = f" (last error: {last})" if last else ""
            raise TimeoutError(f"{what} not within {timeout}s{suffix}")
        await task.deferLater(reactor, interval, lambda: None)


class _CommandProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.done: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.done.callback(-1 if code is None else code)


async def run(argv: Sequence[str], timeout: float = 20.0, check: bool = True) -> str:
    """
    Run a command (first element looked up with L{find_binary}) and return
    its stdout and stderr as text.

    @raise CommandFailed: on a non-zero exit (when C{check}), or when it has
        not finished after C{timeout} seconds (it is then killed).
    """
    argv = [find_binary(argv[0]), *argv[1:]]
    proto = _CommandProtocol()
    proc = reactor.spawnProcess(proto, argv[0], argv, env=os.environ)
    timer = reactor.callLater(timeout, _signal_quietly, proc, "KILL")
    code = await proto.done
    output = b"".join(proto.out).decode("utf-8", "replace")
    if not timer.active():
        raise CommandFailed(argv, f"no answer within {timeout}s", output)
    timer.cancel()
    if check and code != 0:
        raise CommandFailed(argv, f"exit code {code}", output)
    return output


def _signal_quietly(proc: Any, sig: str) -> None:
    try:
        proc.signalProcess(getattr(signal, f"SIG{sig}"))
    except error.ProcessExitedAlready:
        pass


class ChildProcess(protocol.ProcessProtocol):
    """
    One long-running server process, its output appended to C{log_path}.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, cwd: Path) -> None:
        self.argv = [find_binary(argv[0]), *argv[1:]]
        self.log_path = log_path
        self.cwd = cwd
        self.transport: Any = None
        self._ended: defer.Deferred[None] = defer.Deferred()
        self._log: Any = None
        self._pid = 0

    @property
    def pid(self) -> int | None:
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        return self.transport is not None and not self._ended.called

    def start(self) -> None:
        self._ended = defer.Deferred()
        self._log = open(self.log_path, "ab")
        reactor.spawnProcess(
            self, self.argv[0], self.argv, env=os.environ, path=str(self.cwd)
        )
        self._pid = self.transport.pid
        _live[self._pid] = self

    def outReceived(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        _live.pop(self._pid, None)
        self._log.close()
        self._ended.callback(None)

    def signal(self, sig: str) -> None:
        """Send a signal by name ("KILL", "STOP", "CONT", "TERM")."""
        if self.running:
            _signal_quietly(self.transport, sig)

    async def wait_ended(self, timeout: float = 10.0) -> None:
        """Wait for the process to exit."""
        if not self.running:
            return
        ended = self._ended
        await poll(lambda: ended.called, timeout, f"exit of {self.argv[0]}")

    async def kill(self) -> None:
        """kill -9 and wait for the exit (works on a stopped process too)."""
        self.signal("KILL")
        await self.wait_ended()


class RedisServer:
    """
    One redis-server on 127.0.0.1, without persistence: no RDB snapshots,
    no AOF, and a replica deletes the RDB file of each full sync once it
    has loaded it (otherwise it keeps it as dump.rdb and loads it when
    started again, bringing back keys long deleted).  Only an explicit
    SAVE leaves data for a restart.  With C{cluster}, it is a
    cluster-enabled node that keeps its node id (nodes.conf) across
    L{restart}.
    """

    def __init__(
        self,
        base_dir: Path,
        cluster: bool = False,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = free_port(also_free=(10000,) if cluster else ())
        self.dir = Path(base_dir) / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.paused = False
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--rdb-del-sync-files", "yes",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]
        if cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
            ]
        self.process = ChildProcess(
            [*args, *extra_args], self.dir / "redis.log", self.dir
        )

    @property
    def address(self) -> str:
        """C{"127.0.0.1:port"}."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.running

    def __repr__(self) -> str:
        return f"<RedisServer {self.address} pid={self.process.pid}>"

    async def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run one command with redis-cli and return its raw output, stripped."""
        out = await run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            timeout=timeout,
        )
        return out.strip()

    async def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING."""
        self.process.start()
        self.paused = False
        await poll(self._pong, timeout, f"redis-server {self.address} PING")

    async def _pong(self) -> bool:
        if not self.process.running:
            raise RuntimeError(f"exited; see {self.process.log_path}")
        return (await self.cli("PING", timeout=2)) == "PONG"

    async def kill(self) -> None:
        """kill -9 the server and wait until it is gone."""
        await self.process.kill()
        self.paused = False

    async def restart(self, timeout: float = 15.0) -> None:
        """kill -9 (if running) and start again on the same port and dir."""
        await self.kill()
        await self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections."""
        self.process.signal("STOP")
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after L{pause}."""
        self.process.signal("CONT")
        self.paused = False

    async def info(self, section: str) -> dict[str, str]:
        """INFO C{section} as a dict ("cluster" means CLUSTER INFO)."""
        args = ("CLUSTER", "INFO") if section == "cluster" else ("INFO", section)
        text = await self.cli(*args)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )


@dataclass
class ClusterNode:
    """One line of CLUSTER NODES."""

    node_id: str
    address: str  # host:port
    flags: set[str]
    master_id: str | None
    connected: bool
    config_epoch: int = 0
    slots: list[tuple[int, int]] = field(default_factory=list)
    # (slot, node id) of the [slot-<-id] and [slot->-id] marks, which only
    # a node's own line (flag myself) carries.
    importing: list[tuple[int, str]] = field(default_factory=list)
    migrating: list[tuple[int, str]] = field(default_factory=list)

    def serves(self, slot: int) -> bool:
        """Whether C{slot} is in this node's slot ranges."""
        return any(lo <= slot <= hi for lo, hi in self.slots)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr"})


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    """Parse the output of CLUSTER NODES."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots, importing, migrating = [], [], []
        for spec in parts[8:]:
            if spec.startswith("["):
                marks, arrow = (importing, "-<-") if "-<-" in spec else (migrating, "->-")
                slot, _, peer = spec.strip("[]").partition(arrow)
                marks.append((int(slot), peer))
                continue
            lo, _, hi = spec.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(
            ClusterNode(
                node_id=parts[0],
                address=parts[1].split("@")[0],
                flags=set(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                connected=parts[7] == "connected",
                config_epoch=int(parts[6]),
                slots=slots,
                importing=importing,
                migrating=migrating,
            )
        )
    return nodes


class RedisCluster:
    """
    A Redis Cluster of C{masters} masters, each with C{replicas} replicas, on
    loopback.  C{node_timeout_ms} is cluster-node-timeout: a killed master
    is failed over after about that long plus the election (3-5 s at 2000).
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
    ) -> None:
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="dftx-cluster-"))
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [
            RedisServer(self.dir, cluster=True, node_timeout_ms=node_timeout_ms)
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def seeds(self) -> list[str]:
        """Every node's C{"127.0.0.1:port"}, for a client's host list."""
        return [n.address for n in self.nodes]

    def node(self, address: str) -> RedisServer:
        """The node with this C{"host:port"}."""
        for n in self.nodes:
            if n.address == address:
                return n
        raise KeyError(address)

    async def start(self, timeout: float = 60.0) -> None:
        """Start every node, create the cluster and wait until it is healthy."""
        await defer.gatherResults(
            [defer.ensureDeferred(n.start()) for n in self.nodes],
            consumeErrors=True,
        )
        await run(
            ["redis-cli", "--cluster", "create", *self.seeds,
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            timeout=timeout,
        )
        await self.wait_healthy(timeout)

    async def stop(self) -> None:
        """Kill every node and remove the directory (if this object made it)."""
        for n in self.nodes:
            await n.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def cluster_nodes(self, exclude: RedisServer | None = None) -> list[ClusterNode]:
        """CLUSTER NODES as seen by the first running node that answers
        (other than C{exclude})."""
        last: Exception | None = None
        for n in self.nodes:
            if n.running and not n.paused and n is not exclude:
                try:
                    return parse_cluster_nodes(
                        await n.cli("CLUSTER", "NODES", timeout=3)
                    )
                except CommandFailed as e:
                    last = e
        raise RuntimeError(f"no node answers CLUSTER NODES: {last}")

    async def masters(self) -> list[RedisServer]:
        """The nodes that serve slots now, by the cluster's own view."""
        return [
            self.node(c.address)
            for c in await self.cluster_nodes()
            if c.is_master and c.slots and not c.failed
        ]

    async def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The nodes that replicate C{master} now."""
        view = await self.cluster_nodes()
        ids = {c.address: c.node_id for c in view}
        return [
            self.node(c.address)
            for c in view
            if c.master_id == ids.get(master.address) and not c.failed
        ]

    async def owner(self, slot: int) -> RedisServer:
        """The master that serves C{slot}."""
        for c in await self.cluster_nodes():
            if c.is_master and not c.failed and c.serves(slot):
                return self.node(c.address)
        raise KeyError(f"no master serves slot {slot}")

    async def other_master(self, node: RedisServer) -> RedisServer:
        """A master other than C{node}."""
        return next(m for m in await self.masters() if m is not node)

    async def keyslot(self, key: str) -> int:
        """The slot of C{key}, as Redis computes it (CLUSTER KEYSLOT)."""
        for n in self.nodes:
            if n.running and not n.paused:
                return int(await n.cli("CLUSTER", "KEYSLOT", key))
        raise RuntimeError("no running node")

    async def is_healthy(self) -> bool:
        """
        True when every running node says cluster_state:ok and sees the same
        masters covering all slots with the same replicas and no failed node,
        every running node is a master with slots or a replica of one (a
        restarted old master is a slotless master for a while before it turns
        replica, and CLUSTER SLOTS lists it only then), every master has its
        replicas, and every replica's link to its master is up.  Until then
        CLUSTER SLOTS can still change without anything being done to the
        cluster.
        """
        views = []
        for n in self.nodes:
            if not n.running or n.paused:
                continue
            if (await n.info("cluster")).get("cluster_state") != "ok":
                return False
            view = [c for c in parse_cluster_nodes(await n.cli("CLUSTER", "NODES", timeout=3))
                    if self.node(c.address).running]
            if any(c.failed or not c.connected for c in view if c.address != n.address):
                return False
            serving = {c.node_id: c.address for c in view if c.is_master and c.slots}
            if any(c.node_id not in serving and c.master_id not in serving for c in view):
                return False
            views.append(sorted(
                (c.address, tuple(c.slots), serving.get(c.master_id or "")) for c in view
            ))
            repl = await n.info("replication")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        if not views or any(v != views[0] for v in views):
            return False
        covered = sum(hi - lo + 1 for _, ranges, _ in views[0] for lo, hi in ranges)
        if covered != CLUSTER_SLOTS:
            return False
        running = sum(1 for n in self.nodes if n.running)
        if running == len(self.nodes):
            masters = sum(1 for _, ranges, _ in views[0] if ranges)
            return running == masters * (1 + self.replicas)
        return True

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until L{is_healthy}."""
        await poll(self.is_healthy, timeout, "healthy cluster", interval=0.2)

    async def repair(self, timeout: float = 60.0) -> None:
        """
        Undo what tests did to the nodes: resume paused ones, start dead ones
        (they rejoin, as replicas when their slots moved), then wait until
        healthy.
        """
        for n in self.nodes:
            if n.paused:
                n.resume()
        for n in self.nodes:
            if not n.running:
                await n.start()
        await self._clear_stale_imports()
        await self.wait_healthy(timeout)

    async def _clear_stale_imports(self) -> None:
        """
        A master killed and started again after a SAVE loads the keys of
        that RDB file, which can hold keys of a slot that has since been migrated
        away.  Redis then marks that slot IMPORTING on the node, and a node
        importing a slot ignores every claim on it: when the slot's new
        owner changed while the node was down, the node never learns it and
        the cluster is never healthy again.  Where no migration into the node
        is going on, close the import and let the node claim the slot at its
        old config epoch: the owner, whose epoch is newer, answers with an
        UPDATE message, on which Redis takes the slot away from the node and
        deletes the node's stale keys in it.  (Where the owner's epoch is not
        newer, claiming would steal the slot: the node is told the owner
        instead and keeps its stale keys, which no client is routed to.)
        """
        for n in self.nodes:
            if not n.running or n.paused or not await self._role_is(n, "master"):
                continue
            me = await self._myself(n)
            for slot, _source in me.importing:
                owner = await self._owner_by_others(slot, n)
                if owner is not None and (slot, me.node_id) in (
                    await self._myself(self.node(owner.address))
                ).migrating:
                    continue
                await n.cli("CLUSTER", "SETSLOT", str(slot), "STABLE")
                claim = me if owner is None or owner.config_epoch > me.config_epoch else owner
                await n.cli("CLUSTER", "SETSLOT", str(slot), "NODE", claim.node_id)

    async def _myself(self, node: RedisServer) -> ClusterNode:
        """C{node}'s own line of its CLUSTER NODES."""
        view = parse_cluster_nodes(await node.cli("CLUSTER", "NODES", timeout=3))
        return next(c for c in view if "myself" in c.flags)

    async def _owner_by_others(self, slot: int, node: RedisServer) -> ClusterNode | None:
        """The master that serves C{slot} in the view of a node other than C{node}."""
        try:
            view = await self.cluster_nodes(exclude=node)
        except RuntimeError:
            return None
        return next((c for c in view if c.is_master and c.serves(slot)), None)

    async def failover(self, replica: RedisServer, mode: str = "", timeout: float = 30.0) -> None:
        """
        CLUSTER FAILOVER on C{replica} (C{mode} "" for the coordinated
        failover, or "FORCE" / "TAKEOVER") and wait until it is a master.
        A manual failover that has not happened after Redis's own limit for
        it (5 s: the replica did not catch up with its master in time) was
        abandoned by Redis, and is asked for again.
        """
        deadline = reactor.seconds() + timeout
        while True:
            await replica.cli("CLUSTER", "FAILOVER", *([mode] if mode else []))
            try:
                await self.wait_promoted(replica, min(10.0, deadline - reactor.seconds()))
                return
            except TimeoutError:
                if reactor.seconds() + 1 >= deadline:
                    raise

    async def wait_promoted(self, node: RedisServer, timeout: float = 30.0) -> None:
        """
        Wait until C{node} says it is a master and the cluster's view (what
        L{masters} and L{owner} read) agrees: gossip reaches the other nodes
        a little after the promoted node knows.
        """
        async def promoted() -> bool:
            return await self._role_is(node, "master") and node in await self.masters()

        await poll(promoted, timeout, f"{node.address} to become master")

    async def _role_is(self, node: RedisServer, role: str) -> bool:
        return (await node.info("replication")).get("role") == role

    async def _node_id(self, node: RedisServer) -> str:
        return await node.cli("CLUSTER", "MYID")

    async def begin_migration(self, slot: int, dst: RedisServer) -> RedisServer:
        """
        Mark C{slot} IMPORTING on C{dst} and MIGRATING on its owner, moving
        no key yet: clients now get ASK for keys already moved.

        @return: the source master.
        """
        src = await self.owner(slot)
        if src is dst:
            raise ValueError(f"{dst.address} already owns slot {slot}")
        src_id, dst_id = await self._node_id(src), await self._node_id(dst)
        await dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
        await src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
        return src

    async def move_keys(
        self, slot: int, src: RedisServer, dst: RedisServer,
        keys: Sequence[str] | None = None,
    ) -> int:
        """
        MIGRATE C{keys} (all keys of the slot when None) from C{src} to
        C{dst}.  @return: how many keys were moved.
        """
        moved = 0
        while True:
            batch = list(keys) if keys is not None else (
                await src.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "1000")
            ).split()
            if not batch:
                return moved
            await src.cli(
                "MIGRATE", "127.0.0.1", str(dst.port), "", "0", "10000",
                "REPLACE", "KEYS", *batch,
            )
            moved += len(batch)
            if keys is not None:
                return moved

    async def finish_migration(self, slot: int, src: RedisServer, dst: RedisServer) -> None:
        """Move what is left of C{slot} and assign it to C{dst} on every master."""
        await self.move_keys(slot, src, dst)
        dst_id = await self._node_id(dst)
        # The destination first, then the source, then the rest (the
        # order redis-cli --cluster reshard uses).
        await dst.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        await src.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        for m in await self.masters():
            if m is not src and m is not dst:
                await m.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        await poll(
            lambda: self._owned_by(slot, dst), 30, f"slot {slot} on {dst.address}"
        )

    async def _owned_by(self, slot: int, dst: RedisServer) -> bool:
        return (await self.owner(slot)) is dst and await self.is_healthy()

    async def migrate_slot(self, slot: int, dst: RedisServer) -> None:
        """Move C{slot} with all its keys to master C{dst}."""
        src = await self.begin_migration(slot, dst)
        await self.finish_migration(slot, src, dst)


class OvsdbServer:
    """
    ovsdb-server on a fresh Open_vSwitch database, listening on a unix
    socket and on C{tcp:127.0.0.1:port}.  With C{clustered}, the database is
    a one-member RAFT cluster (C{ovsdb-tool create-cluster}), which is what
    gives monitor_cond_since real transaction ids.  C{extra_args} go to
    ovsdb-server (e.g. a C{--remote=pssl:...} with its key and certificates).
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        clustered: bool = False,
        schema: str = VSWITCH_SCHEMA,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="dftx-ovsdb-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.clustered = clustered
        self.schema = schema
        self.db_path = self.dir / "conf.db"
        self.sock_path = self.dir / "db.sock"
        self.paused = False
        self.process = ChildProcess(
            [
                "ovsdb-server", str(self.db_path),
                f"--remote=punix:{self.sock_path}",
                f"--remote=ptcp:{self.port}:127.0.0.1",
                f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
                "--no-chdir",
                "-vconsole:info",
                *extra_args,
            ],
            self.dir / "ovsdb-server.log",
            self.dir,
        )

    @property
    def tcp(self) -> str:
        """C{"tcp:127.0.0.1:port"}: a Twisted client endpoint string, and an
        OVS remote too."""
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        """C{"unix:/path/db.sock"}: a Twisted client endpoint string, and an
        OVS remote too."""
        return f"unix:{self.sock_path}"

    @property
    def running(self) -> bool:
        return self.process.running

    async def start(self, timeout: float = 15.0) -> None:
        """Create the database file if needed, start, wait for list-dbs."""
        if not self.db_path.exists():
            if self.clustered:
                raft = free_port()
                await run(["ovsdb-tool", "create-cluster", str(self.db_path),
                           self.schema, f"tcp:127.0.0.1:{raft}"])
            else:
                await run(["ovsdb-tool", "create", str(self.db_path), self.schema])
        self.process.start()
        self.paused = False
        await poll(self._ready, timeout, f"ovsdb-server {self.tcp} list-dbs")

    async def _ready(self) -> bool:
        if not self.process.running:
            raise RuntimeError(f"exited; see {self.process.log_path}")
        dbs = await run(["ovsdb-client", "--timeout=2", "list-dbs", self.tcp], timeout=3)
        return "Open_vSwitch" in dbs.split()

    async def vsctl(self, *args: str, timeout: float = 20.0) -> str:
        """Run C{ovs-vsctl --no-wait} against this server; return stdout."""
        out = await run(
            ["ovs-vsctl", f"--db={self.unix}", "--no-wait",
             f"--timeout={int(timeout)}", *args],
            timeout=timeout + 5,
        )
        return out.strip()

    async def transact(self, operations: Sequence[Any], timeout: float = 60.0) -> list[Any]:
        """
        One JSON-RPC C{transact} of C{operations} (RFC 7047 section 5.2,
        without the database name) over the unix socket, for changes too
        large for ovs-vsctl.  @return: the reply's list of results.
        """
        from twisted.internet import endpoints

        from dftx.ovsdb.jsonrpc import JsonRpcProtocol

        endpoint = endpoints.UNIXClientEndpoint(reactor, str(self.sock_path))
        proto = await endpoints.connectProtocol(
            endpoint, JsonRpcProtocol(reactor, probe_interval=None))
        try:
            request = proto.request("transact", ["Open_vSwitch", *operations])
            return await request.addTimeout(timeout, reactor)
        finally:
            proto.transport.loseConnection()

    async def add_ports(self, bridge: str, interfaces: Sequence[dict[str, Any]],
                        timeout: float = 60.0) -> None:
        """
        Add one port per interface to C{bridge} in one transaction (for
        thousands, where ovs-vsctl is slow).  Each interface is a dict with
        C{name} and optionally C{type}, C{external_ids}, C{options}.
        """
        ops: list[Any] = []
        ports = []
        for i, iface in enumerate(interfaces):
            row: dict[str, Any] = {"name": iface["name"]}
            if iface.get("type"):
                row["type"] = iface["type"]
            for column in ("external_ids", "options"):
                if iface.get(column):
                    row[column] = ["map", [[k, v] for k, v in iface[column].items()]]
            ops.append({"op": "insert", "table": "Interface", "row": row,
                        "uuid-name": f"i{i}"})
            ops.append({"op": "insert", "table": "Port", "uuid-name": f"p{i}", "row": {
                "name": iface["name"], "interfaces": ["named-uuid", f"i{i}"]}})
            ports.append(["named-uuid", f"p{i}"])
        ops.append({"op": "mutate", "table": "Bridge", "where": [["name", "==", bridge]],
                    "mutations": [["ports", "insert", ["set", ports]]]})
        reply = await self.transact(ops, timeout)
        errors = [r for r in reply if isinstance(r, dict) and "error" in r]
        if errors or reply[-1].get("count") != 1:
            raise CommandFailed(["ovsdb-client", "transact"], f"add_ports: {errors or reply[-1]}")

    async def kill(self) -> None:
        """kill -9 and wait until gone."""
        await self.process.kill()
        self.paused = False

    async def restart(self, timeout: float = 15.0) -> None:
        """kill -9 (if running) and start again on the same port and file."""
        await self.kill()
        await self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: a stalled server."""
        self.process.signal("STOP")
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after L{pause}."""
        self.process.signal("CONT")
        self.paused = False

    async def stop(self) -> None:
        """Kill the server and remove its directory (if this object made it)."""
        await self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


TWISTD_MAIN = "from twisted.scripts.twistd import run; run()"


def _df_section(seeds: Sequence[str], pub_sub_driver: str, publisher_timeout: int) -> str:
    return (f"[df]\nnb_db_driver = redis\nremote_db_hosts = {','.join(seeds)}\n"
            f"pub_sub_driver = {pub_sub_driver}\npublisher_timeout = {publisher_timeout}")


class DftxService:
    """
    One dftx service, C{twistd -n dfpublisher|dfcontroller --config FILE},
    as a child process of this Python, with its configuration file and log
    in C{directory}.  L{publisher} and L{controller} write the usual
    configuration for the harness's servers.
    """

    def __init__(self, plugin: str, directory: Path, config: str, http_port: int) -> None:
        self.plugin = plugin
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.config = self.dir / "dftx.ini"
        self.config.write_text(config)
        self.process = ChildProcess(
            [sys.executable, "-c", TWISTD_MAIN, "-n", "--pidfile=", plugin,
             "--config", str(self.config)],
            self.dir / "twistd.log", self.dir)

    @classmethod
    def publisher(cls, directory: Path, seeds: Sequence[str], pub_sub_driver: str = "zmq",
                  publisher_timeout: int = 30, cluster_watch_interval: float = 0.5,
                  extra: str = "") -> "DftxService":
        """dfpublisher on free ports, relaying C{ipc://DIR/publisher.sock}."""
        directory = Path(directory)
        http_port, port = free_port(), free_port()
        svc = cls("dfpublisher", directory, f"""\
{_df_section(seeds, pub_sub_driver, publisher_timeout)}
[df_redis]
cluster_watch_interval = {cluster_watch_interval}
[neutron_server]
publisher_port = {port}
publisher_multiproc_socket = {directory / "publisher.sock"}
http_endpoint = tcp:{http_port}:interface=127.0.0.1
{extra}""", http_port)
        svc.uri = f"tcp://127.0.0.1:{port}"
        svc.ipc = f"ipc://{directory / 'publisher.sock'}"
        return svc

    @classmethod
    def controller(cls, directory: Path, seeds: Sequence[str], chassis: str, ovsdb: str,
                   pub_sub_driver: str = "zmq", publisher_timeout: int = 30,
                   tables: str = "lport,lswitch,chassis", db_sync_time: float = 120,
                   extra: str = "") -> "DftxService":
        """dfcontroller C{chassis} on free ports, monitoring C{ovsdb}."""
        http_port, port = free_port(), free_port()
        svc = cls("dfcontroller", directory, f"""\
{_df_section(seeds, pub_sub_driver, publisher_timeout)}
[df_local_controller]
chassis_name = {chassis}
publisher_port = {port}
ovsdb_connection = {ovsdb}
tables = {tables}
db_sync_time = {db_sync_time}
http_endpoint = tcp:{http_port}:interface=127.0.0.1
{extra}""", http_port)
        svc.uri = f"tcp://127.0.0.1:{port}"
        return svc

    @property
    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET C{path} of the service's HTTP endpoint: (status, body)."""
        from twisted.web.client import Agent, HTTPConnectionPool

        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(b"GET", self.url(path).encode())
        body = _Body()
        response.deliverBody(body)
        return response.code, await body.done

    async def json(self, path: str) -> Any:
        """The JSON body of C{path}. @raise CommandFailed: when not 200."""
        code, body = await self.get(path)
        if code != 200:
            raise CommandFailed([self.plugin, path], f"HTTP {code}", body.decode(errors="replace"))
        return json.loads(body)

    async def start(self, timeout: float = 30.0) -> None:
        """Start it and wait for /healthz 200 (the log is in the error if it exits)."""
        self.process.start()

        async def healthy() -> bool:
            if not self.process.running:
                raise CommandFailed([self.plugin], "exited", self.log[-3000:])
            try:
                return (await self.get("/healthz"))[0] == 200
            except error.ConnectError:
                return False
        await poll(healthy, timeout, f"{self.plugin} /healthz 200")

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, and wait for the exit."""
        self.process.signal("TERM")
        await self.process.wait_ended(timeout)

    async def kill(self) -> None:
        await self.process.kill()


class _Body(protocol.Protocol):
    """Collects a response body; C{done} fires with it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)
