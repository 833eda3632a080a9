"""The dftx operator command against the real cluster (and a real dfpublisher)."""

from __future__ import annotations

import io
import json
import sys

import pytest_twisted
from twisted.internet import defer

from dftx.cli import run
from dftx.harness import DftxService, poll
from dftx.harness import run as run_process

aio = pytest_twisted.ensureDeferred


async def dftx(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = await run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@aio
async def test_topology_ls_get(redis_cluster, unique):
    db = ",".join(redis_cluster.seeds[:2])
    code, out, _ = await dftx("--db", db, "topology")
    assert code == 0 and len(out.splitlines()) == 3 and "slots 0-" in out
    for key, topic in (("a", None), ("b", "t1")):
        code, _, err = await dftx("--db", db, "get", unique, key)
        assert code == 1 and "not found" in err and "\n" == err[-1] and err.count("\n") == 1
    from dftx.db.redis import RedisDbDriver

    driver = RedisDbDriver(redis_cluster.seeds)
    await driver.initialize()
    await driver.create_key(unique, "a", '{"x": 1}')
    await driver.create_key(unique, "b", "two", topic="t1")
    await driver.close()
    assert await dftx("--db", db, "get", unique, "a") == (0, '{"x": 1}\n', "")
    code, out, _ = await dftx("--db", db, "ls", unique)
    assert out.splitlines() == ['a\t-\t{"x": 1}', "b\tt1\ttwo"]
    code, out, _ = await dftx("--db", db, "ls", unique, "--topic", "t1")
    assert out.splitlines() == ["b\tt1\ttwo"]


@aio
async def test_publish_and_tail_over_redis_pub_sub(redis_cluster, unique, tmp_path):
    config = tmp_path / "dftx.ini"
    config.write_text(f"[df]\nremote_db_hosts = {','.join(redis_cluster.seeds)}\n"
                      "pub_sub_driver = redis\n")
    out = io.StringIO()
    tail = defer.ensureDeferred(run(["--config", str(config), "tail", "--topic", unique,
                                     "--json", "--count", "1"], out, io.StringIO()))
    sent = []

    async def publish_until_tailed():
        n = len(sent)
        sent.append(n)
        code, _, err = await dftx("--config", str(config), "publish", unique, f"k{n}",
                                  "create", '{"v": 1}', "--topic", unique)
        assert code == 0, err
        return tail.called
    await poll(publish_until_tailed, 15, "tail printed a published row")
    assert await tail == 0
    [row] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (row["table"], row["action"], row["value"], row["topic"]) == (
        unique, "create", '{"v": 1}', unique)
    code, _, _ = await dftx("--config", str(config), "publish", unique, "k0", "set", "new",
                            "--topic", unique)
    assert code == 0
    assert await dftx("--config", str(config), "get", unique, "k0", "--topic", unique) == (
        0, "new\n", "")
    code, _, err = await dftx("--config", str(config), "publish", unique, "k", "set")
    assert code == 1 and "needs a VALUE" in err


@aio
async def test_status_of_a_running_dfpublisher_and_errors(redis_cluster, tmp_path):
    svc = DftxService.publisher(tmp_path / "p", redis_cluster.seeds)
    await svc.start()
    try:
        code, out, _ = await dftx("status", f"http://127.0.0.1:{svc.http_port}")
        assert code == 0 and "role: neutron_server" in out and "ready: True" in out
    finally:
        await svc.stop()
    code, _, err = await dftx("status", f"http://127.0.0.1:{svc.http_port}")
    assert code == 1 and err.startswith("dftx status: ") and err.count("\n") == 1
    code, _, err = await dftx("ls", "t")
    assert code == 1 and "--db" in err


@aio
async def test_python_dash_m_dftx_exit_codes(redis_cluster):
    out = await run_process([sys.executable, "-m", "dftx", "--db", redis_cluster.seeds[0],
                             "topology"])
    assert "slots" in out
    out = await run_process([sys.executable, "-m", "dftx", "--db", "127.0.0.1:1", "get",
                             "t", "k"], check=False)
    assert "Traceback" not in out and "dftx get: " in out


@aio
async def test_topology_with_the_memory_driver_is_one_line_and_status_1(tmp_path):
    config = tmp_path / "dftx.ini"
    config.write_text("[df]\nnb_db_driver = memory\n")
    code, out, err = await dftx("--config", str(config), "topology")
    assert (code, out) == (1, "")
    assert err.startswith("dftx topology: ") and err.count("\n") == 1 and "redis" in err


def test_version_is_dftx_s_version(capsys):
    import pytest

    from dftx import __version__
    from dftx.cli import parser

    with pytest.raises(SystemExit) as exit:
        parser().parse_args(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"dftx {__version__}\n"


def _listener():
    """A TCP socket listening on a free loopback port, accepting nothing:
    a connection attempt to it stays in its backlog."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def _connected(sock) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@aio
async def test_check_config_loads_as_the_service_does_and_connects_to_nothing(tmp_path):
    """dftx check-config FILE [--role R]: "ok" and status 0, or the service's
    own one-line error and status 1; the NB DB it names is never reached and
    the HTTP endpoint it names never bound."""
    db, http = _listener(), _listener()
    db_port, http_port = db.getsockname()[1], http.getsockname()[1]
    try:
        good = tmp_path / "good.ini"
        good.write_text(f"[df]\nremote_db_hosts = 127.0.0.1:{db_port}\n"
                        f"[neutron_server]\nhttp_endpoint = tcp:{http_port}:interface=127.0.0.1\n"
                        "[df_local_controller]\nchassis_name = compute1\n")
        for role in (None, "dfpublisher", "neutron_server", "dfcontroller",
                     "df_local_controller"):
            argv = ["check-config", str(good)] + (["--role", role] if role else [])
            assert await dftx(*argv) == (0, "ok\n", ""), role
        # The process the operator runs: connects to nothing, says ok.
        out = await run_process([sys.executable, "-m", "dftx", "check-config", str(good),
                                 "--role", "dfcontroller"])
        assert out == "ok\n"
        assert not _connected(db)
    finally:
        db.close()
        http.close()

    # The error the service itself would give at start, on one line.
    from twisted.internet.testing import MemoryReactorClock

    from dftx import publisher, runner

    bad = tmp_path / "bad.ini"
    bad.write_text("[df]\nremote_db_hosts = 127.0.0.1:7000\n[neutron_server]\n"
                   "publisher_port = 99999\n")
    options = runner.Options()
    options.parseOptions(["--config", str(bad)])
    try:
        publisher.makeService(options, MemoryReactorClock())
    except SystemExit as e:
        service_error = str(e).removeprefix("dfpublisher: bad configuration: ")
    for argv in (["check-config", str(bad)], ["check-config", str(bad), "--role", "dfpublisher"]):
        code, out, err = await dftx(*argv)
        assert (code, out) == (1, "")
        assert err == f"dftx check-config: {service_error}\n"
        assert "[neutron_server] publisher_port: 99999 is out of range" in err
    # A role's required key: only checked for that role.
    only_df = tmp_path / "df.ini"
    only_df.write_text("[df]\nnb_db_driver = memory\n")
    assert (await dftx("check-config", str(only_df), "--role", "dfpublisher"))[0] == 0
    code, _, err = await dftx("check-config", str(only_df), "--role", "dfcontroller")
    assert code == 1 and "[df_local_controller] chassis_name" in err and err.count("\n") == 1
    code, _, err = await dftx("check-config", str(tmp_path / "missing.ini"))
    assert code == 1 and "missing.ini: cannot read" in err


def test_twistd_help_points_at_the_configuration_reference():
    """twistd dfcontroller --help / dfpublisher --help: the configuration
    reference of the operator guide, and the anchor exists there."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for plugin in ("dfcontroller", "dfpublisher"):
        out = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                              plugin, "--help"], capture_output=True, text=True, timeout=60,
                             cwd=root, check=True).stdout
        assert "doc/operator.md#configuration-reference" in out, out
        assert "design.md" not in out and "dftx check-config" in out
    guide = (root / "doc" / "operator.md").read_text()
    assert re.search(r"^## Configuration reference$", guide, re.M)
