"""The sandbox's narrated scenario, as `make sandbox SANDBOX_ARGS=--once` runs it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest_twisted

from dftx.harness import run


@pytest_twisted.ensureDeferred
async def test_sandbox_once_runs_the_scenario_and_cleans_up():
    out = await run([sys.executable, "-m", "dftx.sandbox", "--once"], timeout=240)
    for step in ("both controllers have them", "port_status says up",
                 "first NB write succeeded after", "every controller's cache equals",
                 "port_status says down", "scenario done", "stopping everything"):
        assert step in out, out
    base = Path(re.search(r"in (/\S+dftx-sandbox-\S+)", out).group(1))
    assert not base.exists()  # its directory is gone
