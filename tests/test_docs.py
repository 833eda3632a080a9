"""
The documentation: it builds without a warning, its embedding example runs
against real servers, and its configuration reference lists every key of
dftx/config.py.
"""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from dftx import config
from dftx.harness import run

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "doc"
EXAMPLE = DOC / "examples" / "embed.py"

aio = pytest_twisted.ensureDeferred


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the docs once (fresh environment, HTML) with -W: every warning
    is an error.  @return: (exit code, output, html directory)."""
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOC), str(out / "html")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr, out / "html"


def test_docs_build_without_warnings(built):
    code, output, html_dir = built
    assert code == 0 and "WARNING" not in output and "ERROR" not in output, output
    for page in ("index", "quickstart", "operator", "embedding", "architecture",
                 "design", "performance"):
        assert (html_dir / f"{page}.html").exists(), page
    # The embedding page shows the very file the next test runs.
    page = (html_dir / "embedding.html").read_text(encoding="utf-8")
    assert "EmbeddedNode" in page and "register_listen_address" in page


def _rows(page: str) -> dict[str, str]:
    """anchor id -> the text of that table row."""
    rows = {}
    for m in re.finditer(r'<tr[^>]*\bid="(config-[^"]+)"[^>]*>(.*?)</tr>', page, re.S):
        rows[m.group(1)] = html.unescape(re.sub(r"<[^>]+>", " ", m.group(2)))
    return rows


def test_config_reference_lists_every_key_of_config_py(built):
    code, output, html_dir = built
    assert code == 0, output
    rows = _rows((html_dir / "operator.html").read_text(encoding="utf-8"))
    expected = set()
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            anchor = re.sub(r"[^a-z0-9]+", "-", f"config-{section}-{f.name}".lower())
            expected.add(anchor)
            assert anchor in rows, f"[{section}] {f.name} is missing from doc/operator.md"
            text = " ".join(rows[anchor].split())
            assert f.name in text and f.metadata["type"] in text, text
            assert " ".join(f.metadata["help"].split()) in text, text
            if f.metadata["required"]:
                assert "required" in text, text
            elif f.default not in ((), "", None):
                default = f.default
                if isinstance(default, bool):
                    default = str(default).lower()
                elif isinstance(default, tuple):
                    default = ",".join(default)
                elif isinstance(default, float) and default.is_integer():
                    default = int(default)
                assert str(default) in text, (str(default), text)
    assert set(rows) == expected  # and nothing that is no longer there


def test_operator_guide_sample_configuration_loads_for_both_roles():
    text = (DOC / "operator.md").read_text(encoding="utf-8")
    section = text[text.index("## A configuration file"):]
    sample = re.search(r"```ini\n(.*?)```", section, re.S).group(1)
    for role in config.ROLES:
        loaded = config.parse(sample, "doc/operator.md", role)
        assert loaded.df_local_controller.chassis_name == "compute1"
        assert loaded.df_redis.wait_replicas == 1


async def _vm_port(server, name, iface_id):
    await server.vsctl("--may-exist", "add-br", "br-int")
    await server.vsctl("add-port", "br-int", name, "--", "set", "Interface", name,
                       f"external_ids:iface-id={iface_id}",
                       "external_ids:attached-mac=fa:16:3e:00:00:01")


@pytest.mark.parametrize("driver", ["redis", "redis_sharded", "zmq"])
@aio
async def test_embedding_example_runs_against_real_servers(redis_cluster, ovsdb_server,
                                                           unique, driver):
    iface_id = f"{unique}-port"
    await _vm_port(ovsdb_server, "tap1", iface_id)
    seeds = ",".join(redis_cluster.seeds[:2])
    out = await run([sys.executable, str(EXAMPLE), seeds, ovsdb_server.tcp,
                     "--pubsub", driver, "--tenant", unique], timeout=60)
    expected = [
        "NB DB: 3 masters",
        f"subscribed ({driver}): D, redis, {unique}",
        f'received: create lswitch/net-1 topic {unique} {{"id": "net-1", "name": "private"}}',
        'read back: lswitch/net-1 = {"id": "net-1", "name": "private"}',
        "received: set ha/topology topic redis <topology>",
        f"port online: tap1 iface-id {iface_id}",
        "OVSDB: synced, 2 ports online, 1 VM ports",   # br-int's own port and tap1
        f'received: create port_status/{iface_id} topic D {{"status": "up", '
        '"chassis": "embed-example", "ofport": null}',   # no ovs-vswitchd: no ofport
        "closed",
    ]
    lines = out.splitlines()
    for line in expected:
        assert any(line in got for got in lines), f"{line!r} not in:\n{out}"
    # It deleted what it wrote.
    rows = await redis_cluster.nodes[0].cli("-c", "EXISTS", f"{{port_status.}}{iface_id}")
    assert rows.strip() == "0"
