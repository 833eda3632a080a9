"""
Every error dftx raises on purpose.

Each class carries, as attributes, the thing it concerns (the table and key,
the node and slot, the file, section and key, the peer), so that a caller can
act on it without parsing the message.  The message names the same things for
the log.
"""

from __future__ import annotations

from typing import Iterable

__all__ = [
    "ClusterDownError", "ConfigError", "ConnectionClosed", "DBConnectionError",
    "DBKeyAmbiguous", "DBKeyNotFound", "DftxError", "InvalidNameError", "NodeUnreachable",
    "NotReplicated", "OvsdbError", "ProtocolError", "PublishError", "ReplyError",
    "SubscribeError",
]


class DftxError(Exception):
    """Base class of every dftx error."""


class InvalidNameError(DftxError, ValueError):
    """
    A table, topic or key cannot be stored: it contains a character that the
    key layout reserves (see L{dftx.db.api.check_names}).
    """

    def __init__(self, kind: str, name: object, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f"invalid {kind} {name!r}: {reason}")


class DBKeyNotFound(DftxError, KeyError):
    """The key does not exist in the table (under the topic, if one was given)."""

    def __init__(self, table: str, key: str, topic: str | None = None) -> None:
        self.table = table
        self.key = key
        self.topic = topic
        where = f"table {table!r}" + (f" topic {topic!r}" if topic else "")
        super().__init__(f"key {key!r} not found in {where}")

    def __str__(self) -> str:
        # KeyError quotes its argument; keep the plain message.
        return str(self.args[0])


class DBKeyAmbiguous(DftxError, LookupError):
    """A lookup without topic found the key under more than one topic."""

    def __init__(self, table: str, key: str, topics: Iterable[str | None]) -> None:
        self.table = table
        self.key = key
        self.topics = sorted(topics, key=lambda t: t or "")
        super().__init__(
            f"key {key!r} of table {table!r} exists under topics "
            f"{self.topics!r}; give the topic"
        )


class ReplyError(DftxError):
    """
    An error reply from a Redis node (C{-ERR ...}, C{-WRONGTYPE ...}).

    @ivar message: the reply text, e.g. C{"MOVED 3999 127.0.0.1:7001"}.
    @ivar kind: its first word (C{"MOVED"}, C{"ERR"}, ...).
    @ivar node: C{"host:port"} of the node that sent it, when known.
    """

    def __init__(self, message: str, node: str | None = None) -> None:
        self.message = message
        self.kind = message.split(" ", 1)[0]
        self.node = node
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.node}: {self.message}" if self.node else self.message


class DBConnectionError(DftxError, ConnectionError):
    """
    A database node could not be reached, or the connection was lost, after
    every retry.

    @ivar node: C{"host:port"} of the node last tried, or C{None} when no node
        was known.
    @ivar slot: the cluster hash slot the command was for, or C{None}.
    """

    def __init__(self, node: str | None, reason: str, slot: int | None = None) -> None:
        self.node = node
        self.slot = slot
        self.reason = reason
        where = f"node {node}" if node else "no reachable node"
        if slot is not None:
            where += f" (slot {slot})"
        super().__init__(f"{where}: {reason}")


class ConnectionClosed(DBConnectionError):
    """
    The connection was lost (or timed out) after the command was written:
    the node may or may not have executed it.
    """


class NodeUnreachable(DBConnectionError):
    """
    No connection to the node could be made; the command was never sent.
    """


class NotReplicated(DBConnectionError):
    """
    A write was executed by the master, but fewer replicas than asked
    acknowledged it (Redis WAIT), or the connection was lost before they
    could.

    @ivar reply: the write's own reply (e.g. the old value from C{SET ...
        GET}), for a caller that undoes the write.
    """

    def __init__(self, node: str | None, reason: str, slot: int | None, reply: object) -> None:
        super().__init__(node, reason, slot)
        self.reply = reply


class ClusterDownError(DBConnectionError):
    """
    The cluster kept answering CLUSTERDOWN, TRYAGAIN or LOADING (or had no
    owner for the slot) for every retry.
    """


class PublishError(DftxError):
    """A message was not accepted by the broker or transport."""

    def __init__(self, topic: str | None, reason: str, peer: str | None = None) -> None:
        self.topic = topic
        self.peer = peer
        self.reason = reason
        via = f" via {peer}" if peer else ""
        super().__init__(f"publish on topic {topic!r}{via} failed: {reason}")


class SubscribeError(DftxError):
    """A subscription (a topic, or a publisher address) could not be made."""

    def __init__(self, target: str | None, reason: str) -> None:
        self.target = target
        self.reason = reason
        super().__init__(f"subscribe to {target!r} failed: {reason}")


class ConfigError(DftxError):
    """
    A configuration file cannot be used.  C{section} and C{key} are C{None}
    when the problem is with the file as a whole.
    """

    def __init__(
        self,
        path: str,
        reason: str,
        section: str | None = None,
        key: str | None = None,
    ) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.reason = reason
        where = str(path)
        if section is not None:
            where += f": [{section}]"
            if key is not None:
                where += f" {key}"
        super().__init__(f"{where}: {reason}")


class ProtocolError(DftxError):
    """
    A peer sent something that does not follow the protocol (undecodable
    message, malformed frame, unexpected reply type, oversized frame).
    """

    def __init__(self, reason: str, peer: str | None = None) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"{peer}: {reason}" if peer else reason)


class OvsdbError(DftxError):
    """
    ovsdb-server answered a request with an error (RFC 7047: C{"error"}
    is a string or an object with C{error} and C{details}).

    @ivar method: the request's method.
    @ivar error: the error's name, e.g. C{"unknown method"}.
    @ivar details: the server's explanation, when it gave one.
    """

    def __init__(self, method: str, error: object, peer: str | None = None) -> None:
        self.method = method
        self.peer = peer
        if isinstance(error, dict):
            self.error = str(error.get("error", error))
            self.details = error.get("details")
        else:
            self.error = str(error)
            self.details = None
        detail = f" ({self.details})" if self.details else ""
        super().__init__(f"{peer or 'ovsdb'}: {method}: {self.error}{detail}")
