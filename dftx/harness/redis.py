"""One redis-server on loopback (L{RedisServer}), alone or as a Redis Cluster node."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dftx.deferreds import or_global_reactor
from dftx.harness.process import ChildProcess, ServerProcess, free_port, poll, run

__all__ = ["RedisServer"]


class RedisServer(ServerProcess):
    """
    One redis-server on 127.0.0.1, without persistence: no RDB snapshots,
    no AOF, and a replica deletes the RDB file of each full sync once it
    has loaded it (otherwise it keeps it as dump.rdb and loads it when
    started again, bringing back keys long deleted).  Only an explicit
    SAVE leaves data for a restart.  With C{cluster}, it is a
    cluster-enabled node that keeps its node id (nodes.conf) across
    L{restart}.  C{reactor} runs its processes and timers (the global one
    when omitted).
    """

    def __init__(
        self,
        base_dir: Path,
        cluster: bool = False,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        reactor: Any = None,
    ) -> None:
        self.reactor = or_global_reactor(reactor)
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
            [*args, *extra_args], self.dir / "redis.log", self.dir, self.reactor
        )

    @property
    def address(self) -> str:
        """C{"127.0.0.1:port"}."""
        return f"127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<RedisServer {self.address} pid={self.process.pid}>"

    async def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run one command with redis-cli and return its raw output, stripped."""
        out = await run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            timeout=timeout, reactor=self.reactor,
        )
        return out.strip()

    async def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING."""
        self.process.start()
        self.paused = False
        await poll(self._pong, timeout, f"redis-server {self.address} PING",
                   reactor=self.reactor)

    async def _pong(self) -> bool:
        if not self.process.running:
            raise RuntimeError(f"exited; see {self.process.log_path}")
        return (await self.cli("PING", timeout=2)) == "PONG"

    async def info(self, section: str) -> dict[str, str]:
        """INFO C{section} as a dict ("cluster" means CLUSTER INFO)."""
        args = ("CLUSTER", "INFO") if section == "cluster" else ("INFO", section)
        text = await self.cli(*args)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )
