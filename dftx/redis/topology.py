"""
The cluster's shape: which master serves each slot, and its replicas.

L{parse_cluster_shards} turns a CLUSTER SHARDS reply (Redis 7+, Valkey)
into a L{Topology}, and L{parse_cluster_slots} a CLUSTER SLOTS reply (every
Redis Cluster; deprecated since Redis 7.0) into the same one;
L{Topology.single} describes a non-cluster server as one shard that owns
every slot.  Two topologies compare equal when the same masters serve the
same slots with the same replicas, and L{Topology.moved_slots} says which
slots changed owner (what a sharded subscriber must resubscribe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dftx.endpoints import format_address, split_address
from dftx.errors import ProtocolError
from dftx.redis.slots import SLOTS

__all__ = ["Shard", "Topology", "parse_cluster_shards", "parse_cluster_slots"]


@dataclass(frozen=True)
class Shard:
    """Slots C{start}..C{end} (inclusive), their master and its replicas."""

    start: int
    end: int
    master: str
    replicas: tuple[str, ...] = ()


class Topology:
    """
    The masters that serve the 16384 slots (and their replicas), as one node
    described them.

    @ivar shards: the slot ranges, sorted by first slot.
    @ivar cluster: False for a non-cluster server (one shard, all slots).
    """

    def __init__(self, shards: list[Shard], cluster: bool = True) -> None:
        self.shards = sorted(shards, key=lambda s: s.start)
        self.cluster = cluster
        self._owners: list[str | None] = [None] * SLOTS
        for s in self.shards:
            self._owners[s.start:s.end + 1] = [s.master] * (s.end - s.start + 1)

    @classmethod
    def single(cls, address: str) -> "Topology":
        """A non-cluster server: one master owning every slot, no replicas."""
        return cls([Shard(0, SLOTS - 1, address)], cluster=False)

    def owners(self) -> list[str | None]:
        """A new list: slot -> address of its master (None: no owner)."""
        return list(self._owners)

    def owner(self, slot: int) -> str | None:
        """The master serving C{slot}, or None when no node does."""
        return self._owners[slot]

    @property
    def masters(self) -> list[str]:
        """Every master that serves slots, in slot order, once each."""
        return list(dict.fromkeys(s.master for s in self.shards))

    @property
    def nodes(self) -> list[str]:
        """Masters, then replicas, once each."""
        replicas = (r for s in self.shards for r in s.replicas)
        return list(dict.fromkeys([*self.masters, *replicas]))

    def replicas_of(self, master: str) -> list[str]:
        """The replicas of C{master}."""
        return list(dict.fromkeys(
            r for s in self.shards if s.master == master for r in s.replicas
        ))

    @property
    def covered(self) -> int:
        """How many slots have an owner."""
        return sum(s.end - s.start + 1 for s in self.shards)

    def moved_slots(self, newer: "Topology") -> list[int]:
        """The slots whose master is different in C{newer}."""
        old, new = self._owners, newer._owners
        return [slot for slot in range(SLOTS) if old[slot] != new[slot]]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description: C{{"cluster": bool, "masters": {address:
        {"slots": [[start, end], ...], "replicas": [...]}}}}."""
        masters: dict[str, Any] = {}
        for s in self.shards:
            m = masters.setdefault(s.master, {"slots": [], "replicas": []})
            m["slots"].append([s.start, s.end])
            for r in s.replicas:
                if r not in m["replicas"]:
                    m["replicas"].append(r)
        return {"cluster": self.cluster, "masters": masters}

    @classmethod
    def from_dict(cls, data: Any) -> "Topology":
        """
        The inverse of L{as_dict} (how the HA watcher ships a topology).

        @raise ProtocolError: for anything L{as_dict} does not produce, or
            slot ranges that are out of bounds or overlap.
        """
        try:
            shards = [
                Shard(int(start), int(end), str(master), tuple(str(r) for r in info["replicas"]))
                for master, info in data["masters"].items()
                for start, end in info["slots"]
            ]
            cluster = data["cluster"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"not a topology: {data!r:.100} ({e!r})") from None
        if not isinstance(cluster, bool) or not shards:
            raise ProtocolError(f"not a topology: {data!r:.100}")
        for s in shards:
            if not 0 <= s.start <= s.end < SLOTS:
                raise ProtocolError(f"not a topology: bad range {s.start}-{s.end}")
        topology = cls(shards, cluster=cluster)
        if topology.covered != sum(o is not None for o in topology._owners):
            raise ProtocolError("not a topology: slot ranges overlap")
        return topology

    def _key(self) -> tuple[Any, ...]:
        return (self.cluster, tuple(
            (s.start, s.end, s.master, tuple(sorted(s.replicas))) for s in self.shards
        ))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        ranges = ", ".join(f"{s.start}-{s.end}@{s.master}" for s in self.shards)
        return f"<Topology {'cluster' if self.cluster else 'single'} {ranges}>"


def parse_cluster_slots(reply: Any, peer: str) -> Topology:
    """
    Parse a CLUSTER SLOTS reply (RESP2, as hiredis gives it: bytes, ints,
    lists) from the node C{peer}.

    Each entry is C{[start, end, master, *replicas]}, each node
    C{[host, port, id?, extra?]}; Redis 7 adds the node id and a map of
    extra fields (hostname), which are ignored.  An empty or C{"?"} host
    (a node that does not know its own address) means the host of C{peer}.
    Ranges may come in any order and need not be contiguous.

    @raise ProtocolError: naming C{peer}, for a reply of another shape.
    """
    if not isinstance(reply, list):
        raise ProtocolError(f"CLUSTER SLOTS: expected an array, got {reply!r:.100}", peer)
    peer_host = split_address(peer)[0] if not peer.startswith("unix:") else "127.0.0.1"
    shards = []
    for entry in reply:
        if (
            not isinstance(entry, list)
            or len(entry) < 3
            or not all(isinstance(x, int) for x in entry[:2])
        ):
            raise ProtocolError(f"CLUSTER SLOTS: bad entry {entry!r:.100}", peer)
        start, end = entry[0], entry[1]
        if not 0 <= start <= end < SLOTS:
            raise ProtocolError(f"CLUSTER SLOTS: bad range {start}-{end}", peer)
        nodes = [_node_address(n, peer, peer_host) for n in entry[2:]]
        shards.append(Shard(start, end, nodes[0], tuple(nodes[1:])))
    return Topology(shards)


def _node_address(node: Any, peer: str, peer_host: str) -> str:
    if (
        not isinstance(node, list)
        or len(node) < 2
        or not isinstance(node[0], (bytes, type(None)))
        or not isinstance(node[1], int)
        or not 0 < node[1] < 65536
    ):
        raise ProtocolError(f"CLUSTER SLOTS: bad node {node!r:.100}", peer)
    host = (node[0] or b"").decode("utf-8", "replace")
    if host in ("", "?"):
        host = peer_host
    return format_address(host, node[1])


def parse_cluster_shards(reply: Any, peer: str) -> Topology:
    """
    Parse a CLUSTER SHARDS reply (RESP2, as hiredis gives it) from the node
    C{peer} into the topology CLUSTER SLOTS would describe at that moment.

    Each shard is a flat map C{slots} (start, end pairs; empty for a master
    that serves none) and C{nodes}, each node a flat map with C{id},
    C{port} and/or C{tls-port}, C{ip}, C{endpoint}, C{role} (C{master} or
    C{replica}), C{replication-offset} and C{health} (C{online}, C{fail}
    (the documentation says C{failed}), or C{loading}: a replica without a
    replication offset yet); unknown
    fields are ignored.  As in CLUSTER SLOTS: a node's address is its
    C{endpoint} (an empty or C{"?"} one means the host of C{peer}); a
    shard without slots is left out; a replica counts only when its health
    is C{online} (CLUSTER SLOTS leaves out failed replicas and those without
    an offset); a node is reached on its C{tls-port} when C{peer} was
    reached on its own C{tls-port}, else on its C{port}.  A shard's master
    is the node with role C{master} that serves its slots: Valkey keeps a
    failed-over master in its shard (role C{master}, health C{fail}) and,
    for a moment after it restarts, as a master without slots; of several
    masters the one online with the highest replication offset is taken
    (a promoted replica continues its old master's offset).

    @raise ProtocolError: naming C{peer}, for a reply of another shape.
    """
    if not isinstance(reply, list):
        raise ProtocolError(f"CLUSTER SHARDS: expected an array, got {reply!r:.100}", peer)
    parsed = [_shard_fields(entry, peer) for entry in reply]
    every_node = [n for _, nodes in parsed for n in nodes]
    peer_host, tls = _how_peer_was_reached(peer, every_node)
    shards = []
    for slots, nodes in parsed:
        if not slots:
            continue
        masters = [n for n in nodes if n.get(b"role") == b"master"]
        if not masters:
            raise ProtocolError(f"CLUSTER SHARDS: slots {slots[:2]}... have no master", peer)
        master = max(masters, key=_liveliness)
        replicas = tuple(
            _shard_node_address(n, peer, peer_host, tls) for n in nodes
            if n.get(b"role") == b"replica" and n.get(b"health") == b"online"
        )
        address = _shard_node_address(master, peer, peer_host, tls)
        shards += [Shard(start, end, address, replicas)
                   for start, end in zip(slots[::2], slots[1::2])]
    return Topology(shards)


def _liveliness(node: dict[bytes, Any]) -> tuple[bool, int]:
    """How a shard's masters rank: online first, then by replication offset."""
    offset = node.get(b"replication-offset")
    return node.get(b"health") == b"online", offset if isinstance(offset, int) else 0


def _flat_map(items: Any, what: str, peer: str) -> dict[bytes, Any]:
    """A RESP2 map (a flat array of keys and values) as a dict."""
    if (
        not isinstance(items, list)
        or len(items) % 2
        or not all(isinstance(k, bytes) for k in items[::2])
    ):
        raise ProtocolError(f"CLUSTER SHARDS: bad {what} {items!r:.100}", peer)
    return dict(zip(items[::2], items[1::2]))


def _shard_fields(entry: Any, peer: str) -> tuple[list[int], list[dict[bytes, Any]]]:
    """(slot range bounds, node maps) of one shard of the reply."""
    shard = _flat_map(entry, "shard", peer)
    slots, nodes = shard.get(b"slots"), shard.get(b"nodes")
    if (
        not isinstance(slots, list)
        or len(slots) % 2
        or not all(isinstance(x, int) for x in slots)
        or not isinstance(nodes, list)
    ):
        raise ProtocolError(f"CLUSTER SHARDS: bad shard {entry!r:.100}", peer)
    for start, end in zip(slots[::2], slots[1::2]):
        if not 0 <= start <= end < SLOTS:
            raise ProtocolError(f"CLUSTER SHARDS: bad range {start}-{end}", peer)
    return slots, [_flat_map(n, "node", peer) for n in nodes]


def _how_peer_was_reached(peer: str, nodes: list[dict[bytes, Any]]) -> tuple[str, bool]:
    """The host of C{peer}, and whether it was reached on its TLS port (a
    node listed with C{tls-port} equal to the port of C{peer}, and no node
    with that plain port)."""
    if peer.startswith("unix:"):
        return "127.0.0.1", False
    host, port = split_address(peer)
    tls = any(n.get(b"tls-port") == port for n in nodes) and not any(
        n.get(b"port") == port for n in nodes
    )
    return host, tls


def _shard_node_address(node: dict[bytes, Any], peer: str, peer_host: str, tls: bool) -> str:
    port = node.get(b"tls-port") if tls else node.get(b"port")
    if port is None:
        port = node.get(b"port", node.get(b"tls-port"))
    host = node.get(b"endpoint", node.get(b"ip"))
    if (
        not isinstance(host, (bytes, type(None)))
        or not isinstance(port, int)
        or not 0 < port < 65536
    ):
        raise ProtocolError(f"CLUSTER SHARDS: bad node {node!r:.100}", peer)
    text = (host or b"").decode("utf-8", "replace")
    return format_address(peer_host if text in ("", "?") else text, port)
