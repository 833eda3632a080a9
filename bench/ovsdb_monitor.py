"""
Time to the end of the initial sync of the Interface table: dftx's
InterfaceMonitor against the `ovs` package's Python IDL, in one run on the
same ovsdb-server.

    .venv/bin/python bench/ovsdb_monitor.py [--interfaces 5000] [--rounds 5] [--markdown FILE]

One ovsdb-server (dftx.harness.OvsdbServer) gets a bridge and N VM
interfaces (iface-id, attached-mac, an option) in one transaction.  Each
client then runs in a fresh Python process of its own, alternating, over
the same unix socket, and reports the time from creating its client to
having every row (InterfaceMonitor: on_sync_end; IDL: the first change
after the initial fetch), with the same columns: name, type, external_ids,
options, ofport, admin_state, mac_in_use.  The IDL's time includes reading
the schema file, which it needs and dftx does not; it is also shown apart.
The median of the rounds is kept.

Then, in this process, the JSON-RPC splitter alone: the same table as one
reply (a JSON-RPC message of the select's rows, about 1.6 MB) fed to
dftx.ovsdb.jsonrpc.JsonSplitter in 4 KB and 64 KB chunks, against
json.loads of the whole text (which the splitter also runs once); best of 5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import table, write_markdown

COLUMNS = ["name", "type", "external_ids", "options", "ofport", "admin_state", "mac_in_use"]
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def run_dftx(remote: str, expected: int) -> float:
    from twisted.internet import defer, task

    from dftx.ovsdb.monitor import InterfaceMonitor

    async def main(reactor):
        done: defer.Deferred[float] = defer.Deferred()
        start = time.perf_counter()
        monitor = InterfaceMonitor(
            remote, lambda event: None,
            on_sync_end=lambda: done.callback(time.perf_counter() - start))
        monitor.startService()
        elapsed = await done
        assert len(monitor.ports) == expected, len(monitor.ports)
        await monitor.stopService()
        print(elapsed, 0.0)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def run_idl(remote: str, expected: int) -> None:
    import ovs.db.idl
    import ovs.poller

    start = time.perf_counter()
    helper = ovs.db.idl.SchemaHelper(location=SCHEMA)
    helper.register_columns("Interface", COLUMNS)
    schema = time.perf_counter() - start
    idl = ovs.db.idl.Idl(remote, helper)
    seqno = idl.change_seqno
    while True:
        idl.run()
        if idl.change_seqno != seqno and len(idl.tables["Interface"].rows) == expected:
            break
        poller = ovs.poller.Poller()
        idl.wait(poller)
        poller.block()
    elapsed = time.perf_counter() - start
    idl.close()
    print(elapsed, schema)


async def child(role: str, remote: str, expected: int) -> tuple[float, float]:
    """Run one client in a fresh process: (time to synced, of which schema)."""
    from dftx.harness import run

    out = await run([sys.executable, __file__, "--role", role, "--remote", remote,
                     "--expected", str(expected)], timeout=600)
    total, schema = out.strip().splitlines()[-1].split()
    return float(total), float(schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--interfaces", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", help="also write the tables to this file (bench markers)")
    parser.add_argument("--role", choices=["dftx", "idl"])
    parser.add_argument("--remote")
    parser.add_argument("--expected", type=int)
    args = parser.parse_args()
    if args.role == "dftx":
        run_dftx(args.remote, args.expected)
    elif args.role == "idl":
        run_idl(args.remote, args.expected)
    else:
        from twisted.internet import defer, task

        task.react(lambda reactor: defer.ensureDeferred(compare(args)))


async def compare(args: argparse.Namespace) -> None:
    from dftx.harness import OvsdbServer

    server = OvsdbServer()
    await server.start()
    try:
        await server.vsctl("add-br", "br-int")
        await server.add_ports("br-int", [
            {"name": f"tap{i:05d}", "external_ids": {
                "iface-id": f"{i:08x}-1111-2222-3333-444455556666",
                "attached-mac": f"fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                "vm-uuid": f"{i:08x}-aaaa-bbbb-cccc-ddddeeeeffff"},
             "options": {"tx_queues": "1"}}
            for i in range(args.interfaces)])
        expected = args.interfaces + 1
        [rows] = await server.transact([{"op": "select", "table": "Interface", "where": [],
                                         "columns": COLUMNS}])
        reply = json.dumps({"id": 1, "result": rows, "error": None}).encode()
        times: dict[str, list[float]] = {"dftx": [], "idl": [], "idl-no-schema": []}
        for _ in range(args.rounds):
            for role in ("dftx", "idl"):
                total, schema = await child(role, f"unix:{server.sock_path}", expected)
                times[role].append(total)
                if role == "idl":
                    times["idl-no-schema"].append(total - schema)
    finally:
        await server.stop()
    median = {role: statistics.median(t) for role, t in times.items()}
    print(f"initial sync of {expected} interfaces, median of {args.rounds} rounds:")
    for name, role in (("dftx InterfaceMonitor", "dftx"), ("ovs Python IDL", "idl"),
                       ("  without schema load", "idl-no-schema")):
        rounds = sorted(round(x * 1000) for x in times[role])
        print(f"  {name:24} {median[role] * 1000:8.1f} ms   rounds: {rounds}")
    print(f"  dftx / IDL time ratio    {median['dftx'] / median['idl']:8.2f}   (target <= 0.50)")
    print(f"    without schema load    {median['dftx'] / median['idl-no-schema']:8.2f}")
    split = split_throughput(reply)
    names = {"dftx": "dftx `InterfaceMonitor`", "idl": "ovs Python IDL",
             "idl-no-schema": "ovs Python IDL without its schema load"}
    write_markdown(args.markdown, {
        "ovsdb_monitor.sync": table(
            [f"client ({expected:,} interfaces)", f"median of {args.rounds}", "rounds",
             "ratio"],
            [[names[role], f"{median[role] * 1000:.1f} ms",
              " / ".join(f"{x * 1000:.0f}" for x in times[role]) + " ms",
              ratio] for role, ratio in (
                ("dftx", f"{median['dftx'] / median['idl']:.2f}x"), ("idl", "1.00x"),
                ("idl-no-schema", f"({median['dftx'] / median['idl-no-schema']:.2f}x)"))]),
        "ovsdb_monitor.split": table(
            ["", "4 KB chunks", "64 KB chunks"],
            [["split + parse", *(f"{split[c]:.1f} ms/MB" for c in (4096, 65536))],
             ["of which `json.loads`", *(f"{split['loads']:.1f} ms/MB",) * 2]]),
    })


def split_throughput(reply: bytes) -> dict:
    """ms/MB of json.loads ("loads") and of JsonSplitter per chunk size."""
    from dftx.ovsdb.jsonrpc import JsonSplitter

    def best(run) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times) / (len(reply) / 1e6) * 1000

    def feed(chunk: int) -> None:
        splitter = JsonSplitter()
        out = []
        for i in range(0, len(reply), chunk):
            out += splitter.feed(reply[i:i + chunk])
        assert len(out) == 1

    loads = best(lambda: json.loads(reply))
    print(f"one {len(reply) / 1e6:.1f} MB reply: json.loads {loads:.1f} ms/MB")
    out = {"loads": loads}
    for chunk in (4096, 65536):
        total = out[chunk] = best(lambda: feed(chunk))
        print(f"  JsonSplitter, {chunk // 1024:2d} KB chunks {total:6.1f} ms/MB "
              f"(split {total - loads:.1f} + parse)")
    return out


if __name__ == "__main__":
    main()
