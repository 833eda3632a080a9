"""Importing the pub/sub modules installs no reactor (an application may
still choose its reactor after importing them)."""

from __future__ import annotations

import os
import subprocess
import sys

MODULES = [
    "dftx.codec", "dftx.pubsub", "dftx.pubsub.api", "dftx.pubsub.curve",
    "dftx.pubsub.redis", "dftx.pubsub.redis_subscriber", "dftx.pubsub.zmq",
    "dftx.pubsub.zmq_relay", "dftx.pubsub.zmq_socket", "dftx.pubsub.zmq_subscriber",
]


def _run(code: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)


def test_importing_pubsub_installs_no_reactor():
    done = _run(f"import sys\nimport {', '.join(MODULES)}\n"
                "assert 'twisted.internet.reactor' not in sys.modules, 'reactor installed'\n"
                "assert 'txzmq' not in sys.modules, 'txzmq imported'\n")
    assert done.returncode == 0, done.stderr


def test_the_zeromq_driver_runs_on_the_reactor_chosen_after_import():
    # asyncio's reactor, installed after the import: a message goes through.
    done = _run("""
import dftx.pubsub.zmq
from twisted.internet import asyncioreactor
asyncioreactor.install()
from twisted.internet import defer, reactor, task
from dftx.update import DbUpdate

async def main(reactor):
    pubsub = dftx.pubsub.zmq.ZmqPubSub(bind="tcp://127.0.0.1:*")
    pub, sub, got = pubsub.get_publisher(), pubsub.get_subscriber(), []
    await pub.initialize()
    await sub.initialize(got.append)
    await sub.register_listen_address(pub.uri)
    for _ in range(500):
        await pub.send_event(DbUpdate("lport", "k", "create", "{}"))
        if any(not u.is_control for u in got):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert any(not u.is_control for u in got), got
    assert type(reactor).__name__ == "AsyncioSelectorReactor"
    await sub.close()
    await pub.close()

task.react(lambda r: defer.ensureDeferred(main(r)))
""")
    assert done.returncode == 0, done.stderr
