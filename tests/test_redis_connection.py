"""One reconnecting connection to a real node: pipelining, loss, restart."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from dftx.redis.connection import NodeConnection
from dftx.deferreds import gather
from dftx.redis.endpoints import NodeEndpoints
from dftx.errors import ReplyError
from dftx.errors import ConnectionClosed, NodeUnreachable
from dftx.harness import poll

aio = pytest_twisted.ensureDeferred


def connect(server, **kw):
    kw.setdefault("timeout", 2)
    conn = NodeConnection(
        server.address, NodeEndpoints([server.address], reactor).endpoint(server.address),
        reactor, **kw,
    )
    conn.start()
    return conn


async def auth_refusals(server, user):
    """How many AUTHs as C{user} the server refused (its ACL LOG)."""
    entries: list[dict[str, str]] = []
    lines = (await server.cli("ACL", "LOG", "128")).splitlines()
    for key, value in zip(lines[::2], lines[1::2]):
        if key == "count":
            entries.append({})
        entries[-1][key] = value
    return sum(int(e["count"]) for e in entries
               if e.get("reason") == "auth" and e.get("username") == user)


@aio
async def test_many_commands_in_flight_on_one_connection(redis_single, unique):
    conn = connect(redis_single)
    try:
        # Issued before the connection is even up: queued, then pipelined.
        replies = await gather(conn.execute("INCR", unique) for _ in range(2000))
        assert replies == list(range(1, 2001))
        # Ours and the redis-cli asking.
        assert (await redis_single.info("clients"))["connected_clients"] == "2"
        err = await conn.execute("HGET", unique, "x")
        assert isinstance(err, ReplyError) and err.kind == "WRONGTYPE"
    finally:
        await conn.close()
    with pytest.raises(NodeUnreachable):
        await conn.execute("PING")


@aio
async def test_reconnects_after_restart_and_tells_listeners(redis_single):
    conn = connect(redis_single)
    connected, lost = [], []
    conn.on_connected(connected.append)
    conn.on_lost(lambda c, reason: lost.append(reason))
    try:
        assert await conn.execute("PING") == b"PONG"
        in_flight = conn.execute("BLPOP", "never", 0)  # a reply that will not come
        await redis_single.kill()
        with pytest.raises(ConnectionClosed):
            await in_flight
        assert len(lost) == 1 and not conn.connected
        # Down: commands fail at once (after the first failed attempt)
        # instead of waiting for the backoff.
        await poll(lambda: "down" in repr(conn), 5, "a failed reconnection attempt")
        started = reactor.seconds()
        with pytest.raises(NodeUnreachable) as info:
            await conn.execute("PING")
        assert reactor.seconds() - started < 0.1
        assert info.value.node == redis_single.address and "refused" in str(info.value)
        await redis_single.start()
        await poll(lambda: conn.connected, 5, "reconnection")
        assert await conn.execute("PING") == b"PONG"
        assert len(connected) == 2 and connected[1] is conn.protocol
    finally:
        await conn.close()


@aio
async def test_wait_replicas_calls_in_one_turn_share_one_wait(redis_single, unique):
    conn = connect(redis_single)
    try:
        await redis_single.cli("CONFIG", "RESETSTAT")
        await conn.execute("SET", unique, "v")
        counts = await gather(conn.wait_replicas(0, 0.1) for _ in range(10))
        assert counts == [0] * 10
        stats = (await redis_single.info("commandstats"))["cmdstat_wait"]
        assert stats.startswith("calls=1,")
    finally:
        await conn.close()


@aio
async def test_close_fails_what_was_never_sent(redis_single):
    conn = connect(redis_single)
    queued = conn.execute("PING")  # not connected yet: queued
    await conn.close()
    with pytest.raises(NodeUnreachable) as info:
        await queued
    assert "closed" in str(info.value)


@aio
async def test_a_refused_auth_is_retried_with_a_growing_backoff(redis_single, unique, unhandled):
    user = f"u{unique}"
    await redis_single.cli("ACL", "SETUSER", user, "on", ">pw-1", "~*", "+@all")
    conn = connect(redis_single, username=user, password="wrong-pw", max_backoff=1.0)
    try:
        before = await auth_refusals(redis_single, user)
        with pytest.raises(NodeUnreachable) as info:
            await conn.execute("PING")
        assert "WRONGPASS" in str(info.value) and "wrong-pw" not in str(info.value)
        # The server accepts every connection and refuses every AUTH: the
        # retries still back off (0.05 s doubling to 1 s), and not at the
        # first delay each time as ClientService's own count would have it.
        started = reactor.seconds()
        await poll(lambda: _refused(redis_single, user, before + 7), 10, "7 refused AUTHs")
        assert reactor.seconds() - started > 1.5
        assert not conn.connected
        # The password is made right: the next attempt works.
        await redis_single.cli("ACL", "SETUSER", user, ">wrong-pw")
        await poll(lambda: conn.connected, 5, "connected with the right password")
        assert await conn.execute("ACL", "WHOAMI") == user.encode()
    finally:
        await conn.close()
        await redis_single.cli("ACL", "DELUSER", user)
    assert unhandled == []


async def _refused(server, user, n):
    return await auth_refusals(server, user) >= n


@aio
async def test_a_connection_lost_during_auth(redis_single, unhandled):
    redis_single.pause()  # the kernel still accepts connections; AUTH gets no reply
    conn = connect(redis_single, password="pw", timeout=0.3)
    try:
        with pytest.raises(NodeUnreachable) as info:
            await conn.execute("PING")
        assert "AUTH: no reply within 0.3s" in str(info.value)
        assert not conn.connected
    finally:
        redis_single.resume()
        await conn.close()
    assert unhandled == []


@aio
async def test_a_readonly_connection_reads_from_a_replica_across_reconnections(
        redis_cluster, unique):
    key = "{" + unique + "}k"
    slot = await redis_cluster.keyslot(key)
    master = await redis_cluster.owner(slot)
    [replica] = await redis_cluster.replicas_of(master)
    await master.cli("SET", key, "v")
    plain, readonly = connect(replica), connect(replica, readonly=True)
    sessions: list = []
    readonly.on_connected(sessions.append)
    try:
        moved = await plain.execute("GET", key)
        assert isinstance(moved, ReplyError) and moved.kind == "MOVED"
        await poll(lambda: readonly.execute("GET", key).addCallback(lambda v: v == b"v"),
                   10, "the replica serving the key")
        await replica.cli("CLIENT", "KILL", "TYPE", "normal")  # both connections
        await poll(lambda: len(sessions) == 2 and readonly.connected, 10, "reconnected")
        assert await readonly.execute("GET", key) == b"v"
        assert isinstance(await plain.execute("GET", key), ReplyError)
    finally:
        await plain.close()
        await readonly.close()
