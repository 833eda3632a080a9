"""
Wire encoding of a L{DbUpdate}: a msgpack map.

The map holds C{table, key, action, value, topic} (what Dragonflow sends and
reads, so either side interoperates with it), plus C{publisher} (id),
C{seq} (per publisher and topic, from 1) and C{sent} (the publisher's send
time, seconds since the epoch, a float) when the sender stamps them; peers
that do not know these keys ignore them, and L{decode} ignores keys it does
not know.  A C{sent} that is not a number is ignored (it only feeds the
delivery lag metric), never a reason to drop the message.

A row update has a table and a row action (L{ROW_ACTIONS}); a control event
has table None and a control action (L{CONTROL_ACTIONS}).  L{decode} refuses
any other action and any mix of the two: a row action without a table must
not reach a subscriber's owner as a control event.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dftx.errors import ProtocolError
from dftx.update import CONTROL_ACTIONS, ROW_ACTIONS, DbUpdate

__all__ = ["decode", "encode"]

_REQUIRED = ("table", "key", "action", "value", "topic")
_packer = msgpack.Packer(use_bin_type=True)
_unpackb = msgpack.unpackb


def encode(
    update: DbUpdate,
    publisher: str | None = None,
    seq: int | None = None,
    topic: str | None = None,
    sent: float | None = None,
) -> bytes:
    """
    @param publisher: the sender's id, stamped instead of C{update.publisher}.
    @param seq: the sequence number, stamped instead of C{update.seq}.
    @param topic: the topic it is sent on, instead of C{update.topic}.
    @param sent: the send time, stamped instead of C{update.sent}.
    @return: the msgpack bytes.
    @raise ProtocolError: when a field cannot be encoded (a value that is
        not text, bytes or None, say).
    """
    message = update.to_dict()
    if topic is not None:
        message["topic"] = topic
    publisher = update.publisher if publisher is None else publisher
    seq = update.seq if seq is None else seq
    if publisher is not None:
        message["publisher"] = publisher
    if seq is not None:
        message["seq"] = seq
    sent = update.sent if sent is None else sent
    if sent is not None:
        message["sent"] = sent
    try:
        return _packer.pack(message)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {update!r}: {e}") from e


def decode(data: bytes, peer: str | None = None) -> DbUpdate:
    """
    @param peer: where the message came from, for the error.
    @return: the L{DbUpdate}, with C{publisher}, C{seq} and C{sent} when
        present.
    @raise ProtocolError: for anything that is not such a map (an unknown
        action, a row action without a table or a control action with
        one); never any other exception.
    """
    try:
        message = _unpackb(data, raw=False)
    except Exception as e:  # msgpack raises many types; all mean "undecodable"
        raise ProtocolError(f"undecodable message ({type(e).__name__}: {e})", peer) from e
    if type(message) is dict and "topic" in message:
        # The common case, checked inline (a subscriber decodes every message).
        get = message.get
        table, key, action, value = get("table"), get("key"), get("action"), get("value")
        topic, publisher, seq = message["topic"], get("publisher"), get("seq")
        if (type(action) is str
                and (action in ROW_ACTIONS if type(table) is str else
                     table is None and action in CONTROL_ACTIONS)
                and (key is None or type(key) is str)
                and (value is None or type(value) is str)
                and (topic is None or type(topic) is str)
                and (publisher is None or type(publisher) is str)
                and (seq is None or (type(seq) is int and seq >= 0))
                and "table" in message and "key" in message and "value" in message):
            return DbUpdate(table, key, action, value, topic, publisher=publisher, seq=seq,
                            sent=_sent(get("sent")))
    return _checked(message, peer)


def _sent(value: Any) -> float | None:
    """A send time as a float; None for anything else (a bool is not one)."""
    return float(value) if type(value) in (float, int) else None


def _checked(message: Any, peer: str | None) -> DbUpdate:
    """Decode with every check, naming what is wrong."""
    if not isinstance(message, dict):
        raise ProtocolError(f"message is a {type(message).__name__}, not a map", peer)
    missing = [k for k in _REQUIRED if k not in message]
    if missing:
        raise ProtocolError(f"message lacks {', '.join(missing)}", peer)
    table = _text(message, "table", peer)
    action = _text(message, "action", peer)
    if action is None:
        raise ProtocolError("message has no action", peer)
    seq = message.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise ProtocolError(f"bad seq {seq!r}", peer)
    update = DbUpdate(
        table,
        _text(message, "key", peer),
        action,
        _text(message, "value", peer),
        _text(message, "topic", peer),
        publisher=_text(message, "publisher", peer),
        seq=seq,
        sent=_sent(message.get("sent")),
    )
    if table is None and action not in CONTROL_ACTIONS:
        what = "a row action" if action in ROW_ACTIONS else "an unknown action"
        raise ProtocolError(f"control event (table None) with {what} {action!r}", peer)
    if table is not None and action not in ROW_ACTIONS:
        what = "a control action" if action in CONTROL_ACTIONS else "an unknown action"
        raise ProtocolError(f"row update of {table!r} with {what} {action!r}", peer)
    return update


def _text(message: dict[Any, Any], field: str, peer: str | None) -> str | None:
    value = message.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{field} is not utf-8", peer) from e
    raise ProtocolError(f"{field} is a {type(value).__name__}, not text", peer)
