"""
What the bench scripts share: a child process whose output lines are
collected (L{Child}), and their C{--markdown FILE} output: tables between
C{<!-- bench:NAME begin -->} / C{<!-- bench:NAME end -->} markers, the
format that C{bench/update_doc.py} copies into doc/performance.md.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

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
