"""
L{InterfaceMonitor}: the local controller's view of the Interface table of
the local ovsdb-server, as L{PortEvent}s.

One long-lived connection, made through any Twisted client endpoint string
(C{tcp:127.0.0.1:6640}, C{unix:/run/openvswitch/db.sock}, C{ssl:...} with
the certificate checked against C{hostname} by service-identity) and kept
by a C{ClientService} that reconnects with a backoff.  On each connection
the monitor asks for the columns name, type, external_ids, options,
ofport, admin_state and mac_in_use with the best method the server has:

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
first answer is an I{initial sync}: C{on_sync_start} is called when it
begins and C{on_sync_end} (in the next reactor turn) once its events are
delivered, so the owner can tell "port gone while I was away" from "not
reported yet".
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from dftx.errors import DftxError, OvsdbError, ProtocolError
from dftx.ovsdb.jsonrpc import DEFAULT_MAX_MESSAGE, DEFAULT_PROBE_INTERVAL, JsonRpcProtocol
from dftx.ovsdb.ports import PortEvent, port_state, transition

log = Logger()

DATABASE = "Open_vSwitch"
TABLE = "Interface"
COLUMNS = ("name", "type", "external_ids", "options", "ofport", "admin_state", "mac_in_use")
_MAPS = frozenset({"external_ids", "options"})
_SETS = frozenset({"ofport", "admin_state", "mac_in_use"})  # optional: 0 or 1 value
_EMPTY_ROW: dict[str, Any] = {
    "name": "", "type": "", "external_ids": {}, "options": {},
    "ofport": frozenset(), "admin_state": frozenset(), "mac_in_use": frozenset(),
}
ZERO_TXN = "00000000-0000-0000-0000-000000000000"
METHODS = ("monitor_cond_since", "monitor_cond", "monitor")
MONITOR_ID = "dftx-interfaces"

Row = dict[str, Any]
Callback = Callable[[PortEvent], object]


def _atom(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 2 and value[0] in ("uuid", "named-uuid"):
        return value[1]
    return value


def _datum(column: str, value: Any) -> Any:
    """A column's JSON value (RFC 7047 section 5.1) as the cache keeps it."""
    if column in _MAPS:
        if not (isinstance(value, list) and len(value) == 2 and value[0] == "map"):
            raise ProtocolError(f"{TABLE}.{column}: not a map: {value!r:.80}")
        return {_atom(k): _atom(v) for k, v in value[1]}
    if column in _SETS:
        if isinstance(value, list) and len(value) == 2 and value[0] == "set":
            return frozenset(_atom(v) for v in value[1])
        return frozenset([_atom(value)])
    return _atom(value)


def _full_row(columns: Mapping[str, Any]) -> Row:
    """A row from a full (possibly default-omitting) column set."""
    row = dict(_EMPTY_ROW)
    for column, value in columns.items():
        if column in row:
            row[column] = _datum(column, value)
    return row


def _apply_diff(row: Row, diff: Mapping[str, Any]) -> Row:
    """
    Apply an update2 C{modify}.  Columns that hold at most one value
    (scalars, and optional columns such as ofport) get the new value, as
    ovsdb-server sends it; in maps a key given with its current value is
    removed, with another value replaced, and a new key is added.  (Sets of
    more than one value would toggle the elements given; this table's
    monitored columns have none.)
    """
    new = dict(row)
    for column, value in diff.items():
        if column not in new:
            continue
        change = _datum(column, value)
        if column in _MAPS:
            merged = dict(new[column])
            for k, v in change.items():
                if merged.get(k) == v:
                    del merged[k]
                else:
                    merged[k] = v
            new[column] = merged
        else:
            new[column] = change
    return new


class InterfaceMonitor(service.Service):
    """
    Monitors the Interface table (see the module docstring).

    @param endpoint: a Twisted client endpoint string.
    @param callback: called with each L{PortEvent}; its exceptions are
        logged and counted.
    @param on_sync_start: called with no argument when an initial sync
        begins (each connection).
    @param on_sync_end: called once the initial sync's events are delivered.
    @param probe_interval: seconds of silence before an echo probe, and
        then before the connection is dropped (None: no probe).
    @param max_message: the largest JSON-RPC message accepted, in bytes.

    @ivar ports: uuid -> the port's current state (a L{PortEvent} whose
        action is empty), every interface in the table.
    @ivar synced: whether the current connection's initial sync is done.
    @ivar method: the monitor method the server accepted.
    @ivar counters: connections, syncs (initial syncs done), reloads (the
        whole table received), resumes (only changes received), events,
        callback_errors.
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
        if reactor is None:
            from twisted.internet import reactor
        self.endpoint = endpoint
        self.callback = callback
        self.on_sync_start = on_sync_start
        self.on_sync_end = on_sync_end
        self.reactor = reactor
        self.probe_interval = probe_interval
        self.max_message = max_message
        self.max_retry_delay = max_retry_delay
        self.rows: dict[str, Row] = {}
        self.ports: dict[str, PortEvent] = {}
        self.synced = False
        self.method: str | None = None
        self.last_txn_id = ZERO_TXN
        self.counters: Counter[str] = Counter()
        self._methods = list(METHODS)
        self._connection: JsonRpcProtocol | None = None
        self._service: ClientService | None = None

    # --- life cycle -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        factory = protocol.Factory.forProtocol(self._protocol)
        self._service = ClientService(
            endpoints.clientFromString(self.reactor, self.endpoint), factory,
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=self.max_retry_delay),
            clock=self.reactor, prepareConnection=self._session)
        self._service.startService()

    def stopService(self) -> defer.Deferred[None]:
        """@return: Deferred firing once the connection is closed."""
        super().stopService()
        self.synced = False
        if self._service is None:
            return defer.succeed(None)
        return self._service.stopService()

    def _protocol(self) -> JsonRpcProtocol:
        proto = JsonRpcProtocol(self.reactor, max_message=self.max_message,
                                probe_interval=self.probe_interval)
        proto.on_notification = lambda method, params: self._notified(proto, method, params)
        return proto

    def _current(self, proto: JsonRpcProtocol) -> bool:
        # ClientService hands prepareConnection a proxy of the protocol; the
        # proxy forwards attributes, so compare the protocol it stands for.
        return self._connection is not None and proto.lost is self._connection.lost

    # --- one connection ---------------------------------------------------------------

    def _session(self, proto: JsonRpcProtocol) -> defer.Deferred[None]:
        """ClientService's prepareConnection: monitor and load the table;
        a failure drops this connection and a new one is tried later."""
        return defer.ensureDeferred(self._monitor(proto))

    async def _monitor(self, proto: JsonRpcProtocol) -> None:
        self._connection = proto
        self.synced = False
        proto.lost.addCallback(self._disconnected, proto)
        self.counters["connections"] += 1
        self._notify_owner(self.on_sync_start)
        try:
            method, result = await self._request_monitor(proto)
        except DftxError as e:
            log.warn("monitoring {table} on {endpoint} failed: {error}", table=TABLE,
                     endpoint=self.endpoint, error=e)
            raise
        self.method = method
        if method == "monitor_cond_since":
            found, self.last_txn_id, updates = result
            if found:
                self.counters["resumes"] += 1
                self._apply2(updates)
            else:
                self._reload(updates, update2=True)
        else:
            self._reload(result, update2=method == "monitor_cond")
        self.synced = True
        self.counters["syncs"] += 1
        log.info("{endpoint}: {n} interfaces ({method})", endpoint=self.endpoint,
                 n=len(self.rows), method=method)
        # After this connection's set-up is over: the owner may stop the
        # monitor from the hook.
        self.reactor.callLater(0, self._notify_owner, self.on_sync_end)

    async def _request_monitor(self, proto: JsonRpcProtocol) -> tuple[str, Any]:
        """Ask with the best method the server accepts; remember it."""
        for method in list(self._methods):
            if method == "monitor":
                params: list[Any] = [DATABASE, MONITOR_ID, {TABLE: {"columns": list(COLUMNS)}}]
            else:
                params = [DATABASE, MONITOR_ID, {TABLE: [{"columns": list(COLUMNS)}]}]
                if method == "monitor_cond_since":
                    params.append(self.last_txn_id)
            try:
                return method, await proto.request(method, params)
            except OvsdbError as e:
                if "unknown method" not in e.error or method == self._methods[-1]:
                    raise
                log.info("{endpoint} has no {method}", endpoint=self.endpoint, method=method)
                self._methods.remove(method)
        raise AssertionError("unreachable")

    def _disconnected(self, _: None, proto: JsonRpcProtocol) -> None:
        if self._current(proto):
            self.synced = False
            self._connection = None
            if self.running:
                log.info("lost {endpoint}; reconnecting", endpoint=self.endpoint)

    def _notified(self, proto: JsonRpcProtocol, method: str, params: Any) -> None:
        if not self._current(proto) or not isinstance(params, list) or not params:
            return
        try:
            if method == "update3" and len(params) == 3:
                self._apply2(params[2])
                self.last_txn_id = params[1]
            elif method == "update2" and len(params) == 2:
                self._apply2(params[1])
            elif method == "update" and len(params) == 2:
                self._apply1(params[1])
        except (ProtocolError, TypeError, ValueError, AttributeError, KeyError) as e:
            proto.transport.abortConnection()
            log.warn("bad {method} from {endpoint} ({error}): reconnecting", method=method,
                     endpoint=self.endpoint, error=e)

    # --- applying updates ---------------------------------------------------------------

    def _reload(self, updates: Any, update2: bool) -> None:
        """The whole table arrived: replace the cache, report differences."""
        self.counters["reloads"] += 1
        table = (updates or {}).get(TABLE, {})
        fresh: dict[str, Row] = {}
        for uuid, change in table.items():
            columns = change.get("initial", change.get("insert")) if update2 else change.get("new")
            if columns is not None:
                fresh[uuid] = _full_row(columns)
        for uuid in [u for u in self.rows if u not in fresh]:
            self._set(uuid, None)
        for uuid, row in fresh.items():
            self._set(uuid, row)

    def _apply2(self, updates: Any) -> None:
        for uuid, change in (updates or {}).get(TABLE, {}).items():
            if "delete" in change:
                self._set(uuid, None)
            elif "modify" in change:
                old = self.rows.get(uuid)
                if old is None:
                    raise ProtocolError(f"modify of unknown {TABLE} row {uuid}")
                self._set(uuid, _apply_diff(old, change["modify"]))
            else:
                columns = change.get("insert", change.get("initial"))
                if columns is not None:
                    self._set(uuid, _full_row(columns))

    def _apply1(self, updates: Any) -> None:
        for uuid, change in (updates or {}).get(TABLE, {}).items():
            new = change.get("new")
            self._set(uuid, None if new is None else _full_row(new))

    def _set(self, uuid: str, row: Row | None) -> None:
        old = self.ports.get(uuid)
        if row is None:
            self.rows.pop(uuid, None)
            self.ports.pop(uuid, None)
            new = None
        else:
            self.rows[uuid] = row
            new = self.ports[uuid] = port_state(uuid, row)
        event = transition(old, new)
        if event is not None:
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
