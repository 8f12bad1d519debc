"""Reading djb's cdb files (read only), for taking over a qmail installation.

qmail keeps users/cdb (qmail-newu) and control/morercpthosts.cdb (qmail-newmrh) in
this format: a 2048-byte header of 256 (position, length) pairs of little-endian u32,
the records (key length, data length, key, data), then 256 hash tables of (hash,
position) slots.  Pure functions on bytes; ValueError for a damaged file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator


def cdb_hash(key: bytes) -> int:
    """djb's cdb hash: h = 5381; h = ((h << 5) + h) ^ c, in 32 bits."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ c
    return h


def cdb_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a cdb in the order they were added: the records run from
    byte 2048 to the first hash table (the 2048-byte header holds 256 (pos, len) pairs
    of little-endian u32 pointing at the tables, which follow the records)."""
    if len(data) < 2048:
        raise ValueError("truncated cdb header")
    end = min(struct.unpack_from("<256I", data, 0)[0::2])
    pos = 2048
    while pos < end:
        if pos + 8 > len(data):
            raise ValueError("truncated cdb record")
        klen, dlen = struct.unpack_from("<II", data, pos)
        if pos + 8 + klen + dlen > end:
            raise ValueError("cdb record runs into the hash tables")
        yield data[pos + 8: pos + 8 + klen], data[pos + 8 + klen: pos + 8 + klen + dlen]
        pos += 8 + klen + dlen


def cdb_get(data: bytes, key: bytes) -> bytes | None:
    """The first value stored under ``key`` (cdb_find): table h % 256, slot (h >> 8) % len."""
    h = cdb_hash(key)
    tpos, tlen = struct.unpack_from("<II", data, (h & 255) * 8)
    if tlen == 0:
        return None
    slot = (h >> 8) % tlen
    for _ in range(tlen):
        hh, rpos = struct.unpack_from("<II", data, tpos + slot * 8)
        if rpos == 0:
            return None
        if hh == h:
            klen, dlen = struct.unpack_from("<II", data, rpos)
            if data[rpos + 8: rpos + 8 + klen] == key:
                return data[rpos + 8 + klen: rpos + 8 + klen + dlen]
        slot = (slot + 1) % tlen
    return None
