"""
The operator command, C{dftx} (also C{python -m dftx}):

    dftx topology                      the cluster's masters, slots, replicas
    dftx ls TABLE [--topic T]          every row of a table: key, topic, value
    dftx get TABLE KEY [--topic T]     one row's value
    dftx publish TABLE KEY ACTION [VALUE] [--topic T]
                                       write through NbApi (create|set|delete)
                                       and publish, as an API server does
    dftx tail [--topic T ...] [--json] live updates, one line each
    dftx status URL                    a service's /v1/status, readable
    dftx curve-keygen DIR [--name N]   a new ZeroMQ CURVE key pair: DIR/N.key
                                       (public) and DIR/N.key_secret (0600)
    dftx check-config FILE [--role R]  check a service's configuration file as
                                       the service does at start ("ok", or the
                                       error and status 1); connects to nothing
    dftx --version                     dftx's version

The NB database comes from C{--db host:port,...} or the C{[df]} section of
C{--config FILE}; publishing and tailing need C{--config} (the pub/sub
driver, and with ZeroMQ the publisher service's ipc socket or the table of
publishers).  A mistake (bad arguments, a missing key, an unreachable
database) is one line on stderr and exit status 1 (2 for usage errors),
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task

from dftx import __version__
from dftx import config as dfconfig
from dftx.deferreds import deferred, or_global_reactor
from dftx.errors import DftxError

__all__ = ["COMMANDS", "UserError", "main", "parser", "run"]


class UserError(Exception):
    """A mistake of the caller: reported as one line."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dftx", description="Look inside a dftx deployment.")
    p.add_argument("--version", action="version", version=f"dftx {__version__}")
    p.add_argument("--config", help="an INI file of a service ([df], [df_redis], ...)")
    p.add_argument("--db", help="Redis seed nodes, host:port,... (instead of --config)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("topology", help="the Redis Cluster's masters, slots and replicas")
    ls = sub.add_parser("ls", help="every row of a table")
    ls.add_argument("table")
    ls.add_argument("--topic")
    get = sub.add_parser("get", help="one row's value")
    get.add_argument("table")
    get.add_argument("key")
    get.add_argument("--topic")
    pub = sub.add_parser("publish", help="write a row through NbApi and publish it")
    pub.add_argument("table")
    pub.add_argument("key")
    pub.add_argument("action", choices=["create", "set", "delete"])
    pub.add_argument("value", nargs="?")
    pub.add_argument("--topic")
    tail = sub.add_parser("tail", help="live updates, one line each")
    tail.add_argument("--topic", action="append", default=[])
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--count", type=int, help="stop after this many updates")
    status = sub.add_parser("status", help="a service's /v1/status")
    status.add_argument("url")
    keygen = sub.add_parser("curve-keygen", help="a new ZeroMQ CURVE key pair")
    keygen.add_argument("dir")
    keygen.add_argument("--name", default="dftx",
                        help="file name: NAME.key and NAME.key_secret (default: dftx)")
    check = sub.add_parser(
        "check-config", help="check a service's configuration file as the service does at "
        "start, connecting to nothing: prints ok, or the error with exit status 1")
    check.add_argument("file")
    check.add_argument("--role", choices=sorted(SERVICE_ROLES),
                       help="the service that reads it (default: check the common sections "
                       "and every role section present, without building a service)")
    return p


SERVICE_ROLES = {
    "dfpublisher": dfconfig.NEUTRON_SERVER, "neutron_server": dfconfig.NEUTRON_SERVER,
    "dfcontroller": dfconfig.LOCAL_CONTROLLER, "df_local_controller": dfconfig.LOCAL_CONTROLLER,
}
"""check-config --role: a service's name or its role."""


def _config(args: argparse.Namespace) -> dfconfig.Config:
    if args.config:
        return dfconfig.load(args.config)
    if args.db:
        return dfconfig.parse(f"[df]\nremote_db_hosts = {args.db}\n")
    raise UserError("give --db host:port,... or --config FILE")


async def _db(args: argparse.Namespace) -> Any:
    from dftx.db import from_config

    db = from_config(_config(args))
    await db.initialize()
    return db


async def topology(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    db = await _db(args)
    try:
        client = getattr(db, "client", None)
        if client is None:
            raise UserError("no cluster topology: the NB DB driver is not redis "
                            "([df] nb_db_driver)")
        t = client.topology
        for master, info in t.as_dict()["masters"].items():
            slots = " ".join(f"{a}-{b}" for a, b in info["slots"])
            replicas = ", ".join(info["replicas"]) or "none"
            out.write(f"{master}  slots {slots}  replicas {replicas}\n")
    finally:
        await db.close()


async def ls(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    db = await _db(args)
    try:
        for topic, key, value in sorted(await db.get_all_rows(args.table, args.topic),
                                        key=lambda r: (r[0] or "", r[1])):
            out.write(f"{key}\t{topic or '-'}\t{value}\n")
    finally:
        await db.close()


async def get(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    db = await _db(args)
    try:
        out.write(await db.get_key(args.table, args.key, args.topic) + "\n")
    finally:
        await db.close()


def _pubsub(cfg: dfconfig.Config, relay: bool) -> Any:
    from dftx import pubsub

    if relay and cfg.df.pub_sub_driver == "zmq":
        from dftx.pubsub.zmq import ZmqPubSub

        # ipc: protected by the file's permissions, no CURVE
        return ZmqPubSub(relay=f"ipc://{cfg.neutron_server.publisher_multiproc_socket}")
    return pubsub.from_config(cfg)


async def publish(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    from dftx.nb import NbApi

    if not args.config:
        raise UserError("publish needs --config (the pub/sub settings)")
    if args.action != "delete" and args.value is None:
        raise UserError(f"{args.action} needs a VALUE")
    cfg = _config(args)
    db = await _db(args)
    pub = _pubsub(cfg, relay=True).get_publisher()
    try:
        await pub.initialize()
        nb = NbApi(db, pub)
        if args.action == "create":
            await nb.create(args.table, args.key, args.value, args.topic)
        elif args.action == "set":
            await nb.update(args.table, args.key, args.value, args.topic)
        else:
            await nb.delete(args.table, args.key, args.topic)
        out.write(f"{args.action} {args.table}/{args.key} done\n")
    finally:
        await pub.close()
        await db.close()


def _line(update: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps({**update.to_dict(), "publisher": update.publisher,
                           "seq": update.seq}, sort_keys=True)
    if update.is_control:
        return f"{update.action} {update.topic or '*'}"
    return f"{update.topic} {update.action} {update.table}/{update.key} {update.value or ''}"


async def tail(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    from dftx.registry import Discovery

    if not args.config:
        raise UserError("tail needs --config (the pub/sub settings)")
    cfg = _config(args)
    db = await _db(args)
    sub = _pubsub(cfg, relay=False).get_subscriber()
    done: defer.Deferred[None] = defer.Deferred()
    seen = [0]
    discovery = None

    def on_update(update: Any) -> None:
        if discovery is not None:
            discovery.observe(update)
        out.write(_line(update, args.json) + "\n")
        out.flush()
        if not update.is_control:
            seen[0] += 1
            if args.count is not None and seen[0] >= args.count and not done.called:
                done.callback(None)

    try:
        for topic in args.topic:
            await sub.register_topic(topic)
        await sub.initialize(on_update)
        if cfg.df.pub_sub_driver == "zmq":
            discovery = Discovery(db, sub, dfconfig.LOCAL_CONTROLLER, cfg.df.publisher_timeout,
                                  clock=reactor)
            discovery.startService()
            await discovery.ready
        await done
    finally:
        if discovery is not None:
            await discovery.stopService()
        await sub.close()
        await db.close()


async def status(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    from twisted.web.client import Agent, HTTPConnectionPool, readBody

    url = args.url if "/v1/" in args.url else args.url.rstrip("/") + "/v1/status"
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    try:
        response = await agent.request(b"GET", url.encode())
    except Exception as e:
        raise UserError(f"{url}: {e}") from None
    text = await readBody(response)
    if response.code != 200:
        raise UserError(f"{url}: HTTP {response.code}")
    try:
        data = json.loads(text)
    except ValueError:
        raise UserError(f"{url}: not JSON") from None
    _print_tree(data, out, 0)


def _print_tree(data: Any, out: Any, depth: int) -> None:
    pad = "  " * depth
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, (dict, list)) and v:
                out.write(f"{pad}{k}:\n")
                _print_tree(v, out, depth + 1)
            else:
                out.write(f"{pad}{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}\n")
    elif isinstance(data, list):
        for v in data:
            if isinstance(v, (dict, list)):
                out.write(f"{pad}-\n")
                _print_tree(v, out, depth + 1)
            else:
                out.write(f"{pad}- {v}\n")
    else:
        out.write(f"{pad}{data}\n")


async def curve_keygen(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    from dftx.pubsub.curve import load_key_pair, write_key_pair

    try:
        public_file, secret_file = write_key_pair(args.dir, args.name)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    public = load_key_pair(secret_file).public.decode()
    out.write(f"public key {public}\n  {public_file} (give it to the peers that must "
              f"allow this service)\n  {secret_file} (mode 0600: this service's "
              f"zmq_curve_secret_key_file)\n")


async def check_config(args: argparse.Namespace, out: Any, reactor: Any) -> None:
    from dftx import runner
    from dftx.controller import ControllerService
    from dftx.publisher import PublisherService

    if args.role is None:
        dfconfig.load(args.file)
    else:
        by_role = {s.role: s for s in (PublisherService, ControllerService)}
        runner.build(args.file, by_role[SERVICE_ROLES[args.role]], reactor)
    out.write("ok\n")


COMMANDS = {"topology": topology, "ls": ls, "get": get, "publish": publish, "tail": tail,
            "status": status, "curve-keygen": curve_keygen, "check-config": check_config}


async def run(argv: list[str], out: Any = sys.stdout, err: Any = sys.stderr,
              reactor: Any = None) -> int:
    """
    Run one command with C{reactor} (a caller that runs the global reactor
    may omit it).  @return: the exit status.
    """
    reactor = or_global_reactor(reactor)
    args = parser().parse_args(argv)
    try:
        await COMMANDS[args.command](args, out, reactor)
    except (UserError, DftxError, OSError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        err.write(f"dftx {args.command}: {message}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """The console script."""
    argv = sys.argv[1:] if argv is None else argv
    codes: list[int] = []

    @deferred
    async def _main(reactor: Any) -> None:
        codes.append(await run(argv, reactor=reactor))

    try:
        task.react(_main)
    except SystemExit as e:
        if e.code not in (0, None) or not codes:
            raise
    sys.exit(codes[0] if codes else 1)
