"""
A Redis Cluster with replicas on loopback (L{RedisCluster}), and what tests
do to one: fail a replica over, migrate a slot (or leave it mid-migration),
and repair whatever they broke.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import defer

from dftx.harness.cluster_nodes import CLUSTER_SLOTS, ClusterNode, parse_cluster_nodes
from dftx.deferreds import or_global_reactor
from dftx.harness.process import CommandFailed, Host, poll, run
from dftx.harness.redis import RedisServer

__all__ = ["RedisCluster"]


class RedisCluster:
    """
    A Redis Cluster of C{masters} masters, each with C{replicas} replicas, on
    loopback.  C{node_timeout_ms} is cluster-node-timeout: a killed master
    is failed over after about that long plus the election (3-5 s at 2000).
    C{reactor} runs its processes and timers (the global one when omitted).
    C{hosts}, one per node (masters first), puts each node on its own host
    (L{dftx.harness.netns.Lab}); omitted, every node is on loopback.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        reactor: Any = None,
        hosts: Sequence[Host] | None = None,
    ) -> None:
        self.reactor = or_global_reactor(reactor)
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="dftx-cluster-"))
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        count = masters * (1 + replicas)
        if hosts is not None and len(hosts) != count:
            raise ValueError(f"{len(hosts)} hosts for {count} nodes")
        self.nodes = [
            RedisServer(self.dir, cluster=True, node_timeout_ms=node_timeout_ms,
                        reactor=self.reactor, **({} if hosts is None else {"host": hosts[i]}))
            for i in range(count)
        ]

    @property
    def seeds(self) -> list[str]:
        """Every node's C{"host:port"}, for a client's host list."""
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
            timeout=timeout, reactor=self.reactor,
        )
        await self.wait_healthy(timeout)

    async def stop(self) -> None:
        """Kill every node and remove the directory (if this object made it)."""
        for n in self.nodes:
            await n.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def flushall(self) -> None:
        """Delete every key: FLUSHALL on every master (their replicas
        follow)."""
        for m in await self.masters():
            await m.flushall()

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
        await poll(self.is_healthy, timeout, "healthy cluster", interval=0.2,
                   reactor=self.reactor)

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
        deadline = self.reactor.seconds() + timeout
        while True:
            await replica.cli("CLUSTER", "FAILOVER", *([mode] if mode else []))
            try:
                await self.wait_promoted(replica, min(10.0, deadline - self.reactor.seconds()))
                return
            except TimeoutError:
                if self.reactor.seconds() + 1 >= deadline:
                    raise

    async def wait_promoted(self, node: RedisServer, timeout: float = 30.0) -> None:
        """
        Wait until C{node} says it is a master and the cluster's view (what
        L{masters} and L{owner} read) agrees: gossip reaches the other nodes
        a little after the promoted node knows.
        """
        async def promoted() -> bool:
            return await self._role_is(node, "master") and node in await self.masters()

        await poll(promoted, timeout, f"{node.address} to become master",
                   reactor=self.reactor)

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
                "MIGRATE", dst.host.address, str(dst.port), "", "0", "10000",
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
            lambda: self._owned_by(slot, dst), 30, f"slot {slot} on {dst.address}",
            reactor=self.reactor,
        )

    async def _owned_by(self, slot: int, dst: RedisServer) -> bool:
        return (await self.owner(slot)) is dst and await self.is_healthy()

    async def migrate_slot(self, slot: int, dst: RedisServer) -> None:
        """Move C{slot} with all its keys to master C{dst}."""
        src = await self.begin_migration(slot, dst)
        await self.finish_migration(slot, src, dst)

