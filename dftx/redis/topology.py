"""
The cluster's shape: which master serves each slot, and its replicas.

L{parse_cluster_slots} turns a CLUSTER SLOTS reply into a L{Topology};
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

__all__ = ["Shard", "Topology", "parse_cluster_slots"]


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
