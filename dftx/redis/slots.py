"""
Hash slots of Redis Cluster keys.

A key's slot is CRC16 (the XMODEM variant: polynomial 0x1021, initial value
0) of the key, or of its hash tag, modulo 16384.  The hash tag is the part
between the first C{{} and the first C{}} after it, when that part is not
empty; keys with the same tag share a slot, which is what lets dftx keep one
tenant's rows of a table together (C{{table.topic}key}).
"""

from __future__ import annotations

import binascii

__all__ = ["SLOTS", "crc16", "hash_tag", "key_slot"]

SLOTS = 16384


def crc16(data: bytes) -> int:
    """CRC16-XMODEM of C{data} (C{crc16(b"123456789") == 0x31C3})."""
    # binascii.crc_hqx is CRC-CCITT with the given initial value: with 0
    # it is exactly the XMODEM variant the cluster specification uses.
    return binascii.crc_hqx(data, 0)


def hash_tag(key: bytes) -> bytes:
    """The part of C{key} that is hashed: its hash tag, or all of it."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key: bytes | str) -> int:
    """The slot of C{key} (text is encoded as UTF-8, as on the wire)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return binascii.crc_hqx(hash_tag(key), 0) % SLOTS
