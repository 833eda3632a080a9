"""
InterfaceMonitor against a real ovsdb-server (changed with ovs-vsctl
--no-wait and one-transaction inserts; killed, restarted, paused, replaced,
behind a proxy that injects garbage, over SSL), and, for what a real server
cannot be made to do (lack monitor_cond, send a bad update, drop the
connection mid-sync at a chosen point), against in-memory transports and a
fake clock.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import portforward
from twisted.python.failure import Failure

from dftx.errors import DBConnectionError, ProtocolError
from dftx.ovsdb.jsonrpc import JsonSplitter
from dftx.ovsdb.monitor import ZERO_TXN, InterfaceMonitor
from dftx.harness import CommandFailed, OvsdbServer, free_port, poll
from dftx.ovsdb.ports import PortEvent, PortTable, classify, port_state
from dftx.ovsdb.rows import EMPTY_ROW

aio = pytest_twisted.ensureDeferred


class Recorder:
    """The owner: records events and sync marks, and checks that each
    port's events follow online (update)* offline."""

    def __init__(self):
        self.events: list[PortEvent] = []
        self.marks: list[str] = []
        self.online: dict[str, PortEvent] = {}  # the fold of the events
        self.violations: list[str] = []

    def __call__(self, event):
        self.events.append(event)
        was = event.uuid in self.online
        if (event.action == "online") == was:
            self.violations.append(f"{event.action} {event.name} while online={was}")
        if event.action == "offline":
            self.online.pop(event.uuid, None)
        else:
            self.online[event.uuid] = event

    def start(self):
        self.marks.append("start")

    def end(self):
        self.marks.append("end")

    def by_name(self, action=None):
        return [(e.name, e.action) for e in self.events if action in (None, e.action)]

    def take(self):
        got, self.events = self.events, []
        return got


def watch(endpoint, **kwargs):
    rec = Recorder()
    kwargs.setdefault("probe_interval", 1.0)
    kwargs.setdefault("max_retry_delay", 0.3)
    monitor = InterfaceMonitor(endpoint, rec, on_sync_start=rec.start, on_sync_end=rec.end,
                               **kwargs)
    return monitor, rec


@pytest_twisted.async_yield_fixture
async def watched(ovsdb_server):
    monitor, rec = watch(ovsdb_server.tcp)
    monitor.startService()
    await poll(lambda: monitor.synced, 10, "initial sync")
    yield ovsdb_server, monitor, rec
    await monitor.stopService()
    assert rec.violations == []


async def vm_port(server, name, iface_id, mac="fa:16:3e:00:00:01", *extra):
    await server.vsctl("add-port", "br-int", name, "--", "set", "Interface", name,
                       f"external_ids:iface-id={iface_id}",
                       f"external_ids:attached-mac={mac}", *extra)


async def interfaces(server):
    """uuid -> name of every row of the server's Interface table."""
    [result] = await server.transact([{"op": "select", "table": "Interface", "where": [],
                                       "columns": ["_uuid", "name"]}])
    return {row["_uuid"][1]: row["name"] for row in result["rows"]}


def names(ports):
    return sorted(e.name for e in ports.values())


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
    with pytest.raises(AttributeError):
        tap.ofport = 3  # immutable

    await server.vsctl("set", "Interface", "tap1", "ofport=7",
                       "external_ids:attached-mac=fa:16:3e:00:00:02")
    await poll(lambda: rec.events, 10, "update")
    [update] = rec.take()
    assert (update.action, update.ofport, update.attached_mac) == (
        "update", 7, "fa:16:3e:00:00:02")
    assert monitor.ports[tap.uuid] is update  # the last event of each online port
    # A change the event does not show (mac_in_use) is no event.
    await server.vsctl("set", "Interface", "vx1", 'mac_in_use="aa:bb:cc:dd:ee:ff"')
    await server.vsctl("del-port", "br-int", "gn1")
    await poll(lambda: rec.events, 10, "offline")
    [offline] = rec.take()
    assert (offline.name, offline.action, offline.remote_ip) == ("gn1", "offline", "10.0.0.3")
    await server.vsctl("del-br", "br-tun")
    await poll(lambda: len(rec.events) == 2, 10, "bridge and patch offline")
    assert sorted(rec.by_name()) == [("br-tun", "offline"), ("patch-int", "offline")]
    assert names(monitor.ports) == ["br-int", "patch-tun", "tap1", "vx1"]
    assert monitor.ports == rec.online


@aio
async def test_failed_attach_ofport_minus_one_holds_a_port_back(watched):
    server, monitor, rec = watched
    await server.vsctl("add-br", "br-int")
    await poll(lambda: rec.events, 10, "bridge")
    rec.take()
    await vm_port(server, "tap9", "port-9", "fa:16:3e:00:00:09", "ofport=-1")
    await server.vsctl("set", "Interface", "tap9", "external_ids:x=y")
    assert names(monitor.ports) == ["br-int"] and len(monitor.rows) == 2
    await server.vsctl("set", "Interface", "tap9", "ofport=12")
    await poll(lambda: rec.events, 10, "online once the ofport is valid")
    [online] = rec.take()
    assert (online.action, online.ofport) == ("online", 12)
    await server.vsctl("set", "Interface", "tap9", "ofport=-1")
    await poll(lambda: rec.events, 10, "offline")
    assert [(e.action, e.ofport) for e in rec.take()] == [("offline", -1)]
    assert names(monitor.ports) == ["br-int"]


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
    [ports] = await server.transact([{"op": "select", "table": "Port", "columns": ["_uuid"],
                                      "where": [["name", "!=", "br-int"]]}])
    await server.transact([{"op": "mutate", "table": "Bridge", "where": [],
                            "mutations": [["ports", "delete",
                                           ["set", [p["_uuid"] for p in ports["rows"]]]]]}])
    await poll(lambda: len(rec.events) == 1001, 10, "500 offline events")
    assert names(monitor.ports) == ["br-int"]


@aio
async def test_server_restarted_after_changes_gives_exactly_the_differences(watched):
    server, monitor, rec = watched
    await server.vsctl("add-br", "br-int")
    for n in ("a", "b", "c", "x"):
        await vm_port(server, f"tap-{n}", f"port-{n}")
    await poll(lambda: len(rec.events) == 5, 10, "5 online")
    old = {e.name: e for e in rec.take()}
    await server.kill()
    await poll(lambda: not monitor.synced, 10, "disconnect noticed")
    # While the monitor cannot see it, another ovsdb-server on the same
    # database file (on a port the monitor does not know) takes changes.
    other = OvsdbServer(server.dir)
    await other.start()
    try:
        await other.vsctl("del-port", "br-int", "tap-a")
        await other.vsctl("set", "Interface", "tap-b", "external_ids:attached-mac=fa:16:3e:0:0:b")
        await vm_port(other, "tap-d", "port-d")
        await vm_port(other, "tap-e", "port-e")
        await other.vsctl("del-port", "br-int", "tap-e")  # came and went: nothing
        await other.vsctl("set", "Interface", "tap-c", 'mac_in_use="aa:bb:cc:dd:ee:ff"')
        await other.vsctl("del-port", "br-int", "tap-x")  # re-created: a new uuid
        await vm_port(other, "tap-x", "port-x")
    finally:
        await other.kill()
    await server.start()
    await poll(lambda: rec.marks == ["start", "end", "start", "end"], 15, "reconnected and synced")
    got = rec.take()
    assert sorted((e.name, e.action) for e in got) == [
        ("tap-a", "offline"), ("tap-b", "update"), ("tap-d", "online"),
        ("tap-x", "offline"), ("tap-x", "online")]
    # Offline first: a port re-created while away goes down, then up.
    assert [e.action for e in got][:2] == ["offline", "offline"]
    [gone_x, new_x] = [e for e in got if e.name == "tap-x"]
    assert gone_x.uuid == old["tap-x"].uuid and new_x.uuid in monitor.ports
    assert old["tap-x"].uuid not in monitor.ports
    assert names(monitor.ports) == ["br-int", "tap-b", "tap-c", "tap-d", "tap-x"]
    assert monitor.counters["reloads"] == 2 and monitor.counters["resumes"] == 0
    await server.vsctl("del-port", "br-int", "tap-b")
    await poll(lambda: rec.events, 10, "events after the reconnect")
    assert rec.by_name() == [("tap-b", "offline")]


@aio
async def test_ports_changing_while_the_server_is_killed_and_restarted(watched):
    """No event lost, none duplicated: the events, replayed, are the
    server's table, and each port's events follow online (update)* offline."""
    server, monitor, rec = watched
    await server.vsctl("add-br", "br-int")
    writing = True
    done, failed = [], []

    async def writer():
        i = 0
        while writing:
            i += 1
            # A short timeout: ovs-vsctl backs off for seconds when the
            # server went away under it; the next command connects at once.
            try:
                if i % 3 == 0:
                    await server.vsctl("--if-exists", "del-port", "br-int", f"tap{i - 2}",
                                       timeout=1)
                else:
                    await server.vsctl("add-port", "br-int", f"tap{i}", "--", "set",
                                       "Interface", f"tap{i}", f"external_ids:iface-id=p{i}",
                                       timeout=1)
            except CommandFailed:
                failed.append(i)  # the server was down; whether it took the change is read below
        done.append(i)

    task = defer.ensureDeferred(writer())
    try:
        for _ in range(2):
            await poll(lambda: len(rec.events) >= 5, 10, "ports coming online")
            rec.take()
            await server.kill()
            await poll(lambda: not monitor.synced, 10, "disconnect noticed")
            await server.start()
            await poll(lambda: monitor.synced, 15, "reconnected")
        rec.take()
        await poll(lambda: len(rec.events) >= 3, 10, "ports still changing after it")
    finally:
        writing = False
        await task
    expected = await interfaces(server)
    await poll(lambda: {u: e.name for u, e in monitor.ports.items()} == expected, 10,
               "the monitor's ports are the server's interfaces")
    assert {u: e.name for u, e in rec.online.items()} == expected
    # The writer ran into the dead server (and went on after it came back).
    assert monitor.counters["syncs"] >= 3 and failed and done
    assert rec.violations == []


@aio
async def test_clustered_database_resumes_with_only_the_changes(make_ovsdb_server):
    server = await make_ovsdb_server(clustered=True)
    monitor, rec = watch(server.tcp)
    monitor.startService()
    try:
        await server.vsctl("add-br", "br-int")
        await vm_port(server, "tap1", "p1")
        await poll(lambda: len(rec.events) == 2, 10, "2 online")
        rec.take()
        assert monitor.last_txn_id != ZERO_TXN
        await server.kill()
        await poll(lambda: not monitor.synced, 10, "disconnect noticed")
        await server.start()
        await poll(lambda: monitor.counters["syncs"] >= 2, 20, "resumed")
        assert monitor.counters["resumes"] == 1 and monitor.counters["reloads"] == 1
        assert rec.events == [] and rec.marks == ["start", "end", "start", "end"]
        await vm_port(server, "tap2", "p2")
        await server.vsctl("del-port", "br-int", "tap1")
        await poll(lambda: len(rec.events) == 2, 10, "changes after the resume")
        assert rec.by_name() == [("tap2", "online"), ("tap1", "offline")]
        rec.take()

        # A new database (another cluster) does not know the transaction
        # id: found is false and the whole table is compared.
        await server.kill()
        server.db_path.unlink()
        await server.start()
        await server.vsctl("add-br", "br-new")
        await poll(lambda: monitor.counters["syncs"] >= 3, 20, "reloaded")
        await poll(lambda: len(rec.events) == 3, 10, "differences with the new database")
        assert sorted(rec.by_name()) == [("br-int", "offline"), ("br-new", "online"),
                                         ("tap2", "offline")]
        assert monitor.counters["resumes"] == 1 and monitor.counters["reloads"] == 2
        assert names(monitor.ports) == ["br-new"] and rec.violations == []
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
    assert isinstance(monitor.last_error, DBConnectionError)
    assert "echo" in str(monitor.last_error)
    await poll(lambda: monitor.synced, 15, "reconnected")
    await server.vsctl("add-br", "br-int")
    await poll(lambda: rec.by_name() == [("br-int", "online")], 10, "events flow again")


class InjectingProxy(portforward.ProxyFactory):
    """A TCP proxy to the server that can send the client bytes of its own."""

    def __init__(self, host, port):
        super().__init__(host, port)
        self.connections = []

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        self.connections.append(proto)
        return proto


@aio
async def test_garbage_from_the_server_drops_the_connection_and_reconnects(watched):
    server, monitor, rec = watched
    proxy = InjectingProxy("127.0.0.1", server.port)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy)
    monitor2, rec2 = watch(f"tcp:127.0.0.1:{port.getHost().port}")
    monitor2.startService()
    try:
        await server.vsctl("add-br", "br-int")
        await poll(lambda: rec2.events and monitor2.synced, 10, "synced through the proxy")
        rec2.take()
        proxy.connections[-1].transport.write(b'{"id": null, "method": "update2", "para')
        proxy.connections[-1].transport.write(b'ms": ["x", {}]} not json')
        await poll(lambda: monitor2.counters["syncs"] == 2, 10, "reconnected")
        assert isinstance(monitor2.last_error, ProtocolError)
        assert "not json" in str(monitor2.last_error)
        assert rec2.events == [] and rec2.marks == ["start", "end", "start", "end"]
        await server.vsctl("add-br", "br-ex")
        await poll(lambda: rec2.events, 10, "events flow again")
        assert rec2.by_name() == [("br-ex", "online")] and rec2.violations == []
    finally:
        await monitor2.stopService()
        await port.stopListening()
        for proto in proxy.connections:
            proto.transport.abortConnection()


@aio
async def test_ssl_with_the_hostname_checked(make_ovsdb_server, pki):
    port = free_port()
    server = await make_ovsdb_server(extra_args=(
        f"--remote=pssl:{port}:127.0.0.1", f"--private-key={pki['server_key']}",
        f"--certificate={pki['server_cert']}", f"--ca-cert={pki['ca']}"))
    await server.vsctl("add-br", "br-int")
    client = (f"caCertsDir={pki['ca_dir']}:certKey={pki['client_cert']}:"
              f"privateKey={pki['client_key']}")
    # Without hostname=, the certificate is checked against the host (an IP
    # address the server certificate names); tls: checks it by itself.
    for endpoint in (f"ssl:127.0.0.1:{port}:{client}",
                     f"ssl:host=127.0.0.1:port={port}:{client}:hostname=localhost",
                     f"tls:127.0.0.1:{port}:trustRoots={pki['ca_dir']}:"
                     f"certificate={pki['client_cert']}:privateKey={pki['client_key']}"):
        monitor, rec = watch(endpoint)
        monitor.startService()
        try:
            await poll(lambda: monitor.synced, 10, f"sync over {endpoint}")
            assert rec.by_name() == [("br-int", "online")]
        finally:
            await monitor.stopService()
    wrong, rec = watch(f"ssl:host=127.0.0.1:port={port}:{client}:hostname=ovs.example")
    wrong.startService()
    try:
        await poll(lambda: wrong.counters["connections"] >= 2, 10, "retries")
        assert not wrong.synced and rec.events == [] and rec.marks[-1] == "start"
        assert "DNSMismatch" in str(wrong.last_error)
    finally:
        await wrong.stopService()
    # A CA with the same name but another key signed nothing of the server's.
    untrusted, rec = watch(f"ssl:host=127.0.0.1:port={port}:"
                           f"caCertsDir={pki['untrusted_ca_dir']}:hostname=localhost")
    untrusted.startService()
    try:
        await poll(lambda: untrusted.counters["connections"] >= 2, 10, "retries")
        assert not untrusted.synced and rec.events == []
        assert "certificate verify failed" in str(untrusted.last_error)
    finally:
        await untrusted.stopService()


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
        assert monitor.counters["callback_errors"] == 2 and len(monitor.ports) == 2
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


def _row(type_, options=None, external_ids=None):
    return {**EMPTY_ROW, "name": "p", "type": type_, "options": options or {},
            "external_ids": external_ids or {}, "ofport": frozenset([3])}


@pytest.mark.parametrize("type_", ["vxlan", "geneve", "gre"])
def test_tunnel_type_is_set_for_tunnels_only(type_):
    tunnel = port_state("u", _row(type_, {"remote_ip": "10.0.0.2"}))
    assert tunnel.kind == "tunnel" and tunnel.tunnel_type == type_
    # A tunnel-typed interface without remote_ip is no tunnel (Dragonflow's
    # OvsPort sets tunnel_type for tunnels only).
    bare = port_state("u", _row(type_))
    assert bare.kind == "unknown" and bare.tunnel_type is None
    vm = port_state("u", _row(type_, external_ids={"iface-id": "lp"}))
    assert vm.kind == "vm" and vm.tunnel_type is None


def test_the_port_table_folds_rows_into_events():
    table = PortTable()
    online = table.set("u", _row("internal"))
    assert online.action == "online" and table.ports == {"u": online}
    assert table.set("u", _row("internal")) is None  # nothing changed
    update = table.set("u", {**_row("internal"), "admin_state": frozenset(["up"])})
    assert update.action == "update" and table.ports == {"u": update}
    assert table.set("u", {**_row("internal"), "ofport": frozenset([-1])}).action == "offline"
    assert table.ports == {} and "u" in table.rows
    assert table.set("u", None) is None and table.rows == {}


def test_an_endpoint_string_without_an_address_is_refused():
    with pytest.raises(ValueError, match="ssl:"):
        InterfaceMonitor("ssl:", print, reactor=MemoryReactorClock())


# --- in memory: a fake server behind ClientService on a fake reactor ----------------------

ROW = {"name": "tap1", "type": "", "external_ids": ["map", [["iface-id", "p1"]]],
       "options": ["map", []], "ofport": ["set", []], "admin_state": "up",
       "mac_in_use": ["set", []]}


class FakeOvsdb:
    """Connections the monitor makes on a MemoryReactorClock, answered by
    hand."""

    def __init__(self, **kwargs):
        self.reactor = MemoryReactorClock()
        kwargs.setdefault("probe_interval", None)
        kwargs.setdefault("max_retry_delay", 5.0)
        self.monitor, self.rec = watch("tcp:127.0.0.1:6640", reactor=self.reactor, **kwargs)
        self.monitor.startService()
        self.transport = None

    def accept(self):
        """Complete the connection attempt the monitor is making."""
        factory = self.reactor.tcpClients[-1][2]
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    @property
    def attempts(self):
        return len(self.reactor.tcpClients)

    def requests(self):
        out = JsonSplitter().feed(self.transport.value())
        self.transport.clear()
        return out

    def send(self, message):
        self.proto.dataReceived(json.dumps(message).encode())

    def reply(self, request, result):
        self.send({"id": request["id"], "result": result, "error": None})

    def close(self):
        """The connection is lost (after the client aborted it, or not)."""
        self.proto.connectionLost(Failure(ConnectionDone()))

    def retry_after(self, seconds):
        """Advance the clock; @return: whether a new attempt was made."""
        before = self.attempts
        self.reactor.advance(seconds)
        return self.attempts > before


@pytest.mark.parametrize("known", ["monitor", "monitor_cond"])
def test_falls_back_to_what_an_older_server_has(known, unhandled):
    fake = FakeOvsdb()
    fake.accept()
    for _ in range(3):
        [request] = fake.requests()
        if request["method"] == known:
            break
        fake.send({"id": request["id"], "result": None, "error": "unknown method"})
    assert request["method"] == known and request["params"][0] == "Open_vSwitch"
    initial = {"initial": ROW} if known == "monitor_cond" else {"new": ROW}
    fake.reply(request, {"Interface": {"u1": initial}})
    assert fake.monitor.method == known and fake.rec.marks == ["start", "end"]
    [online] = fake.rec.take()
    assert (online.name, online.action, online.admin_state) == ("tap1", "online", "up")
    if known == "monitor":
        change = {"u1": {"old": {"ofport": ["set", []]}, "new": {**ROW, "ofport": 4}}}
        fake.send({"id": None, "method": "update", "params": ["dftx-interfaces",
                                                             {"Interface": change}]})
    else:
        change = {"u1": {"modify": {"ofport": 4}}}
        fake.send({"id": None, "method": "update2", "params": ["dftx-interfaces",
                                                              {"Interface": change}]})
    assert [(e.action, e.ofport) for e in fake.rec.take()] == [("update", 4)]
    # A later connection goes straight to the method that worked.
    fake.close()
    assert fake.retry_after(0.2)
    fake.accept()
    assert [r["method"] for r in fake.requests()] == [known]
    assert unhandled == []


def test_a_bad_update_forgets_the_transaction_id_and_reloads(unhandled):
    fake = FakeOvsdb()
    fake.accept()
    [request] = fake.requests()
    assert request["params"][3] == ZERO_TXN
    fake.reply(request, [True, "txn-1", {"Interface": {"u1": {"insert": ROW}}}])
    fake.send({"id": None, "method": "update3", "params": [
        "dftx-interfaces", "txn-2", {"Interface": {"u1": {"modify": {"ofport": 5}}}}]})
    assert fake.monitor.last_txn_id == "txn-2"
    fake.send({"id": None, "method": "update3", "params": [
        "dftx-interfaces", "txn-3", {"Interface": {"u2": {"modify": {"ofport": 6}}}}]})
    assert fake.transport.disconnecting and fake.monitor.counters["bad_updates"] == 1
    assert isinstance(fake.monitor.last_error, ProtocolError)
    assert "unknown Interface row u2" in str(fake.monitor.last_error)
    fake.close()
    assert fake.retry_after(0.2)
    fake.accept()
    [request] = fake.requests()
    assert request["params"][3] == ZERO_TXN  # the whole table, not txn-2's changes
    fake.reply(request, [False, "txn-9", {"Interface": {
        "u1": {"initial": {**ROW, "ofport": 5}}, "u2": {"initial": {**ROW, "name": "tap2"}}}}])
    assert [(e.name, e.action) for e in fake.rec.events] == [
        ("tap1", "online"), ("tap1", "update"), ("tap2", "online")]
    assert fake.monitor.last_txn_id == "txn-9" and unhandled == []


def test_a_connection_lost_during_the_initial_sync(unhandled):
    fake = FakeOvsdb()
    fake.accept()
    fake.close()  # before the reply
    assert fake.rec.marks == ["start"] and not fake.monitor.synced
    assert isinstance(fake.monitor.last_error, DBConnectionError)
    # Connections that end before their sync back off like failed attempts.
    delays = []
    for _ in range(4):
        waited = 0.0
        while not fake.retry_after(0.05):
            waited += 0.05
        delays.append(waited)
        fake.accept()
        fake.requests()
        fake.close()
    assert delays == sorted(delays) and delays[-1] >= 0.6, delays
    fake.retry_after(5)
    fake.accept()
    [request] = fake.requests()
    fake.reply(request, [False, ZERO_TXN, {"Interface": {"u1": {"initial": ROW}}}])
    assert fake.rec.marks == ["start"] * 6 + ["end"]
    assert fake.rec.by_name() == [("tap1", "online")]
    # After a sync, the next reconnect is quick again.
    fake.close()
    assert fake.retry_after(0.2)
    assert unhandled == []


def test_the_owner_may_stop_the_monitor_from_its_hooks(unhandled):
    fake = FakeOvsdb()
    stopped = []
    fake.monitor.on_sync_end = lambda: stopped.append(fake.monitor.stopService())
    fake.accept()
    [request] = fake.requests()
    fake.reply(request, [False, ZERO_TXN, {"Interface": {"u1": {"initial": ROW}}}])
    assert fake.transport.disconnecting and len(stopped) == 1
    fake.close()
    assert stopped[0].called
    fake.send({"id": None, "method": "update2", "params": [
        "dftx-interfaces", {"Interface": {"u1": {"delete": None}}}]})
    assert fake.rec.by_name() == [("tap1", "online")]
    assert not fake.retry_after(10)
    assert unhandled == []


def test_a_stalled_server_is_probed_and_dropped(unhandled):
    fake = FakeOvsdb(probe_interval=2.0)
    fake.accept()
    [request] = fake.requests()
    fake.reply(request, [False, ZERO_TXN, {}])
    fake.reactor.advance(2.1)
    [probe] = fake.requests()
    assert probe["method"] == "echo" and not fake.transport.disconnecting
    fake.reactor.advance(2.1)
    assert fake.transport.disconnecting
    fake.close()
    assert "echo" in str(fake.monitor.last_error) and not fake.monitor.synced
    assert fake.retry_after(0.3)
    assert unhandled == []
