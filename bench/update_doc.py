"""
Run one bench script and put its tables into doc/performance.md (those
of bench/fleet.py into doc/scale.md):

    .venv/bin/python bench/update_doc.py NAME [ARGS...]     # e.g. scale --sizes 10,100

runs C{bench/NAME.py ARGS --markdown TMP} (its usual output goes to the
terminal) and, for every block C{<!-- bench:BLOCK begin -->} ...
C{<!-- bench:BLOCK end -->} that the run wrote, replaces the text between
the same markers in the page with the new table and a line naming
the machine (CPUs, CPU model, Python, Twisted, redis-server) and the
command.  A block that the document lacks is an error (nothing is written);
the text outside the markers is kept.  C{make bench} runs this for every
script.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import BLOCK, REPO

DOC = REPO / "doc" / "performance.md"
PAGES = {"fleet": REPO / "doc" / "scale.md"}  # a script whose tables go elsewhere than DOC


def blocks(text: str) -> dict[str, str]:
    """Block name -> the text between its markers."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def replace(doc: str, new: dict[str, str]) -> str:
    """C{doc} with the body of each block named in C{new} replaced.

    @raise ValueError: a block of C{new} is not in C{doc}, or is there twice.
    """
    found = [m["name"] for m in BLOCK.finditer(doc)]
    for name in new:
        if found.count(name) != 1:
            raise ValueError(f"doc has {found.count(name)} blocks named {name!r}, not 1: "
                             f"add <!-- bench:{name} begin --> / end markers")

    def body(m: re.Match) -> str:
        name = m["name"]
        text = new.get(name, m["body"])
        return f"<!-- bench:{name} begin -->\n{text}<!-- bench:{name} end -->"
    return BLOCK.sub(body, doc)


def machine() -> str:
    """CPUs, CPU model and versions, as one phrase."""
    import twisted

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    try:
        redis = subprocess.run(["redis-server", "--version"], capture_output=True,
                               text=True).stdout
        redis = re.search(r"v=(\S+)", redis)[1]
    except (OSError, TypeError):
        redis = "not installed"
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
            f"Twisted {twisted.__version__}, redis-server {redis}")


def footer(command: str) -> str:
    return (f"\nMeasured on {machine()}, on {datetime.date.today().isoformat()}, by "
            f"`{command}`.\n")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__.strip().splitlines()[0] + "\n  " + __doc__.strip().splitlines()[2])
    name, args = sys.argv[1], sys.argv[2:]
    script = REPO / "bench" / f"{name}.py"
    python = os.path.relpath(sys.executable, REPO)
    if python.startswith(".."):
        python = sys.executable
    command = " ".join([python, f"bench/{name}.py", *args])
    with tempfile.NamedTemporaryFile("r", suffix=".md") as out:
        subprocess.run([sys.executable, str(script), *args, "--markdown", out.name],
                       cwd=REPO, check=True)
        new = blocks(Path(out.name).read_text())
    if not new:
        sys.exit(f"{script} wrote no tables")
    end = footer(command)
    doc = PAGES.get(name, DOC)
    doc.write_text(replace(doc.read_text(), {k: v + end for k, v in new.items()}))
    print(f"{doc.relative_to(REPO)}: rewrote {', '.join(new)}")


if __name__ == "__main__":
    main()
