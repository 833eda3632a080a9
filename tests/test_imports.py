"""
Importing a module of dftx installs no reactor and starts nothing, so that an
application can still choose its reactor after importing dftx.  Each module
is imported in a fresh interpreter, which then reports what the import did.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every module of the package (the runtime, the harness and the sandbox) but
# C{dftx.__main__}, which runs the CLI when imported, as C{python -m} wants.
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts[:-1] if p.name == "__init__.py"
             else p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "dftx").rglob("*.py") if p.name != "__main__.py")

# Run in the child: spy on atexit.register, import the module, report.
PROBE = """
import atexit, importlib, json, os, sys, threading

hooks = []
register = atexit.register

def spy(func, *args, **kwargs):
    hooks.append(f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}")
    return register(func, *args, **kwargs)

atexit.register = spy
threads = threading.active_count()
importlib.import_module(sys.argv[1])
children = []
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as f:
        children += f.read().split()
print(json.dumps({
    "reactor": "twisted.internet.reactor" in sys.modules,
    "atexit": [h for h in hooks if h.startswith("dftx")],
    "threads": threading.active_count() - threads,
    "children": children,
}))
"""


@pytest.fixture(scope="module")
def probes():
    """Each module imported in its own fresh interpreter, all at once: the
    report each child printed, by module."""
    # -c puts the working directory first on sys.path: this tree's dftx.
    children = {m: subprocess.Popen([sys.executable, "-c", PROBE, m], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for m in MODULES}
    reports = {}
    for module, child in children.items():
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, f"import {module} failed: {err[-2000:]}"
        reports[module] = json.loads(out.splitlines()[-1])
    return reports


def test_every_module_is_probed():
    assert "dftx" in MODULES and "dftx.pubsub.zmq" in MODULES and "dftx.harness" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_import_installs_no_reactor_and_starts_nothing(module, probes):
    assert probes[module] == {"reactor": False, "atexit": [], "threads": 0, "children": []}
