"""
L{InterfaceMonitor}: the local controller's view of the Interface table of
the local ovsdb-server, as L{PortEvent}s.

One long-lived connection, made through any Twisted client endpoint string
(C{tcp:127.0.0.1:6640}, C{unix:/run/openvswitch/db.sock}, C{ssl:...} or
C{tls:...}; with C{ssl:} the certificate is checked by service-identity
against C{hostname=}, or the host when none is given) and kept by a
C{ClientService} that reconnects with a backoff.  On each connection the
monitor asks for the columns name, type, external_ids, options, ofport,
admin_state and mac_in_use with the best method the server has:

- C{monitor_cond_since} (OVS 2.12+): after a reconnect to a clustered
  database, the server sends only what changed since the last transaction
  seen (C{found} true); otherwise (C{found} false, or a standalone
  database) the whole table;
- C{monitor_cond}: the whole table, then C{update2} diffs;
- C{monitor} (RFC 7047): the whole table, then C{update} rows.

The row cache outlives connections.  When the server sends the whole table,
the monitor compares it with the cache and reports only real changes:
offline for ports that disappeared while disconnected, online for new ones,
update for changed ones; a port never goes online twice.  Each connection's
first answer is an I{initial sync}, bracketed by C{on_sync_start} and
C{on_sync_end}, so the owner can tell "port gone while I was away" from
"not reported yet".
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.deferreds import deferred, or_global_reactor
from dftx.endpoints import client_endpoint
from dftx.errors import DBConnectionError, DftxError, OvsdbError, ProtocolError
from dftx.ovsdb.jsonrpc import DEFAULT_MAX_MESSAGE, DEFAULT_PROBE_INTERVAL, JsonRpcProtocol
from dftx.ovsdb.ports import PortEvent, PortTable, Row
from dftx.ovsdb.rows import COLUMNS, TABLE, apply_diff, full_row
from dftx.reconnect import ReportingEndpoint, SessionBackoff

log = Logger()

__all__ = ["DATABASE", "METHODS", "MONITOR_ID", "ZERO_TXN", "Callback", "InterfaceMonitor"]

DATABASE = "Open_vSwitch"
ZERO_TXN = "00000000-0000-0000-0000-000000000000"
METHODS = ("monitor_cond_since", "monitor_cond", "monitor")
MONITOR_ID = "dftx-interfaces"
# What a reply or notification of the wrong shape raises while it is applied.
_BAD_DATA = (ProtocolError, TypeError, ValueError, AttributeError, KeyError, IndexError)

Callback = Callable[[PortEvent], object]


class _MonitorProtocol(JsonRpcProtocol):
    """A JSON-RPC connection that starts a monitor session once made."""

    def __init__(self, monitor: "InterfaceMonitor") -> None:
        super().__init__(monitor.reactor, max_message=monitor.max_message,
                         probe_interval=monitor.probe_interval)
        self.monitor = monitor
        self.on_notification = lambda method, params: monitor._notified(self, method, params)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.monitor._session(self)


class InterfaceMonitor(service.Service):
    """
    Monitors the Interface table (see the module docstring).

    What the owner can rely on:

    - C{callback} gets every change of a port's state, in order: C{online}
      once, then C{update}s, then C{offline} once (and C{online} again only
      if the port comes back), across any number of reconnects.  A change
      that happened while disconnected is reported after the reconnect; a
      port added and removed while disconnected is never reported.
    - L{ports} is, at every moment (inside the callback too), the fold of the
      events delivered so far: the ports currently online, each mapped to
      its last event.
    - Each connection starts an initial sync: C{on_sync_start()} is called
      when the connection is made, C{on_sync_end()} once the server's first
      answer has been applied and its events delivered; from then on
      L{ports} matches the server's table (as of that answer).  A connection
      lost during the sync gives another C{on_sync_start()} without an
      C{on_sync_end()}.  Neither hook nor the callback is called after
      L{stopService}, except for the rest of a batch of events that was
      being delivered when it was called.

    @param endpoint: a client endpoint string (see L{dftx.endpoints}).
    @param callback: called with each L{PortEvent}; its exceptions are
        logged and counted, and the next event is still delivered.
    @param on_sync_start: called with no argument when an initial sync
        begins (each connection).
    @param on_sync_end: called once the initial sync's events are delivered.
    @param reactor: the reactor (the global one by default).
    @param probe_interval: seconds of silence before an echo probe, and
        then before the connection is dropped (None: no probe).
    @param max_message: the largest JSON-RPC message accepted, in bytes.
    @param max_retry_delay: the longest wait between reconnect attempts; the
        first is 0.1 s, then doubling.  A connection that ends before its
        initial sync counts as a failed attempt.

    @ivar synced: whether the current connection's initial sync is done.
    @ivar method: the monitor method the server accepted.
    @ivar last_txn_id: the last transaction seen (C{monitor_cond_since}).
    @ivar last_error: the L{DftxError} that last ended a connection or
        connection attempt (None until one did); it is kept after a
        successful reconnect, for status pages.
    @ivar counters: connections, syncs (initial syncs done), reloads (the
        whole table received), resumes (only changes received), events,
        callback_errors, connect_failures, bad_updates.
    """

    def __init__(
        self,
        endpoint: str,
        callback: Callback,
        *,
        on_sync_start: Callable[[], object] | None = None,
        on_sync_end: Callable[[], object] | None = None,
        reactor: Any = None,
        probe_interval: float | None = DEFAULT_PROBE_INTERVAL,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_retry_delay: float = 5.0,
    ) -> None:
        reactor = or_global_reactor(reactor)
        self.endpoint = endpoint
        self.callback = callback
        self.on_sync_start = on_sync_start
        self.on_sync_end = on_sync_end
        self.reactor = reactor
        self.probe_interval = probe_interval
        self.max_message = max_message
        self._table = PortTable()
        self.synced = False
        self.method: str | None = None
        self.last_txn_id = ZERO_TXN
        self.last_error: DftxError | None = None
        self.counters: Counter[str] = Counter()
        self._methods = list(METHODS)
        self._connection: _MonitorProtocol | None = None
        # A connection that ended before its initial sync counts as failed.
        self._retry = SessionBackoff(backoffPolicy(
            initialDelay=0.05, maxDelay=max_retry_delay, factor=2.0,
            jitter=lambda: random.random() * 0.1))
        self._endpoint = ReportingEndpoint(client_endpoint(reactor, endpoint),
                                           self._connect_failed)
        self._service: ClientService | None = None

    @property
    def rows(self) -> dict[str, Row]:
        """uuid -> the cached row of every interface, online or not."""
        return self._table.rows

    @property
    def ports(self) -> dict[str, PortEvent]:
        """uuid -> L{PortEvent}, the ports currently online, each with the
        last event delivered for it (action C{online} or C{update})."""
        return self._table.ports

    # --- life cycle -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        factory = protocol.Factory.forProtocol(lambda: _MonitorProtocol(self))
        self._service = ClientService(self._endpoint, factory, retryPolicy=self._retry,
                                      clock=self.reactor)
        self._service.startService()

    def stopService(self) -> defer.Deferred[None]:
        """@return: Deferred firing once the connection is closed."""
        super().stopService()
        self.synced = False
        self._connection = None
        if self._service is None:
            return defer.succeed(None)
        service, self._service = self._service, None
        return service.stopService()

    def _connect_failed(self, failure: Failure) -> None:
        if self.running and not failure.check(defer.CancelledError):
            self.counters["connect_failures"] += 1
            self.last_error = DBConnectionError(
                self.endpoint, f"connect failed: {failure.getErrorMessage()}")

    # --- one connection ---------------------------------------------------------------

    def _session(self, proto: _MonitorProtocol) -> None:
        """A connection was made: monitor the table on it.  A failure drops
        it, and ClientService makes the next one after a backoff."""
        if not self.running:
            proto.transport.abortConnection()
            return
        self._connection = proto
        self.synced = False
        self.counters["connections"] += 1
        proto.lost.addCallback(self._disconnected, proto)
        self._notify_owner(self.on_sync_start)
        self._monitor(proto).addErrback(self._session_failed, proto)

    @deferred
    async def _monitor(self, proto: _MonitorProtocol) -> None:
        """Request the monitor and apply the first answer.  @return:
        Deferred firing with None once the initial sync is done."""
        method, result = await self._request_monitor(proto)
        if not self._current(proto):
            return
        self.method = method
        try:
            if method == "monitor_cond_since":
                found, txn_id, updates = result
                if found:
                    self.counters["resumes"] += 1
                    self._apply2(updates)
                else:
                    self._reload(updates, update2=True)
                self.last_txn_id = txn_id
            else:
                self._reload(result, update2=method == "monitor_cond")
        except _BAD_DATA as e:
            raise self._bad_data(method, e) from None
        self.synced = True
        self._retry.ready()
        self.counters["syncs"] += 1
        log.info("{endpoint}: {n} interfaces ({method})", endpoint=self.endpoint,
                 n=len(self.rows), method=method)
        if self.running:
            self._notify_owner(self.on_sync_end)

    async def _request_monitor(self, proto: _MonitorProtocol) -> tuple[str, Any]:
        """Ask with the best method the server accepts; remember it."""
        while True:
            method = self._methods[0]
            if method == "monitor":
                params: list[Any] = [DATABASE, MONITOR_ID, {TABLE: {"columns": list(COLUMNS)}}]
            else:
                params = [DATABASE, MONITOR_ID, {TABLE: [{"columns": list(COLUMNS)}]}]
                if method == "monitor_cond_since":
                    params.append(self.last_txn_id)
            try:
                return method, await proto.request(method, params)
            except OvsdbError as e:
                if "unknown method" not in e.error or len(self._methods) == 1:
                    raise
                log.info("{endpoint} has no {method}", endpoint=self.endpoint, method=method)
                self._methods.pop(0)

    def _session_failed(self, failure: Failure, proto: _MonitorProtocol) -> None:
        error = failure.value
        if not isinstance(error, DftxError):
            log.failure("monitoring {endpoint} failed", failure, endpoint=self.endpoint)
            error = ProtocolError(f"unexpected {failure.getErrorMessage()}", self.endpoint)
        if self._current(proto):
            self.last_error = error
            log.warn("monitoring {table} on {endpoint} failed: {error}", table=TABLE,
                     endpoint=self.endpoint, error=error)
        proto.transport.abortConnection()

    def _current(self, proto: _MonitorProtocol) -> bool:
        return proto is self._connection

    def _disconnected(self, error: DftxError, proto: _MonitorProtocol) -> None:
        if not self._current(proto):
            return
        if not self.synced:
            self._retry.failed()
        self.synced = False
        self._connection = None
        if self.running:
            self.last_error = error
            log.info("lost {endpoint} ({error}); reconnecting", endpoint=self.endpoint,
                     error=error)

    def _notified(self, proto: _MonitorProtocol, method: str, params: Any) -> None:
        if not self._current(proto) or not self.synced:
            return
        try:
            if method == "update3":
                _, txn_id, updates = params
                self._apply2(updates)
                self.last_txn_id = txn_id
            elif method == "update2":
                self._apply2(params[1])
            elif method == "update":
                self._apply1(params[1])
        except _BAD_DATA as e:
            self.last_error = self._bad_data(method, e)
            log.warn("{error}: reconnecting", error=self.last_error)
            proto.transport.abortConnection()

    def _bad_data(self, method: str, error: Exception) -> ProtocolError:
        """
        An answer that cannot be applied: the stream is no longer to be
        trusted, and part of it may be applied already.  The next connection
        must send the whole table (which the cache is compared with), not
        changes since a transaction id whose changes were half applied.
        """
        self.counters["bad_updates"] += 1
        self.last_txn_id = ZERO_TXN
        reason = error.reason if isinstance(error, ProtocolError) else repr(error)
        return ProtocolError(f"bad {method} for {TABLE}: {reason}", self.endpoint)

    # --- applying updates ---------------------------------------------------------------

    def _reload(self, updates: Any, update2: bool) -> None:
        """The whole table arrived: replace the cache, report differences."""
        self.counters["reloads"] += 1
        fresh: dict[str, Row] = {}
        for uuid, change in (updates or {}).get(TABLE, {}).items():
            columns = change.get("initial", change.get("insert")) if update2 else change.get("new")
            if columns is not None:
                fresh[uuid] = full_row(columns)
        # Offline first: a port re-created under a new uuid goes offline
        # before its new row comes online.
        for uuid in [u for u in self.rows if u not in fresh]:
            self._set(uuid, None)
        for uuid, row in fresh.items():
            if self.rows.get(uuid) != row:
                self._set(uuid, row)

    def _apply2(self, updates: Any) -> None:
        for uuid, change in (updates or {}).get(TABLE, {}).items():
            if "delete" in change:
                self._set(uuid, None)
            elif "modify" in change:
                old = self.rows.get(uuid)
                if old is None:
                    raise ProtocolError(f"modify of unknown {TABLE} row {uuid}")
                self._set(uuid, apply_diff(old, change["modify"]))
            else:
                columns = change.get("insert", change.get("initial"))
                if columns is not None:
                    self._set(uuid, full_row(columns))

    def _apply1(self, updates: Any) -> None:
        for uuid, change in (updates or {}).get(TABLE, {}).items():
            new = change.get("new")
            self._set(uuid, None if new is None else full_row(new))

    def _set(self, uuid: str, row: Row | None) -> None:
        event = self._table.set(uuid, row)
        if event is None:
            return
        self.counters["events"] += 1
        try:
            self.callback(event)
        except Exception:
            self.counters["callback_errors"] += 1
            log.failure("port event callback failed on {event!r}", event=event)

    def _notify_owner(self, hook: Callable[[], object] | None) -> None:
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.failure("initial sync hook failed")
