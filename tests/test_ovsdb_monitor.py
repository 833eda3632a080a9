"""
InterfaceMonitor against a real ovsdb-server (changed with ovs-vsctl
--no-wait and one-transaction inserts), and, for what a real server cannot
be made to do (lack monitor_cond), against an in-memory transport.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dftx.ovsdb.jsonrpc import JsonRpcProtocol, JsonSplitter
from dftx.ovsdb.monitor import InterfaceMonitor
from dftx.ovsdb.ports import PortEvent, classify
from dftx.servers import poll, run

aio = pytest_twisted.ensureDeferred


class Recorder:
    def __init__(self):
        self.events: list[PortEvent] = []
        self.marks: list[str] = []

    def __call__(self, event):
        self.events.append(event)

    def by_name(self, action=None):
        return [(e.name, e.action) for e in self.events if action in (None, e.action)]

    def take(self):
        got, self.events = self.events, []
        return got


@pytest_twisted.async_yield_fixture
async def watched(ovsdb_server):
    rec = Recorder()
    monitor = InterfaceMonitor(
        ovsdb_server.tcp, rec, on_sync_start=lambda: rec.marks.append("start"),
        on_sync_end=lambda: rec.marks.append("end"), probe_interval=1.0,
        max_retry_delay=0.5)
    monitor.startService()
    await poll(lambda: monitor.synced, 10, "initial sync")
    yield ovsdb_server, monitor, rec
    await monitor.stopService()


async def vm_port(server, name, iface_id, mac="fa:16:3e:00:00:01", *extra):
    await server.vsctl("add-port", "br-int", name, "--", "set", "Interface", name,
                       f"external_ids:iface-id={iface_id}",
                       f"external_ids:attached-mac={mac}", *extra)


@aio
async def test_bridge_vm_tunnel_and_patch_ports_online_update_offline(watched):
    server, monitor, rec = watched
    assert rec.marks == ["start", "end"] and monitor.method == "monitor_cond_since"
    await server.vsctl("add-br", "br-int")
    await vm_port(server, "tap1", "port-1")
    for name, kind, ip in (("vx1", "vxlan", "10.0.0.2"), ("gn1", "geneve", "10.0.0.3")):
        await server.vsctl("add-port", "br-int", name, "--", "set", "Interface", name,
                           f"type={kind}", f"options:remote_ip={ip}")
    await server.vsctl("add-br", "br-tun", "--", "add-port", "br-int", "patch-tun", "--",
                       "set", "Interface", "patch-tun", "type=patch", "options:peer=patch-int",
                       "--", "add-port", "br-tun", "patch-int", "--", "set", "Interface",
                       "patch-int", "type=patch", "options:peer=patch-tun")
    await poll(lambda: len(rec.events) == 7, 10, "7 online events")
    events = {e.name: e for e in rec.take()}
    assert all(e.action == "online" for e in events.values())
    assert events["br-int"].kind == events["br-tun"].kind == "bridge"
    tap = events["tap1"]
    assert (tap.kind, tap.iface_id, tap.attached_mac, tap.ofport) == (
        "vm", "port-1", "fa:16:3e:00:00:01", None)
    assert (events["vx1"].kind, events["vx1"].tunnel_type, events["vx1"].remote_ip) == (
        "tunnel", "vxlan", "10.0.0.2")
    assert (events["gn1"].tunnel_type, events["gn1"].remote_ip) == ("geneve", "10.0.0.3")
    assert (events["patch-tun"].kind, events["patch-tun"].peer) == ("patch", "patch-int")
    assert events["patch-int"].peer == "patch-tun"

    await server.vsctl("set", "Interface", "tap1", "ofport=7",
                       "external_ids:attached-mac=fa:16:3e:00:00:02")
    await poll(lambda: rec.events, 10, "update")
    [update] = rec.take()
    assert (update.action, update.ofport, update.attached_mac) == (
        "update", 7, "fa:16:3e:00:00:02")
    # A change the event does not show (mac_in_use) is no event.
    await server.vsctl("set", "Interface", "vx1", 'mac_in_use="aa:bb:cc:dd:ee:ff"')
    await server.vsctl("del-port", "br-int", "gn1")
    await poll(lambda: rec.events, 10, "offline")
    [offline] = rec.take()
    assert (offline.name, offline.action, offline.remote_ip) == ("gn1", "offline", "10.0.0.3")
    await server.vsctl("del-br", "br-tun")
    await poll(lambda: len(rec.events) == 2, 10, "bridge and patch offline")
    assert sorted(rec.by_name()) == [("br-tun", "offline"), ("patch-int", "offline")]
    assert set(monitor.ports) == {e.uuid for e in events.values()} - {
        events["gn1"].uuid, events["br-tun"].uuid, events["patch-int"].uuid}


@aio
async def test_failed_attach_ofport_minus_one_holds_a_port_back(watched):
    server, monitor, rec = watched
    await server.vsctl("add-br", "br-int")
    await poll(lambda: rec.events, 10, "bridge")
    rec.take()
    await vm_port(server, "tap9", "port-9", "fa:16:3e:00:00:09", "ofport=-1")
    await server.vsctl("set", "Interface", "tap9", "external_ids:x=y")
    await server.vsctl("set", "Interface", "tap9", "ofport=12")
    await poll(lambda: rec.events, 10, "online once the ofport is valid")
    [online] = rec.take()
    assert (online.action, online.ofport) == ("online", 12)
    await server.vsctl("set", "Interface", "tap9", "ofport=-1")
    await poll(lambda: rec.events, 10, "offline")
    assert [(e.action, e.ofport) for e in rec.take()] == [("offline", -1)]


@aio
async def test_500_ports_in_one_transaction(watched):
    server, monitor, rec = watched
    await server.vsctl("add-br", "br-int")
    await server.add_ports("br-int", [
        {"name": f"tap{i}", "external_ids": {"iface-id": f"p{i}", "attached-mac": "fa:16:3e:0:0:1"}}
        for i in range(500)])
    await poll(lambda: len(rec.events) == 501, 10, "501 online events")
    assert {e.iface_id for e in rec.events if e.kind == "vm"} == {f"p{i}" for i in range(500)}
    assert all(e.action == "online" for e in rec.events)


async def offline_transact(server, ops):
    """Change the database file while the server is down."""
    await run(["ovsdb-tool", "transact", str(server.db_path),
               json.dumps(["Open_vSwitch", *ops])])


@aio
async def test_server_restarted_after_changes_gives_exactly_the_differences(watched):
    server, monitor, rec = watched
    await server.vsctl("add-br", "br-int")
    for n in ("a", "b", "c"):
        await vm_port(server, f"tap-{n}", f"port-{n}")
    await poll(lambda: len(rec.events) == 4, 10, "4 online")
    rec.take()
    await server.kill()
    await poll(lambda: not monitor.synced, 10, "disconnect noticed")
    # While it is down: tap-a removed, tap-b changed, tap-d added.
    await offline_transact(server, [
        {"op": "update", "table": "Interface", "where": [["name", "==", "tap-b"]],
         "row": {"ofport": 3}},
        {"op": "mutate", "table": "Bridge", "where": [["name", "==", "br-int"]],
         "mutations": [["ports", "delete", ["set", []]]]},
    ])
    await server.restart()
    await server.vsctl("del-port", "br-int", "tap-a")
    await vm_port(server, "tap-d", "port-d")
    await poll(lambda: monitor.counters["syncs"] >= 2, 15, "reconnected and synced")
    await poll(lambda: len(rec.events) >= 3, 10, "the differences")
    assert sorted(rec.by_name()) == [("tap-a", "offline"), ("tap-b", "update"),
                                     ("tap-d", "online")]
    assert rec.marks == ["start", "end", "start", "end"]
    assert monitor.counters["reloads"] >= 2


@aio
async def test_clustered_database_resumes_with_only_the_changes(make_ovsdb_server):
    server = await make_ovsdb_server(clustered=True)
    rec = Recorder()
    monitor = InterfaceMonitor(server.tcp, rec, probe_interval=1.0, max_retry_delay=0.3)
    monitor.startService()
    try:
        await server.vsctl("add-br", "br-int")
        await vm_port(server, "tap1", "p1")
        await poll(lambda: len(rec.events) == 2, 10, "2 online")
        rec.take()
        txn = monitor.last_txn_id
        assert txn != "00000000-0000-0000-0000-000000000000"
        await server.restart()
        await poll(lambda: monitor.counters["syncs"] >= 2, 20, "resumed")
        assert monitor.counters["resumes"] == 1 and monitor.counters["reloads"] == 1
        assert rec.events == []
        await vm_port(server, "tap2", "p2")
        await server.vsctl("del-port", "br-int", "tap1")
        await poll(lambda: len(rec.events) == 2, 10, "changes after the resume")
        assert rec.by_name() == [("tap2", "online"), ("tap1", "offline")]
    finally:
        await monitor.stopService()


@aio
async def test_a_stalled_server_is_dropped_and_reconnected(watched):
    server, monitor, rec = watched
    server.pause()
    try:
        await poll(lambda: not monitor.synced, 10, "the probe dropped the connection")
    finally:
        server.resume()
    await poll(lambda: monitor.synced, 15, "reconnected")
    await server.vsctl("add-br", "br-int")
    await poll(lambda: rec.by_name() == [("br-int", "online")], 10, "events flow again")


@aio
async def test_unix_endpoint_and_a_callback_that_raises(ovsdb_server):
    calls = []

    def callback(event):
        calls.append(event.name)
        raise RuntimeError("owner bug")

    monitor = InterfaceMonitor(ovsdb_server.unix, callback)
    monitor.startService()
    try:
        await poll(lambda: monitor.synced, 10, "sync over unix")
        await ovsdb_server.vsctl("add-br", "br-int", "--", "add-br", "br-ex")
        await poll(lambda: len(calls) == 2, 10, "both delivered")
        assert monitor.counters["callback_errors"] == 2
    finally:
        await monitor.stopService()


def test_classification():
    assert classify("internal", {}, {}) == "bridge"
    assert classify("internal", {"iface-id": "x"}, {}) == "vm"
    assert classify("", {"iface-id": "x"}, {}) == "vm"
    assert classify("vxlan", {}, {}) == "unknown"  # no remote_ip
    assert classify("gre", {}, {"remote_ip": "1.2.3.4"}) == "tunnel"
    assert classify("patch", {}, {}) == "unknown"  # no peer
    assert classify("", {}, {}) == "unknown"


class FakeServer:
    """An old server, driven by hand: it knows only plain 'monitor'."""

    def __init__(self, monitor):
        self.proto = monitor._protocol()
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def requests(self):
        out = JsonSplitter().feed(self.transport.value())
        self.transport.clear()
        return out

    def send(self, message):
        self.proto.dataReceived(json.dumps(message).encode())


@pytest.mark.parametrize("known", ["monitor", "monitor_cond"])
def test_falls_back_to_what_an_older_server_has(known):
    rec = Recorder()
    monitor = InterfaceMonitor("tcp:127.0.0.1:1", rec, reactor=Clock(), probe_interval=None)
    server = FakeServer(monitor)
    done = []
    monitor._session(server.proto).addBoth(done.append)
    for _ in range(3):
        [request] = server.requests()
        if request["method"] == known:
            break
        server.send({"id": request["id"], "result": None, "error": "unknown method"})
    assert request["method"] == known and request["params"][0] == "Open_vSwitch"
    row = {"name": "tap1", "type": "", "external_ids": ["map", [["iface-id", "p1"]]],
           "options": ["map", []], "ofport": ["set", []], "admin_state": "up",
           "mac_in_use": ["set", []]}
    initial = {"initial": row} if known == "monitor_cond" else {"new": row}
    server.send({"id": request["id"], "error": None,
                 "result": {"Interface": {"u1": initial}}})
    assert done == [None] and monitor.method == known
    assert [(e.name, e.action, e.admin_state) for e in rec.take()] == [("tap1", "online", "up")]
    if known == "monitor":
        change = {"u1": {"old": {"ofport": ["set", []]}, "new": {**row, "ofport": 4}}}
        server.send({"id": None, "method": "update", "params": ["dftx-interfaces",
                                                                {"Interface": change}]})
    else:
        change = {"u1": {"modify": {"ofport": 4}}}
        server.send({"id": None, "method": "update2", "params": ["dftx-interfaces",
                                                                 {"Interface": change}]})
    assert [(e.action, e.ofport) for e in rec.take()] == [("update", 4)]
    # A later session goes straight to the method that worked.
    again = FakeServer(monitor)
    monitor._session(again.proto)
    assert [r["method"] for r in again.requests()] == [known]
