"""ovsdb-server on a fresh Open_vSwitch database (L{OvsdbServer}), standalone or RAFT."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import endpoints

from dftx.deferreds import or_global_reactor
from dftx.harness.process import (
    LOOPBACK, ChildProcess, CommandFailed, Host, ServerProcess, free_port, poll, run,
)
from dftx.ovsdb.jsonrpc import JsonRpcProtocol

__all__ = ["OvsdbServer", "VSWITCH_SCHEMA"]

VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


class OvsdbServer(ServerProcess):
    """
    ovsdb-server on a fresh Open_vSwitch database, listening on a unix
    socket and on C{tcp:127.0.0.1:port}.  With C{clustered}, the database is
    a one-member RAFT cluster (C{ovsdb-tool create-cluster}), which is what
    gives monitor_cond_since real transaction ids.  C{extra_args} go to
    ovsdb-server (e.g. a C{--remote=pssl:...} with its key and certificates).
    C{reactor} runs its processes, timers and connections (the global one
    when omitted).  On another C{host} (a lab namespace) its tcp remote is
    that host's 127.0.0.1, for the controller beside it.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        clustered: bool = False,
        schema: str = VSWITCH_SCHEMA,
        extra_args: Sequence[str] = (),
        reactor: Any = None,
        host: Host = LOOPBACK,
    ) -> None:
        self.reactor = or_global_reactor(reactor)
        self.host = host
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
            self.reactor,
            host,
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

    async def start(self, timeout: float = 15.0) -> None:
        """Create the database file if needed, start, wait for list-dbs."""
        if not self.db_path.exists():
            if self.clustered:
                raft = free_port()
                await run(["ovsdb-tool", "create-cluster", str(self.db_path),
                           self.schema, f"tcp:127.0.0.1:{raft}"], reactor=self.reactor)
            else:
                await run(["ovsdb-tool", "create", str(self.db_path), self.schema],
                          reactor=self.reactor)
        self.process.start()
        self.paused = False
        await poll(self._ready, timeout, f"ovsdb-server {self.tcp} list-dbs",
                   reactor=self.reactor)

    async def _ready(self) -> bool:
        if not self.process.running:
            raise RuntimeError(f"exited; see {self.process.log_path}")
        dbs = await run(["ovsdb-client", "--timeout=2", "list-dbs", self.tcp], timeout=3,
                        reactor=self.reactor, host=self.host)
        return "Open_vSwitch" in dbs.split()

    async def vsctl(self, *args: str, timeout: float = 20.0) -> str:
        """Run C{ovs-vsctl --no-wait} against this server; return stdout."""
        out = await run(
            ["ovs-vsctl", f"--db={self.unix}", "--no-wait",
             f"--timeout={int(timeout)}", *args],
            timeout=timeout + 5, reactor=self.reactor,
        )
        return out.strip()

    async def transact(self, operations: Sequence[Any], timeout: float = 60.0) -> list[Any]:
        """
        One JSON-RPC C{transact} of C{operations} (RFC 7047 section 5.2,
        without the database name) over the unix socket, for changes too
        large for ovs-vsctl.  @return: the reply's list of results.
        """
        endpoint = endpoints.UNIXClientEndpoint(self.reactor, str(self.sock_path))
        proto = await endpoints.connectProtocol(
            endpoint, JsonRpcProtocol(self.reactor, probe_interval=None))
        try:
            request = proto.request("transact", ["Open_vSwitch", *operations])
            return await request.addTimeout(timeout, self.reactor)
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

    async def stop(self) -> None:
        """Kill the server and remove its directory (if this object made it)."""
        await self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
