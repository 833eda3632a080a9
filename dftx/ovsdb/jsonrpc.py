"""
JSON-RPC 1.0 as OVSDB speaks it (RFC 7047, section 4): a stream of JSON
objects with nothing between them but optional whitespace.

L{JsonSplitter} cuts the stream into messages.  It looks at each byte a
bounded number of times in total, whatever the TCP chunking (a 50 MB reply
in 4 KB chunks is not rescanned per chunk): it keeps its scanning state
(nesting depth, inside a string or not, a pending backslash) between
chunks and hands each complete value to C{json.loads} once.  Inside a
large message it skips whole stretches in C: one regular expression
(possessive, so linear) finds the complete strings, which are removed,
and the brackets left are reduced to the lowest depth they reach.  Only
where that depth could be 0 (a message may end there) does it go string
by string, with C{bytes.find} and C{bytes.count}.

L{JsonRpcProtocol} sends requests (each L{request} Deferred fires with the
result, or fails with L{OvsdbError}), answers the server's C{echo} at once,
dispatches notifications by method, and probes an idle connection with its
own C{echo}: a connection that stays silent for another C{probe_interval}
after a probe is dropped.  Malformed JSON, a message that is not an
object, or one larger than C{max_message} bytes drops the connection with a
logged L{ProtocolError}.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dftx.errors import DBConnectionError, DftxError, OvsdbError, ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE", "DEFAULT_PROBE_INTERVAL", "JsonRpcProtocol", "JsonSplitter",
]

DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024
DEFAULT_PROBE_INTERVAL = 5.0

log = Logger()

_SPACE = re.compile(rb"[ \t\r\n]*")
# Complete strings and the bytes between them, up to the opening quote of an
# unfinished string or the end; and one complete string.  Possessive
# quantifiers: no backtracking, so a failed match costs one pass.
_COMPLETE = re.compile(rb'(?:[^"]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
# Brackets as "(" and ")", everything else deleted.
_BRACKETS = bytes.maketrans(b"{[}]", b"(())")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"{[}]")))
_PAIR_PASSES = 12  # nesting a bulk skip resolves; deeper is scanned string by string
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")


def _closing_quote(buf: bytearray, pos: int) -> int:
    """The index of the quote that ends the string whose unread body starts
    at C{pos}, or -1.  C{pos} is not inside an escape: the backslashes just
    before it, if any, are paired."""
    while True:
        quote = buf.find(b'"', pos)
        if quote < 0:
            return -1
        # Escaped when preceded by an odd run of backslashes.
        if (quote - _backslash_run_start(buf, quote, pos)) % 2 == 0:
            return quote
        pos = quote + 1


def _backslash_run_start(buf: bytearray, end: int, floor: int) -> int:
    """Where the run of backslashes that ends at C{end} begins, looking no
    further back than C{floor}."""
    start = end
    while start > floor and buf[start - 1] == 0x5C:
        start -= 1
    return start


def _unmatched(text: bytes) -> tuple[int, int]:
    """
    The brackets of C{text} (strings removed) that it does not itself close
    or open: (closes, opens); depth reaches its lowest, C{closes} below the
    start, before any of those C{opens}.  (len(text), 0), which means "may
    reach any depth", when the nesting is too deep to resolve in a few passes.
    """
    text = text.translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(_PAIR_PASSES):
        paired = text.replace(b"()", b"")
        if len(paired) == len(text):
            closes = text.count(b")")
            return closes, len(text) - closes
        text = paired
    return len(text) + 1, 0


class JsonSplitter:
    """
    Splits a byte stream of concatenated JSON objects.

    @param max_message: the largest message, in bytes; a longer one is a
        L{ProtocolError} as soon as that many bytes of it have arrived.

    @ivar bulk: inside a message, with at least this many bytes unscanned,
        skip the complete strings of the whole stretch with one regular
        expression and count its brackets, instead of going string by string.
    """

    bulk = 1024

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = 0  # where the value being scanned began
        self._depth = 0
        self._in_string = False
        #: the ProtocolError that broke the stream, once one did
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Any]:
        """
        Add bytes; @return: the messages (parsed JSON objects) they completed.

        @raise ProtocolError: for malformed JSON, a value that is not an
            object, or a message above C{max_message} bytes.  When messages
            before the bad part were completed by the same bytes, they are
            returned and the error is kept in L{error}; either way the
            splitter is then unusable (the stream cannot be resynchronised)
            and every later call raises it.
        """
        if self.error is not None:
            raise self.error
        messages: list[Any] = []
        try:
            self._scan(data, messages)
        except ProtocolError as e:
            self.error = e
            if not messages:
                raise
        return messages

    def _scan(self, data: bytes, messages: list[Any]) -> None:
        buf = self._buf
        buf += data
        pos, depth, in_string = self._pos, self._depth, self._in_string
        end = len(buf)
        exact_until = 0  # where a bulk skip saw that a message may end
        while pos < end:
            if in_string:
                quote = _closing_quote(buf, pos)
                if quote < 0:
                    # Resume after the paired backslashes of a trailing run,
                    # at its last one if that one is unpaired: scanning
                    # again from the run's start would make a long run fed
                    # in small chunks quadratic.
                    pos = end - (end - _backslash_run_start(buf, end, pos)) % 2
                    break
                pos = quote + 1
                in_string = False
                continue
            if depth == 0:
                pos = _SPACE.match(buf, pos).end()
                if pos >= end:
                    break
                if buf[pos] != 0x7B:  # "{"
                    raise ProtocolError(
                        f"expected a JSON object, got {bytes(buf[pos:pos + 40])!r}")
                self._start = pos
            elif end - pos >= self.bulk and pos >= exact_until:
                # The bulk of a large message: strings skipped and removed,
                # brackets counted, all in C, unless the depth could reach
                # 0 in the stretch (then it is scanned string by string).
                stop = _COMPLETE.match(buf, pos).end()
                closes, opens = _unmatched(_STRING.sub(b"", buf[pos:stop]))
                if closes < depth:
                    depth += opens - closes
                    pos = stop
                    if pos < end:  # at the opening quote of an unfinished string
                        pos += 1
                        in_string = True
                    continue
                exact_until = stop
            # Up to the next string: count brackets in C, unless the depth
            # could reach 0 in this stretch (a message may end there).
            quote = buf.find(b'"', pos)
            stop = end if quote < 0 else quote
            closes = buf.count(b"}", pos, stop) + buf.count(b"]", pos, stop)
            if closes < depth:
                depth += buf.count(b"{", pos, stop) + buf.count(b"[", pos, stop) - closes
                pos = stop
            else:
                while pos < stop:
                    c = buf[pos]
                    pos += 1
                    if c in _OPEN:
                        depth += 1
                    elif c in _CLOSE:
                        depth -= 1
                        if depth == 0:
                            messages.append(self._parse(bytes(buf[self._start:pos])))
                            break
                        if depth < 0:
                            raise ProtocolError("unbalanced brackets in JSON")
                if depth == 0:
                    continue
            if quote >= 0 and pos == quote:
                pos += 1
                in_string = True
        if depth == 0 and not in_string:
            # Drop what was consumed (whitespace included), keep the rest.
            del buf[:pos]
            pos = 0
            self._start = 0
        elif pos - self._start > self.max_message:
            raise ProtocolError(f"message larger than {self.max_message} bytes")
        elif self._start > 0 and self._start > len(buf) // 2:
            del buf[:self._start]
            pos -= self._start
            self._start = 0
        self._pos, self._depth, self._in_string = pos, depth, in_string

    def _parse(self, text: bytes) -> Any:
        if len(text) > self.max_message:
            raise ProtocolError(f"message larger than {self.max_message} bytes")
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"malformed JSON: {e}") from None


Notification = Callable[[str, Any], None]


class JsonRpcProtocol(protocol.Protocol):
    """
    One JSON-RPC connection.

    @ivar on_notification: called with (method, params) for each
        notification (a message with a method and a null id) other than
        C{echo}.
    @ivar peer: what the other end is, for errors and logs.
    @ivar lost: Deferred that fires, once the connection is gone, with the
        L{DftxError} that ended it: the L{ProtocolError} or unanswered probe
        (L{DBConnectionError}) for which this end dropped it, or a
        L{DBConnectionError} naming the reason it was lost.  It never fails.
    """

    def __init__(
        self,
        clock: IReactorTime,
        on_notification: Notification | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        probe_interval: float | None = DEFAULT_PROBE_INTERVAL,
    ) -> None:
        self.clock = clock
        self.on_notification = on_notification
        self.probe_interval = probe_interval
        self.peer = "ovsdb"
        self._splitter = JsonSplitter(max_message)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, defer.Deferred[Any]]] = {}
        self._probe: IDelayedCall | None = None
        self._probing = False
        self._closed = False
        self._dropped_for: DftxError | None = None
        self.lost: defer.Deferred[DftxError] = defer.Deferred()

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.peer = f"{host}:{port}" if host else str(getattr(peer, "name", peer))
        self._arm_probe()

    # --- sending --------------------------------------------------------------------

    def request(self, method: str, params: list[Any]) -> defer.Deferred[Any]:
        """
        Send a request.  @return: Deferred firing with its result; failing
        with L{OvsdbError} for an error reply, or L{DBConnectionError} when
        the connection is lost first.
        """
        if self._closed:
            return defer.fail(DBConnectionError(self.peer, "connection closed"))
        request_id = next(self._ids)
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending[request_id] = (method, d)
        self._send({"id": request_id, "method": method, "params": params})
        return d

    def _send(self, message: dict[str, Any]) -> None:
        self.transport.write(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    # --- receiving ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._arm_probe()
        try:
            messages = self._splitter.feed(data)
        except ProtocolError as e:
            self._drop(ProtocolError(e.reason, self.peer))
            return
        for message in messages:
            if self._closed:
                return
            self._dispatch(message)
        if self._splitter.error is not None and not self._closed:
            self._drop(ProtocolError(self._splitter.error.reason, self.peer))

    def _dispatch(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method is not None:
            params = message.get("params")
            request_id = message.get("id")
            if method == "echo":
                if request_id is not None:
                    self._send({"id": request_id, "result": params, "error": None})
                return
            if request_id is not None:
                self._send({"id": request_id, "result": None,
                            "error": f"unknown method {method!r}"})
                return
            if self.on_notification is not None:
                try:
                    self.on_notification(method, params)
                except Exception:
                    log.failure("handling {method} from {peer} failed", method=method,
                                peer=self.peer)
            return
        reply_id = message.get("id")
        # Our ids are ints; any other id (a list, say) matches nothing.
        pending = self._pending.pop(reply_id, None) if type(reply_id) is int else None
        if pending is None:
            log.debug("reply {id!r} from {peer} matches no request", id=reply_id,
                      peer=self.peer)
            return
        name, d = pending
        error = message.get("error")
        if error is not None:
            d.errback(OvsdbError(name, error, self.peer))
        else:
            d.callback(message.get("result"))

    # --- the inactivity probe -------------------------------------------------------

    def _arm_probe(self) -> None:
        self._probing = False
        if self.probe_interval is None or self._closed:
            return
        if self._probe is not None and self._probe.active():
            self._probe.reset(self.probe_interval)
        else:
            self._probe = self.clock.callLater(self.probe_interval, self._idle)

    def _idle(self) -> None:
        if self._probing:
            self._drop(DBConnectionError(
                self.peer, f"no answer to an echo probe for {self.probe_interval}s"))
            return
        self._probing = True
        self.request("echo", ["dftx-probe"]).addErrback(lambda f: None)
        self._probe = self.clock.callLater(self.probe_interval or 0, self._idle)

    # --- ending ---------------------------------------------------------------------

    def _drop(self, error: DftxError) -> None:
        log.warn("dropping the OVSDB connection: {error}", error=error)
        self._dropped_for = error
        self._fail_pending(error)
        self.transport.abortConnection()

    def _fail_pending(self, error: Exception) -> None:
        self._closed = True
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        pending, self._pending = self._pending, {}
        for _, d in pending.values():
            d.errback(error)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        error = DBConnectionError(self.peer, f"connection lost: {reason.getErrorMessage()}")
        self._fail_pending(error)
        if not self.lost.called:
            self.lost.callback(self._dropped_for or error)
