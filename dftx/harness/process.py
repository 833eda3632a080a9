"""
What every server of the harness shares: finding a system binary, a free
loopback port, polling with a deadline, running a command to completion
(L{run}), and one long-running child process (L{ChildProcess}).

Nothing happens at import: no reactor is installed (what needs one takes
one, and imports the global reactor only when called without it), and
the exit-time cleanup is registered when the first process is spawned.  From
then on every process spawned here that is still running at interpreter exit
is killed by PID, so a failing test cannot leave servers behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet import defer, error, protocol, task
from twisted.python.failure import Failure

from dftx.deferreds import or_global_reactor

__all__ = [
    "NO_SERVERS_ENV",
    "ChildProcess",
    "ServerProcess",
    "CommandFailed",
    "Host",
    "LOOPBACK",
    "ServersOff",
    "find_binary",
    "free_port",
    "poll",
    "run",
]

_PACKAGES = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "ovsdb-server": "openvswitch-common",
    "ovsdb-tool": "openvswitch-common",
    "ovsdb-client": "openvswitch-common",
    "ovs-vsctl": "openvswitch-switch",
}

# Set (to anything but ""), every ChildProcess refuses to start: the test
# selection that needs no server (pytest --no-servers) sets it, and child
# processes inherit it.
NO_SERVERS_ENV = "DFTX_NO_SERVERS"

# The PIDs of the processes spawned here that have not ended yet, for the
# exit-time cleanup (registered with atexit by the first spawn).
_live: set[int] = set()
_cleanup_registered = False


def _kill_leftovers() -> None:
    for pid in list(_live):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _track(pid: int) -> None:
    """Remember C{pid} for the exit-time kill (registering it the first time)."""
    global _cleanup_registered
    if not _cleanup_registered:
        atexit.register(_kill_leftovers)
        _cleanup_registered = True
    _live.add(pid)


class Host:
    """
    Where a server runs: the address others reach it at, and the argv
    prefix that runs a command there (none on this machine's loopback;
    C{ip netns exec NS} in a L{dftx.harness.netns.Lab} namespace).
    Commands the harness runs against a server (redis-cli, ovsdb-client)
    run with the same prefix and reach it on that host's own 127.0.0.1, so
    they work while the host is cut off from this process.
    """

    def __init__(self, name: str, address: str, prefix: Sequence[str] = ()) -> None:
        self.name = name
        self.address = address
        self.prefix = list(prefix)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address}>"


LOOPBACK = Host("loopback", "127.0.0.1")
"""This process's own host: every server of the harness runs here unless
given another L{Host}."""


class ServersOff(RuntimeError):
    """A server was to be started while C{$DFTX_NO_SERVERS} is set."""


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
    lack); a C{name} with a slash is a path, returned when executable.

    @raise FileNotFoundError: naming the Debian package that provides it.
    """
    if os.sep in name:
        if os.access(name, os.X_OK):
            return name
        raise FileNotFoundError(f"{name} is not an executable file")
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
    *,
    reactor: Any = None,
) -> Any:
    """
    Call C{check} (which may return a Deferred or a coroutine) until it
    returns a true value or the deadline passes; an exception from C{check}
    counts as "not yet".  C{reactor} gives the time (the global reactor when
    omitted).

    @return: the true value.
    @raise TimeoutError: naming C{what} and the last exception, if any.
    """
    reactor = or_global_reactor(reactor)
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
        self.pid = 0

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        _track(self.pid)

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        _live.discard(self.pid)
        code = getattr(reason.value, "exitCode", None)
        self.done.callback(-1 if code is None else code)


async def run(
    argv: Sequence[str], timeout: float = 20.0, check: bool = True, *, reactor: Any = None,
    host: Host = LOOPBACK,
) -> str:
    """
    Run a command (first element looked up with L{find_binary}) on C{host}
    and return its stdout and stderr as text.

    @raise CommandFailed: on a non-zero exit (when C{check}), or when it has
        not finished after C{timeout} seconds (it is then killed).
    """
    reactor = or_global_reactor(reactor)
    argv = [*host.prefix, find_binary(argv[0]), *argv[1:]]
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
    One long-running server process on C{host}, its output appended to
    C{log_path}, spawned by C{reactor} (the global one when omitted).  On a
    namespace host the prefix (C{ip netns exec}) execs the server: the PID
    is the server's.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, cwd: Path,
                 reactor: Any = None, host: Host = LOOPBACK) -> None:
        self.binary = find_binary(argv[0])
        self.argv = [*host.prefix, self.binary, *argv[1:]]
        self.log_path = log_path
        self.cwd = cwd
        self.reactor = or_global_reactor(reactor)
        self.transport: Any = None
        self._ended: defer.Deferred[None] = defer.Deferred()
        self._log: Any = None
        self._pid = 0

    @property
    def pid(self) -> int | None:
        """The PID while it runs, else None."""
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether it was started and has not exited."""
        return self.transport is not None and not self._ended.called

    def start(self) -> None:
        """
        Spawn the process (again, after it exited).

        @raise ServersOff: while C{$DFTX_NO_SERVERS} is set.
        """
        if os.environ.get(NO_SERVERS_ENV):
            raise ServersOff(f"{self.binary} not started: ${NO_SERVERS_ENV} is set "
                             "(a test that starts a server must be marked servers)")
        self._ended = defer.Deferred()
        self._log = open(self.log_path, "ab")
        self.reactor.spawnProcess(
            self, self.argv[0], self.argv, env=os.environ, path=str(self.cwd)
        )
        self._pid = self.transport.pid
        _track(self._pid)

    def outReceived(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        _live.discard(self._pid)
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
        await poll(lambda: ended.called, timeout, f"exit of {self.binary}",
                   reactor=self.reactor)

    async def kill(self) -> None:
        """kill -9 and wait for the exit (works on a stopped process too)."""
        self.signal("KILL")
        await self.wait_ended()


class ServerProcess:
    """
    What every server of the harness does with its one L{ChildProcess}
    (C{process}): kill -9, restart, pause and resume.  A subclass provides
    C{start(timeout)}, which starts the process and waits until it serves.
    """

    process: ChildProcess
    paused = False

    @property
    def running(self) -> bool:
        """Whether the process runs (paused or not)."""
        return self.process.running

    async def start(self, timeout: float = 15.0) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        """kill -9 the server and wait until it is gone."""
        await self.process.kill()
        self.paused = False

    async def restart(self, timeout: float = 15.0) -> None:
        """kill -9 (if running) and start again on the same port and files."""
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
