"""tcpto: remember remote addresses that keep timing out, and skip them for a while.

Owns: ``queue/lock/tcpto`` (qmail-core §4.2, eQmail's IPv6 variant §8).  Used by the
remote delivery worker (uid eqmailr, which owns the file) and by ``eqmailctl queue
flush`` (root) through :func:`clear`.

Record format (eqmail's own, fixed size; eQmail stored native C structs): the file is
``RECORDS`` records of ``RECORD.size`` = 32 bytes, ``SIZE`` = 2048 bytes in all::

    byte 0      address family: 0 = empty slot, 4 = IPv4, 6 = IPv6
    byte 1      failure count, capped at 10
    bytes 2-7   zero
    bytes 8-15  time of the last counted failure, seconds since the epoch, little-endian
    bytes 16-31 the address: IPv6 in 16 bytes, IPv4 in bytes 16-19 and zeros after

A shorter file (qmail's 1024-byte one from an older setup) reads as empty slots and is
extended on the first write.

Rules (qmail's tcpto.c): an address is skipped when its count is >= 2 and its last
failure was less than ``(60 + (pid & 31)) << 6`` seconds ago (64-99 minutes, spread by
pid so that not every process retries at once).  A failure within 120 s of the last
counted one is not counted (one outage seen by many parallel deliveries counts once);
a successful connect resets the count; when the table is full the slot with the
smallest ``when + count * 1024`` is reused.  Timeouts and refused connections are
failures (eQmail counts "refused" too); other errors are not recorded.

Failures: the file is advisory.  Any OSError reading or writing it is swallowed (the
address is then simply tried), so a missing or unwritable file never blocks delivery.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import threading
import time
from pathlib import Path

RECORD = struct.Struct("<BB6xq16s")
RECORDS = 64
SIZE = RECORD.size * RECORDS
MAX_COUNT = 10
NOT_COUNTED_WITHIN = 120


def _key(ip: str) -> tuple[int, bytes]:
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:  # one host, one record
        addr = addr.ipv4_mapped
    return (4, addr.packed + bytes(12)) if addr.version == 4 else (6, addr.packed)


def backoff_seconds(pid: int) -> int:
    return (60 + (pid & 31)) << 6


def _decode(data: bytes) -> list[tuple[int, int, int, bytes]]:
    data = data[:SIZE].ljust(SIZE, b"\0")
    return [RECORD.unpack_from(data, i * RECORD.size) for i in range(RECORDS)]


def should_skip(records: list[tuple[int, int, int, bytes]], ip: str, now: float, pid: int) -> bool:
    """Pure rule: is ``ip`` in back-off?"""
    fam, packed = _key(ip)
    for family, count, when, addr in records:
        if family == fam and addr == packed:
            return count >= 2 and now - when < backoff_seconds(pid)
    return False


def updated(records: list[tuple[int, int, int, bytes]], ip: str, failed: bool,
            now: float) -> list[tuple[int, int, int, bytes]] | None:
    """Pure rule: the table after one connect result, or None when nothing changes."""
    fam, packed = _key(ip)
    out = list(records)
    for i, (family, count, when, addr) in enumerate(out):
        if family == fam and addr == packed:
            if not failed:
                return None if count == 0 else _with(out, i, (family, 0, when, addr))
            if now - when < NOT_COUNTED_WITHIN:
                return None
            return _with(out, i, (family, min(count + 1, MAX_COUNT), int(now), addr))
    if not failed:
        return None
    free = [i for i, r in enumerate(out) if r[0] == 0]
    slot = free[0] if free else min(range(RECORDS), key=lambda i: out[i][2] + out[i][1] * 1024)
    return _with(out, slot, (fam, 1, int(now), packed))


def _with(records: list[tuple[int, int, int, bytes]], i: int,
          rec: tuple[int, int, int, bytes]) -> list[tuple[int, int, int, bytes]]:
    records[i] = rec
    return records


class Tcpto:
    """The tcpto table of one queue; safe to share between threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def _read(self) -> list[tuple[int, int, int, bytes]]:
        try:
            with open(self.path, "rb") as f:
                return _decode(f.read(SIZE))
        except OSError:
            return _decode(b"")

    def blocked(self, ip: str) -> bool:
        return should_skip(self._read(), ip, time.time(), self.pid)

    def record(self, ip: str, failed: bool) -> None:
        """Record a connect result; the read-modify-write is under an exclusive lock."""
        with self.lock:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                new = updated(_decode(os.pread(fd, SIZE, 0)), ip, failed, time.time())
                if new is not None:
                    os.pwrite(fd, b"".join(RECORD.pack(*r) for r in new), 0)
            except OSError:
                pass
            finally:
                os.close(fd)

    def entries(self) -> list[tuple[str, int, int]]:
        """(ip, count, when) of every used slot: what qmail-tcpto prints."""
        out = []
        for family, count, when, addr in self._read():
            if family == 4:
                out.append((str(ipaddress.IPv4Address(addr[:4])), count, when))
            elif family == 6:
                out.append((str(ipaddress.IPv6Address(addr)), count, when))
        return out


def clear(path: Path, create: bool = False) -> None:
    """Zero the table (qmail-tcpok; qmail-rspawn's tcpto_clean at start).

    ``create`` only for the worker that owns the file: root (``eqmailctl queue flush``)
    must not create it, or eqmailr could not write it afterwards."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.pwrite(fd, bytes(SIZE), 0)
        os.ftruncate(fd, SIZE)
    except OSError:
        pass
    finally:
        os.close(fd)
