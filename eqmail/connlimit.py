"""Concurrent SMTP sessions per client address, counted across every listener process.

Owns: the table behind ``control/concurrencyperclient`` (Postfix's
smtpd_client_connection_count_limit, which Postfix keeps in its ``anvil`` server).  A
client "address" is the IPv4 address, or the IPv6 /64 (one host usually has a whole
/64): :func:`client_key`.  A listener asks :meth:`ClientTable.admit` after accepting a
connection and before greeting it, and calls :meth:`ClientTable.release` when the
session ends.

Sharing: the supervisor creates the table (:meth:`ClientTable.create`) before it forks
any listener: an anonymous ``memfd`` mapped MAP_SHARED, inherited by every listener
process of every listen line and every generation, so the count is one count however
many processes serve the addresses (``processes=N``, several listeners per service, a
reload running two generations side by side).  A POSIX record lock (``lockf``) on the
memfd serialises the few microseconds of each update; the kernel drops such a lock
when its holder dies, so a kill -9 cannot wedge the other listeners.

Crash argument: every entry is ``(key, owner pid, count)``; a process only changes its
own entries.  A listener that ends normally has released all of them (each session
releases in a ``finally``).  A listener that dies otherwise (kill -9, a crash) leaves
its entries behind; the supervisor, which reaps every worker, then calls
:meth:`ClientTable.purge` with the dead pid, which rebuilds the table from the entries
of the other pids.  The rebuild also repairs a table torn by a process killed in the
middle of an update (an entry half moved by a deletion appears twice; rebuilding keeps
one entry per (key, pid)).  So a count can never stay too high for longer than it
takes the supervisor to reap the dead process.

Bounds: the table has a fixed number of entries (sized by the supervisor from the
listen lines' concurrency); when it is three-quarters full new clients are admitted
without being counted (:attr:`Verdict.UNTRACKED`) — the per-listener ``concurrency``
still bounds them — rather than refused.  Hashing is keyed with a random secret, so a
client cannot pick addresses that collide into one long probe chain.

Privilege: none (the memfd is already open when the listener drops privileges).
Failure modes: none raise after construction; :meth:`admit` answers a verdict.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
from collections.abc import Iterator

_ENTRY = struct.Struct("=16sII")  # key, pid (0 = empty), count
_HEADER = struct.Struct("=8sII16s")  # magic, capacity, used, hash secret
_MAGIC = b"eqconn1\0"
MIN_CAPACITY = 1024
MAX_CAPACITY = 1 << 18


class Verdict(enum.Enum):
    ADMITTED = "admitted"    # counted: call release() when the session ends
    OVER = "over"            # the address is at its limit: refuse the connection
    UNTRACKED = "untracked"  # table full (or no limit): admitted, nothing to release


def client_key(ip: str) -> bytes:
    """16 bytes naming the client: an IPv4 address (also IPv4-mapped IPv6) whole, an
    IPv6 address by its /64 prefix."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        else:
            return addr.packed[:8] + bytes(8)
    return bytes(10) + b"\xff\xff" + addr.packed


def capacity_for(concurrency_total: int) -> int:
    """Entries for ``concurrency_total`` sessions (every listen line's concurrency)."""
    want = max(MIN_CAPACITY, 2 * concurrency_total)
    cap = MIN_CAPACITY
    while cap < want and cap < MAX_CAPACITY:
        cap *= 2
    return cap


class ClientTable:
    """The shared table; see the module docstring."""

    def __init__(self, fd: int, mem: mmap.mmap) -> None:
        self.fd = fd
        self.mem = mem
        magic, capacity, _used, secret = _HEADER.unpack_from(mem, 0)
        self.capacity: int = int(capacity)
        self._secret: bytes = bytes(secret)
        if magic != _MAGIC:
            raise ValueError("not a client table")

    @classmethod
    def create(cls, capacity: int) -> ClientTable:
        """A new, empty table (in the supervisor, before forking listeners)."""
        fd = os.memfd_create("eqmail-clients", os.MFD_CLOEXEC)
        size = _HEADER.size + capacity * _ENTRY.size
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        _HEADER.pack_into(mem, 0, _MAGIC, capacity, 0, os.urandom(16))
        return cls(fd, mem)

    # ---- the operations, each under the lock -----------------------------------------

    def admit(self, key: bytes, limit: int, pid: int) -> Verdict:
        """Count one more session of ``key`` for ``pid`` unless ``key`` already has
        ``limit`` sessions (summed over every process).  ``limit`` 0: no limit."""
        if limit <= 0:
            return Verdict.UNTRACKED
        with _Locked(self.fd):
            total, own, empty = 0, -1, -1
            for slot in self._probe(key):
                k, p, n = _ENTRY.unpack_from(self.mem, self._off(slot))
                if p == 0:
                    empty = slot
                    break
                if k == key:
                    total += n
                    if p == pid:
                        own = slot
            if total >= limit:
                return Verdict.OVER
            if own >= 0:
                _k, _p, n = _ENTRY.unpack_from(self.mem, self._off(own))
                _ENTRY.pack_into(self.mem, self._off(own), key, pid, n + 1)
                return Verdict.ADMITTED
            used = self._used()
            if empty < 0 or (used + 1) * 4 > self.capacity * 3:
                return Verdict.UNTRACKED
            _ENTRY.pack_into(self.mem, self._off(empty), key, pid, 1)
            self._set_used(used + 1)
            return Verdict.ADMITTED

    def release(self, key: bytes, pid: int) -> None:
        """One session of ``key`` admitted for ``pid`` ended."""
        with _Locked(self.fd):
            for slot in self._probe(key):
                k, p, n = _ENTRY.unpack_from(self.mem, self._off(slot))
                if p == 0:
                    return  # not counted (purged meanwhile): nothing to do
                if k == key and p == pid:
                    if n > 1:
                        _ENTRY.pack_into(self.mem, self._off(slot), key, pid, n - 1)
                    else:
                        self._delete(slot)
                    return

    def count(self, key: bytes) -> int:
        """Sessions of ``key`` over every process (for tests and status)."""
        with _Locked(self.fd):
            total = 0
            for slot in self._probe(key):
                k, p, n = _ENTRY.unpack_from(self.mem, self._off(slot))
                if p == 0:
                    break
                if k == key:
                    total += n
            return total

    def purge(self, dead_pid: int) -> int:
        """Forget every entry of ``dead_pid`` (a reaped listener) and rebuild the table;
        returns how many sessions were forgotten."""
        with _Locked(self.fd):
            keep: dict[tuple[bytes, int], int] = {}
            dropped = 0
            for slot in range(self.capacity):
                k, p, n = _ENTRY.unpack_from(self.mem, self._off(slot))
                if p == 0:
                    continue
                if p == dead_pid:
                    dropped += n
                elif n > 0:
                    keep[(k, p)] = n  # a duplicate left by a torn move is the same entry
            self.mem[_HEADER.size:] = bytes(self.capacity * _ENTRY.size)
            for (k, p), n in keep.items():
                slot = next(s for s in self._probe(k)
                            if _ENTRY.unpack_from(self.mem, self._off(s))[1] == 0)
                _ENTRY.pack_into(self.mem, self._off(slot), k, p, n)
            self._set_used(len(keep))
            return dropped

    # ---- open addressing (linear probing, deletion by backward shift) -----------------

    def _home(self, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "little") % self.capacity

    def _probe(self, key: bytes) -> Iterator[int]:
        home, cap = self._home(key), self.capacity
        for i in range(cap):
            yield (home + i) % cap

    def _off(self, slot: int) -> int:
        return _HEADER.size + slot * _ENTRY.size

    def _used(self) -> int:
        return int(struct.unpack_from("=I", self.mem, 12)[0])

    def _set_used(self, used: int) -> None:
        struct.pack_into("=I", self.mem, 12, used)

    def _delete(self, hole: int) -> None:
        cap = self.capacity
        j = hole
        while True:
            j = (j + 1) % cap
            k, p, n = _ENTRY.unpack_from(self.mem, self._off(j))
            if p == 0:
                break
            home = self._home(k)
            # the entry at j may move back into the hole unless its home lies
            # cyclically in (hole, j]
            if (hole < home <= j) if hole <= j else (home > hole or home <= j):
                continue
            _ENTRY.pack_into(self.mem, self._off(hole), k, p, n)
            hole = j
        _ENTRY.pack_into(self.mem, self._off(hole), bytes(16), 0, 0)
        self._set_used(self._used() - 1)


class _Locked:
    """``lockf`` on the table's memfd for the duration of a ``with``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
