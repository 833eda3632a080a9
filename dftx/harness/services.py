"""
dftx's own services as child processes (L{DftxService}): C{twistd -n
dfpublisher} and C{twistd -n dfcontroller} with a configuration file for the
harness's servers, and their HTTP status endpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import error
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from dftx.deferreds import or_global_reactor
from dftx.harness.process import LOOPBACK, ChildProcess, CommandFailed, Host, free_port, poll

__all__ = ["DftxService", "TWISTD_MAIN"]

TWISTD_MAIN = "from twisted.scripts.twistd import run; run()"


def _df_section(seeds: Sequence[str], pub_sub_driver: str, publisher_timeout: int,
                host: Host) -> str:
    return (f"[df]\nnb_db_driver = redis\nremote_db_hosts = {','.join(seeds)}\n"
            f"pub_sub_driver = {pub_sub_driver}\npublisher_timeout = {publisher_timeout}\n"
            f"management_ip = {host.address}")


class DftxService:
    """
    One dftx service, C{twistd -n dfpublisher|dfcontroller --config FILE},
    as a child process of this Python, with its configuration file and log
    in C{directory}.  L{publisher} and L{controller} write the usual
    configuration for the harness's servers.  C{reactor} runs the process
    and the HTTP requests (the global one when omitted).  On another
    C{host} (a lab namespace) the service runs there and binds its PUB
    socket and HTTP endpoint at that host's address.

    @ivar uri: the C{tcp://} address of the service's PUB socket.
    @ivar ipc: (dfpublisher) the C{ipc://} address its relay pulls from.
    """

    uri: str
    ipc: str

    def __init__(self, plugin: str, directory: Path, config: str, http_port: int,
                 reactor: Any = None, host: Host = LOOPBACK) -> None:
        self.plugin = plugin
        self.host = host
        self.reactor = or_global_reactor(reactor)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.config = self.dir / "dftx.ini"
        self.config.write_text(config)
        self.process = ChildProcess(
            [sys.executable, "-c", TWISTD_MAIN, "-n", "--pidfile=", plugin,
             "--config", str(self.config)],
            self.dir / "twistd.log", self.dir, self.reactor, host)

    @classmethod
    def publisher(cls, directory: Path, seeds: Sequence[str], pub_sub_driver: str = "zmq",
                  publisher_timeout: int = 30, cluster_watch_interval: float = 0.5,
                  extra: str = "", reactor: Any = None, host: Host = LOOPBACK,
                  ) -> "DftxService":
        """dfpublisher on free ports, relaying C{ipc://DIR/publisher.sock}."""
        directory = Path(directory)
        http_port, port = free_port(), free_port()
        svc = cls("dfpublisher", directory, f"""\
{_df_section(seeds, pub_sub_driver, publisher_timeout, host)}
[df_redis]
cluster_watch_interval = {cluster_watch_interval}
[neutron_server]
publisher_port = {port}
publisher_bind_address = {host.address}
publisher_multiproc_socket = {directory / "publisher.sock"}
http_endpoint = tcp:{http_port}:interface={host.address}
{extra}""", http_port, reactor, host)
        svc.uri = f"tcp://{host.address}:{port}"
        svc.ipc = f"ipc://{directory / 'publisher.sock'}"
        return svc

    @classmethod
    def controller(cls, directory: Path, seeds: Sequence[str], chassis: str, ovsdb: str,
                   pub_sub_driver: str = "zmq", publisher_timeout: int = 30,
                   tables: str = "lport,lswitch,chassis", db_sync_time: float = 120,
                   extra: str = "", reactor: Any = None, host: Host = LOOPBACK,
                   ) -> "DftxService":
        """dfcontroller C{chassis} on free ports, monitoring C{ovsdb}."""
        http_port, port = free_port(), free_port()
        svc = cls("dfcontroller", directory, f"""\
{_df_section(seeds, pub_sub_driver, publisher_timeout, host)}
[df_local_controller]
chassis_name = {chassis}
publisher_port = {port}
publisher_bind_address = {host.address}
ovsdb_connection = {ovsdb}
tables = {tables}
db_sync_time = {db_sync_time}
http_endpoint = tcp:{http_port}:interface={host.address}
{extra}""", http_port, reactor, host)
        svc.uri = f"tcp://{host.address}:{port}"
        return svc

    @property
    def log(self) -> str:
        """The service's output so far."""
        return self.process.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        """The URL of C{path} on the service's HTTP endpoint."""
        return f"http://{self.host.address}:{self.http_port}{path}"

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET C{path} of the service's HTTP endpoint: (status, body)."""
        agent = Agent(self.reactor, pool=HTTPConnectionPool(self.reactor, persistent=False))
        response = await agent.request(b"GET", self.url(path).encode())
        return response.code, await readBody(response)

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
        await poll(healthy, timeout, f"{self.plugin} /healthz 200", reactor=self.reactor)

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, and wait for the exit."""
        self.process.signal("TERM")
        await self.process.wait_ended(timeout)

    async def kill(self) -> None:
        """kill -9 and wait for the exit."""
        await self.process.kill()
