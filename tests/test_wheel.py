"""
A real install, as an operator makes one: the wheel built from this
checkout, installed with its dependencies into a fresh virtualenv (no
system site-packages, nothing of this checkout on its path), gives a
working C{dftx}, C{twistd dfpublisher} and C{twistd dfcontroller}, and
Twisted's plugin cache (C{twisted/plugins/dropin.cache}) stays current.

Building and installing take about 25 s (pip reuses its download cache and
the machine's package index), so this runs in C{make test}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from dftx import __version__
from dftx.harness import DftxService

ROOT = Path(__file__).resolve().parent.parent

# The environment of an operator's shell: nothing of this checkout or of
# the test run's virtualenv.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}

PLUGINS = """
import sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import log

log.startLogging(sys.stdout, setStdout=False)
print("plugins:", " ".join(sorted(p.tapname for p in getPlugins(IServiceMaker))))
"""
"""Lists the twistd plugins the way twistd finds them, logging what Twisted
says about its plugin cache (a cache it cannot write, say)."""


def sh(*argv: str | Path, cwd: Path) -> str:
    """Run C{argv} in the clean environment; @return: its stdout and stderr."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=CLEAN_ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}: exit {proc.returncode}\n" \
                                 f"{proc.stdout[-4000:]}"
    return proc.stdout


class Install:
    """The fresh virtualenv with the wheel installed."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.dist = base / "dist"
        self.venv = base / "venv"
        self.bin = self.venv / "bin"
        self.wheel: Path | None = None

    def build(self) -> None:
        # A copy: building writes build/ and *.egg-info next to setup.py.
        shutil.copytree(ROOT, self.src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "_build",
            ".hypothesis", ".pytest_cache"))
        sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", self.dist, self.src,
           cwd=self.base)
        [self.wheel] = self.dist.glob("dftx-*.whl")

    def install(self, *options: str) -> None:
        sh(self.bin / "python", "-m", "pip", "install", *options, self.wheel, cwd=self.base)

    @property
    def plugin_dir(self) -> Path:
        [site] = self.venv.glob("lib/python*/site-packages")
        return site / "twisted" / "plugins"

    def plugins(self) -> str:
        """The twistd plugins found, with what Twisted logged finding them."""
        return sh(self.bin / "python", "-c", PLUGINS, cwd=self.base)


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    inst = Install(tmp_path_factory.mktemp("wheel"))
    inst.build()
    sh(sys.executable, "-m", "venv", inst.venv, cwd=inst.base)
    inst.install("--quiet")
    return inst


def test_the_wheel_ships_the_twistd_plugins_and_only_them(install):
    import zipfile

    names = zipfile.ZipFile(install.wheel).namelist()
    assert "twisted/plugins/dftx_plugins.py" in names
    # Never Twisted's own files: the drop-in shares its package directory.
    assert not [n for n in names if n.startswith("twisted/") and "dftx" not in n]
    assert install.wheel.name == f"dftx-{__version__}-py3-none-any.whl"


def test_dftx_and_twistd_from_the_install(install):
    where = sh(install.bin / "python", "-c",
               "import dftx, twisted.plugins.dftx_plugins as p; print(dftx.__file__, p.__file__)",
               cwd=install.base)
    assert where.count(str(install.venv)) == 2, where
    assert sh(install.bin / "dftx", "--version", cwd=install.base) == f"dftx {__version__}\n"
    listing = sh(install.bin / "twistd", "--help", cwd=install.base)
    assert re.search(r"^\s+dfpublisher\s", listing, re.M), listing
    assert re.search(r"^\s+dfcontroller\s", listing, re.M), listing
    help = sh(install.bin / "twistd", "dfcontroller", "--help", cwd=install.base)
    assert "doc/operator.md#configuration-reference" in help


def test_the_plugin_cache_is_written_once_and_follows_an_upgrade(install):
    """The first plugin listing after an install writes the cache (as the
    installing user: doc/operator.md); later ones find it current and do not
    write (a service user who cannot write there is never warned); an
    upgrade makes the next listing write it again with the new drop-in."""
    cache = install.plugin_dir / "dropin.cache"
    first = install.plugins()
    assert "plugins:" in first and "dfcontroller" in first and "dfpublisher" in first
    assert cache.exists() and b"dftx_plugins" in cache.read_bytes()
    written = cache.stat().st_mtime_ns
    again = install.plugins()
    assert cache.stat().st_mtime_ns == written, "a current cache was written again"
    for output in (first, again):
        assert "Unable to write to plugin cache" not in output, output
        assert "Traceback" not in output and "Unexpected error" not in output, output
    # An upgrade (the same wheel, reinstalled): the drop-in is newer than
    # the cache, so the next listing reads it again and rewrites the cache.
    install.install("--quiet", "--force-reinstall", "--no-deps")
    after = install.plugins()
    assert "dfcontroller" in after and "dfpublisher" in after
    assert cache.stat().st_mtime_ns > written, "the cache was left as it was before the upgrade"


@pytest_twisted.ensureDeferred
async def test_both_services_start_from_the_install(install, redis_cluster, ovsdb_server,
                                                    tmp_path, monkeypatch):
    """twistd -n dfpublisher / dfcontroller --config FILE, the installed
    twistd script, against the test cluster: ready, their version in
    /v1/status and /metrics, stopped by SIGTERM."""
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the services' environment
    publisher = DftxService.publisher(tmp_path / "publisher", redis_cluster.seeds)
    controller = DftxService.controller(tmp_path / "controller", redis_cluster.seeds,
                                        "wheel-compute", ovsdb_server.tcp)
    started = []
    try:
        for svc in (publisher, controller):
            # The installed script instead of this Python's twistd.
            svc.process.argv = [str(install.bin / "twistd"), "-n", "--pidfile=", svc.plugin,
                                "--config", str(svc.config)]
            await svc.start()
            started.append(svc)
            status = await svc.json("/v1/status")
            assert status["ready"] and status["version"] == __version__
            code, metrics = await svc.get("/metrics")
            assert code == 200
            assert f'dftx_build_info{{version="{__version__}"}} 1.0'.encode() in metrics
    finally:
        for svc in started:
            await svc.stop()
    for svc in started:
        assert "Traceback" not in svc.log, svc.log
