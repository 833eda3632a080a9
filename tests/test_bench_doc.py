"""
bench/update_doc.py's marker replacement (pure), and a smoke run of
bench/scale.py with tiny numbers on every transport (real servers, started
by the script through dftx.harness).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import update_doc  # noqa: E402

DOC = """\
# Title

Prose before.

<!-- bench:one begin -->
| a | b |
| --- | ---: |
| x | 1 |
<!-- bench:one end -->

Prose between, kept.

<!-- bench:two.sub begin -->
old two
<!-- bench:two.sub end -->
Prose after.
"""


def test_blocks_reads_every_marked_block():
    assert update_doc.blocks(DOC) == {
        "one": "| a | b |\n| --- | ---: |\n| x | 1 |\n", "two.sub": "old two\n"}


def test_replace_changes_only_the_named_blocks():
    out = update_doc.replace(DOC, {"two.sub": "new two\n"})
    assert out == DOC.replace("old two\n", "new two\n")
    assert update_doc.blocks(out)["one"] == update_doc.blocks(DOC)["one"]


def test_replace_is_repeatable():
    once = update_doc.replace(DOC, {"one": "t\n", "two.sub": "u\n"})
    assert update_doc.replace(once, {"one": "t\n", "two.sub": "u\n"}) == once
    assert "Prose between, kept." in once and once.endswith("Prose after.\n")


def test_replace_refuses_a_block_the_doc_lacks_or_has_twice():
    with pytest.raises(ValueError, match="three"):
        update_doc.replace(DOC, {"three": "x\n"})
    twice = DOC + "<!-- bench:one begin -->\ny\n<!-- bench:one end -->\n"
    with pytest.raises(ValueError, match="2 blocks"):
        update_doc.replace(twice, {"one": "x\n"})


def test_blocks_ignores_unbalanced_markers():
    text = "<!-- bench:a begin -->\nx\n<!-- bench:b end -->\n"
    assert update_doc.blocks(text) == {}
    with pytest.raises(ValueError):
        update_doc.replace(text, {"a": "y\n"})


def test_machine_and_footer_name_the_command():
    line = update_doc.footer(".venv/bin/python bench/scale.py")
    assert "CPUs (" in line and "Python 3." in line and "Twisted " in line
    assert "redis-server " in line and "`.venv/bin/python bench/scale.py`" in line


def test_scale_smoke(tmp_path):
    """Two and three subscribers, a handful of messages, each transport:
    the table comes out, every row with nothing lost."""
    md = tmp_path / "scale.md"
    out = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--sizes", "2,3", "--count", "20",
         "--latency-count", "3", "--markdown", str(md)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    table = update_doc.blocks(md.read_text())["scale"]
    assert table.startswith("| transport | subscribers |")
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [(r[0].lstrip("| "), r[1]) for r in rows] == [
        (name, n) for name in ("Redis classic", "Redis sharded", "ZeroMQ (dfpublisher)")
        for n in ("2", "3")]
    assert all(r[5] == "0" for r in rows), table
    assert table in out.stdout


def test_fleet_smoke(tmp_path):
    """Two controllers on a small NB DB over ZeroMQ: every phase runs (load,
    idle, writes, master kill, dfpublisher kill) and the caches come back
    equal to the DB after each kill."""
    md = tmp_path / "fleet.md"
    out = subprocess.run(
        [sys.executable, str(BENCH / "fleet.py"), "--sizes", "2", "--procs", "1",
         "--rows", "2000", "--topics", "20", "--idle-seconds", "1", "--writes", "20",
         "--transports", "zmq", "--recovery-timeout", "60", "--markdown", str(md)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    blocks = update_doc.blocks(md.read_text())
    assert set(blocks) == {"fleet", "fleet.read", "fleet.targets"}
    table = blocks["fleet"]
    assert table.startswith("| transport | controllers |") and "stopped" not in table, table
    [row] = [line.split(" | ") for line in table.splitlines()[2:3]]
    assert row[0] == "| ZeroMQ" and row[1] == "2"
    recovered = [float(row[k]) for k in (9, 11)]  # caches equal after a master, dfpublisher kill
    assert all(0 < s < 60 for s in recovered), table
    assert "differs" not in table and "missing" not in table, table
