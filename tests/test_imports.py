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

# Run in the child: spy on atexit.register, import the modules one after the
# other, and report after each what has happened so far.  A side effect shows
# after the first import that causes it (the module or one it imports), and
# stays visible after every later one.
PROBE = """
import atexit, importlib, json, os, sys, threading

hooks = []
register = atexit.register

def spy(func, *args, **kwargs):
    hooks.append(f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}")
    return register(func, *args, **kwargs)

atexit.register = spy
threads = threading.active_count()
reports = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    children = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            children += f.read().split()
    reports[name] = {
        "reactor": "twisted.internet.reactor" in sys.modules,
        "atexit": [h for h in hooks if h.startswith("dftx")],
        "threads": threading.active_count() - threads,
        "children": children,
    }
print(json.dumps(reports))
"""


@pytest.fixture(scope="module")
def probes():
    """Every module imported in one fresh interpreter, in order: what had
    happened after each import, by module."""
    # -c puts the working directory first on sys.path: this tree's dftx.
    out = subprocess.run([sys.executable, "-c", PROBE, *MODULES], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_every_module_is_probed():
    assert "dftx" in MODULES and "dftx.pubsub.zmq" in MODULES and "dftx.harness" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_import_installs_no_reactor_and_starts_nothing(module, probes):
    """Fails at the first module (in sorted order) whose import, or that of a
    module it imports, had a side effect."""
    assert probes[module] == {"reactor": False, "atexit": [], "threads": 0, "children": []}
