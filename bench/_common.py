"""
What the bench scripts share: a child process whose output lines are
collected (L{Child}), and their C{--markdown FILE} output: tables between
C{<!-- bench:NAME begin -->} / C{<!-- bench:NAME end -->} markers, the
format that C{bench/update_doc.py} copies into doc/performance.md; and
what processes cost: CPU and resident memory from /proc, and Redis nodes'
CPU and INFO commandstats (L{RedisUsage}).
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w.-]+) begin -->\n(?P<body>.*?)"
                   r"<!-- bench:(?P=name) end -->", re.S)


class Child:
    """A child process whose stdout lines are collected (stderr passes through)."""

    live: list["Child"] = []

    def __init__(self, argv: list[str], log: Path | None = None) -> None:
        from twisted.internet import defer, protocol, reactor

        self.lines: list[str] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        child = self
        buffer = bytearray()
        log_file = open(log, "ab") if log else None

        class Proto(protocol.ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                if log_file:
                    log_file.write(data)
                buffer.extend(data)
                while b"\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\n")
                    buffer[:] = rest
                    child.lines.append(line.decode())

            def errReceived(self, data: bytes) -> None:
                sys.stderr.write(data.decode(errors="replace"))

            def processEnded(self, reason) -> None:
                if log_file:
                    log_file.close()
                child.ended.callback(None)

        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.transport = reactor.spawnProcess(Proto(), argv[0], argv, env=env)
        Child.live.append(self)

    async def line(self, prefix: str, timeout: float = 30) -> str:
        """The first line starting with C{prefix}, waiting up to C{timeout} s."""
        from dftx.harness import poll

        def found():
            return next((l for l in self.lines if l.startswith(prefix)), None)
        return await poll(found, timeout, f"a line starting {prefix!r}", interval=0.01)

    def kill(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; the first column left-aligned, the others right."""
    lines = ["| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | None, blocks: dict[str, str]) -> None:
    """Write C{blocks} (name -> markdown) to C{path} between bench markers
    (nothing when C{path} is None)."""
    if path:
        Path(path).write_text("".join(
            f"<!-- bench:{name} begin -->\n{body}<!-- bench:{name} end -->\n"
            for name, body in blocks.items()))


# --- what a set of processes costs: /proc and Redis INFO commandstats ---------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process C{pid} so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of process C{pid} (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


class RedisUsage:
    """
    What a set of redis-server nodes (L{dftx.harness.RedisServer}) had spent
    at one moment: CPU seconds from /proc, and, with C{commands}, the
    calls and microseconds of each command from INFO commandstats.  The
    difference of two (L{since}) covers the nodes running at both moments.
    """

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, Counter[str]] = {}
        self.usec: dict[str, Counter[str]] = {}

    @classmethod
    async def take(cls, nodes: Sequence, commands: bool = True) -> "RedisUsage":
        usage = cls()
        for node in nodes:
            pid = node.process.pid
            cpu = cpu_seconds(pid) if pid else None
            if cpu is None:
                continue
            usage.cpu[node.address] = cpu
            if commands:
                calls, usec = Counter(), Counter()
                for name, text in (await node.info("commandstats")).items():
                    stats = dict(kv.split("=", 1) for kv in text.split(","))
                    calls[name.removeprefix("cmdstat_")] = int(stats["calls"])
                    usec[name.removeprefix("cmdstat_")] = int(stats["usec"])
                usage.calls[node.address], usage.usec[node.address] = calls, usec
        return usage

    def since(self, earlier: "RedisUsage") -> tuple[float, Counter[str], Counter[str]]:
        """CPU seconds, calls and microseconds per command from C{earlier}
        to this one, summed over the nodes both saw; the INFO that took
        C{earlier} is not counted."""
        both = self.cpu.keys() & earlier.cpu.keys()
        cpu = sum(self.cpu[a] - earlier.cpu[a] for a in both)
        calls: Counter[str] = Counter()
        usec: Counter[str] = Counter()
        for a in both & self.calls.keys() & earlier.calls.keys():
            calls.update(self.calls[a])
            calls.subtract(earlier.calls[a])
            calls["info"] -= 1
            usec.update(self.usec[a])
            usec.subtract(earlier.usec[a])
        return cpu, +calls, +usec


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def orchestrate_with(parser: Any, chosen: str, known: Any, orchestrate: Any, args: Any) -> None:
    """Refuse transports not in C{known} (C{chosen}: comma-separated), then
    run C{orchestrate(args)} under the reactor until it is done."""
    unknown = set(chosen.split(",")) - set(known)
    if unknown:
        parser.error(f"unknown transports: {', '.join(sorted(unknown))}")
    from twisted.internet import defer, task

    task.react(lambda _: defer.ensureDeferred(orchestrate(args)))
