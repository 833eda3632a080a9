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

# Every module that must be importable without side effects; add a module
# here when it joins the package.
MODULES = [
    "dftx.harness",
    "dftx.harness.cluster",
    "dftx.harness.cluster_nodes",
    "dftx.harness.ovsdb",
    "dftx.harness.process",
    "dftx.harness.redis",
    "dftx.harness.services",
    "dftx.sandbox",
]

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


@pytest.mark.parametrize("module", MODULES)
def test_import_installs_no_reactor_and_starts_nothing(module):
    # -c puts the working directory first on sys.path: this tree's dftx.
    out = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == {
        "reactor": False, "atexit": [], "threads": 0, "children": []}
