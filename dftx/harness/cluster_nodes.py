"""What CLUSTER NODES says: one L{ClusterNode} per line (L{parse_cluster_nodes})."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CLUSTER_SLOTS", "ClusterNode", "parse_cluster_nodes"]

CLUSTER_SLOTS = 16384


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

