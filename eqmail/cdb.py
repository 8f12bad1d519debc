"""Reading djb's cdb files (read only), for taking over a qmail installation.

qmail keeps users/cdb (qmail-newu) and control/morercpthosts.cdb (qmail-newmrh) in
this format: a 2048-byte header of 256 (position, length) pairs of little-endian u32,
the records (key length, data length, key, data), then 256 hash tables of (hash,
position) slots.  Pure functions on bytes.  Every position and length read from the
file is checked against its size before it is used: a truncated or damaged cdb raises
CdbError (a ValueError) -- never a silently shortened value, never struct.error.
Callers name the file in the message they show.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

HEADER = 2048


class CdbError(ValueError):
    """The cdb is truncated or damaged."""


def cdb_hash(key: bytes) -> int:
    """djb's cdb hash: h = 5381; h = ((h << 5) + h) ^ c, in 32 bits."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ c
    return h


def _tables(data: bytes) -> list[tuple[int, int]]:
    """The 256 (position, slot count) pairs of the header, each checked to lie within
    the file (a cdb cut short anywhere in its hash tables is refused here)."""
    if len(data) < HEADER:
        raise CdbError(f"truncated cdb header ({len(data)} of {HEADER} bytes)")
    words = struct.unpack_from("<512I", data, 0)
    pairs = list(zip(words[0::2], words[1::2], strict=True))
    for i, (pos, slots) in enumerate(pairs):
        if pos < HEADER or pos + 8 * slots > len(data):
            raise CdbError(f"truncated cdb: hash table {i} at {pos} ({slots} slots) "
                           f"lies outside the file's {len(data)} bytes")
    return pairs


def _record(data: bytes, pos: int, end: int) -> tuple[bytes, bytes, int]:
    """The record at ``pos`` (key, value, next position), checked to end by ``end``."""
    if pos + 8 > end:
        raise CdbError(f"truncated cdb record at {pos}")
    klen, dlen = struct.unpack_from("<II", data, pos)
    nxt = pos + 8 + klen + dlen
    if nxt > end:
        raise CdbError(f"cdb record at {pos} ({klen}+{dlen} bytes) runs past byte {end}")
    return data[pos + 8: pos + 8 + klen], data[pos + 8 + klen: nxt], nxt


def cdb_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a cdb in the order they were added: the records run from
    byte 2048 to the first hash table, which follow the records."""
    end = min(pos for pos, _ in _tables(data))
    pos = HEADER
    while pos < end:
        key, value, pos = _record(data, pos, end)
        yield key, value


def cdb_get(data: bytes, key: bytes) -> bytes | None:
    """The first value stored under ``key`` (cdb_find): table h % 256, slot (h >> 8) % len."""
    h = cdb_hash(key)
    tpos, tlen = _tables(data)[h & 255]
    if tlen == 0:
        return None
    slot = (h >> 8) % tlen
    for _ in range(tlen):
        hh, rpos = struct.unpack_from("<II", data, tpos + slot * 8)
        if rpos == 0:
            return None
        if hh == h:
            if rpos < HEADER:
                raise CdbError(f"cdb slot points into the header ({rpos})")
            k, value, _ = _record(data, rpos, len(data))
            if k == key:
                return value
        slot = (slot + 1) % tlen
    return None
