"""
In-memory fakes of dftx's contracts, for applications that embed dftx and
want to test themselves without servers (as treq.testing does for HTTP).

- L{MemoryDbDriver}: the NB DB contract (the same class the suite checks
  against the Redis driver's contract tests).
- L{MemoryPubSub}: publishers and subscribers that talk in-process, through
  the same wire encoding, stamping and subscriber base as the real drivers
  (exact topics, seq tracking, control events).
- L{FakeInterfaceSource}: stands in for L{dftx.ovsdb.monitor.InterfaceMonitor};
  the test adds, changes and removes ports and the owner's callback gets the
  same L{PortEvent}s the monitor would give.

Deliveries happen synchronously inside C{send_event}, so a test needs no
clock and no polling.
"""

from __future__ import annotations

import uuid
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from zope.interface import implementer

from dftx.db.memory import MemoryDbDriver
from dftx.errors import PublishError
from dftx.ovsdb.ports import PortEvent, PortTable, Row
from dftx.pubsub.api import Callback, IPublisher, IPubSub, ISubscriber, PublisherBase, SubscriberBase

__all__ = ["MemoryDbDriver", "MemoryPubSub", "FakeInterfaceSource", "PortEvent"]


@implementer(IPublisher)
class MemoryPublisher(PublisherBase):
    def __init__(self, bus: "MemoryPubSub", publisher_id: str | None = None) -> None:
        super().__init__(publisher_id)
        self.bus = bus
        self.closed = False

    def initialize(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def _send(self, topic: str, data: bytes) -> defer.Deferred[None]:
        if self.closed:
            return defer.fail(PublishError(topic, "publisher closed"))
        if self.bus.fail_sends:
            return defer.fail(PublishError(topic, "the test made sends fail"))
        for sub in list(self.bus.subscribers):
            sub._message(topic, data, f"memory:{self.id}")
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


@implementer(ISubscriber)
class MemorySubscriber(SubscriberBase):
    def __init__(self, bus: "MemoryPubSub") -> None:
        super().__init__()
        self.bus = bus

    def initialize(self, callback: Callback) -> defer.Deferred[None]:
        self._set_callback(callback)
        self.topics.add("D")
        self.bus.subscribers.append(self)
        return defer.succeed(None)

    def register_topic(self, topic: str) -> defer.Deferred[None]:
        self.topics.add(topic)
        return defer.succeed(None)

    def unregister_topic(self, topic: str) -> defer.Deferred[None]:
        self.topics.discard(topic)
        return defer.succeed(None)

    def restart(self) -> None:
        """What a real driver does after a lost connection: C{dbrestart}."""
        self._restored()

    def close(self) -> defer.Deferred[None]:
        if self in self.bus.subscribers:
            self.bus.subscribers.remove(self)
        return defer.succeed(None)


@implementer(IPubSub)
class MemoryPubSub:
    """
    One in-process bus.  Set L{fail_sends} to make every send errback with
    L{PublishError} (to test an application's undo).
    """

    def __init__(self) -> None:
        self.subscribers: list[MemorySubscriber] = []
        self.fail_sends = False

    def get_publisher(self, publisher_id: str | None = None) -> MemoryPublisher:
        return MemoryPublisher(self, publisher_id)

    def get_subscriber(self) -> MemorySubscriber:
        return MemorySubscriber(self)


class FakeInterfaceSource(service.Service):
    """
    The InterfaceMonitor API (C{callback(PortEvent)}, C{ports},
    C{synced}, C{on_sync_start}/C{on_sync_end}), driven by the test.
    """

    def __init__(self, endpoint: str = "fake:", callback: Callable[[PortEvent], object] = print,
                 *, on_sync_start: Callable[[], object] | None = None,
                 on_sync_end: Callable[[], object] | None = None) -> None:
        self.endpoint = endpoint
        self.callback = callback
        self.on_sync_start = on_sync_start
        self.on_sync_end = on_sync_end
        self._table = PortTable()
        self.synced = False

    @property
    def rows(self) -> dict[str, Row]:
        """uuid -> the row of every interface."""
        return self._table.rows

    @property
    def ports(self) -> dict[str, PortEvent]:
        """uuid -> the ports online, each with its last event."""
        return self._table.ports

    def startService(self) -> None:
        super().startService()
        if self.on_sync_start:
            self.on_sync_start()
        self.synced = True
        if self.on_sync_end:
            self.on_sync_end()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.synced = False
        return defer.succeed(None)

    def set_port(self, name: str, type: str = "", external_ids: dict[str, str] | None = None,
                 options: dict[str, str] | None = None, ofport: int | None = None,
                 admin_state: str | None = None, uuid_: str | None = None) -> str:
        """Add or change the interface C{name}.  @return: its uuid."""
        uid = uuid_ or next((u for u, r in self.rows.items() if r["name"] == name),
                            str(uuid.uuid4()))
        row = {"name": name, "type": type, "external_ids": dict(external_ids or {}),
               "options": dict(options or {}),
               "ofport": frozenset() if ofport is None else frozenset([ofport]),
               "admin_state": frozenset() if admin_state is None else frozenset([admin_state]),
               "mac_in_use": frozenset()}
        self._set(uid, row)
        return uid

    def remove_port(self, name: str) -> None:
        """Remove the interface C{name}."""
        for uid, row in list(self.rows.items()):
            if row["name"] == name:
                self._set(uid, None)

    def _set(self, uid: str, row: Row | None) -> None:
        event = self._table.set(uid, row)
        if event is not None:
            self.callback(event)
