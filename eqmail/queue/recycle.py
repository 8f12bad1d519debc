"""Spare inodes: queue files are recycled by rename instead of unlinked and re-created.

Why: every message makes about five queue files (mess, intd/todo, info, local or remote)
that live for milliseconds.  Creating a file is the expensive part on ext4: the inode
allocator scans the block group's bitmap, and without a journal (a common VM and
cloud-image setup, and the benchmark machine's root filesystem) it also skips every
inode freed in the last 60-300 seconds (``recently_deleted()`` in fs/ext4/ialloc.c),
one buffer-cache lookup each.  At a thousand messages a second that scan took ~40 % of
the machine's CPU (perf, bench/PROFILE.md).  A rename touches two directory entries and
no bitmap, so it costs the same on every filesystem and nothing grows with the rate.

A pool is one directory per owner (the queue writer's and the scanner's files have
different owners and modes), on the queue's filesystem; files in it are nameless
garbage: a crash can leave any number of them, and nothing reads them.  ``take``
renames an (emptied) one to its new queue name, never over an existing name
(renameat2 RENAME_NOREPLACE, as O_EXCL did), and opens it; ``give`` renames a finished
queue file into the pool instead of unlinking it, unless someone still has it open.
Both fall back to a plain create or unlink when the pool is empty, full, or missing (a
queue made before pools existed).

Thread-safe enough for the queue writer's threads: ``deque.append``/``pop`` are atomic,
a name is used by exactly one taker, and the count of files being emptied has a lock.
Files given back with data are emptied before they become takeable: by a thread of the
pool, or by the owner calling :meth:`InodePool.empty_given` (the queue writer).

Durability: a give and a later take of the same inode are not ordered on disk by any
barrier of their own.  On a journalling filesystem (ext4's default, xfs) metadata
operations reach the disk in order, so a power failure cannot bring back an old name
on a reused inode; on ext4 without a journal, as after any power failure there, run
fsck before starting (listed in docs/compatibility.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import itertools
import os
import queue
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

POOL_LIMIT = 4096  # spare files kept; beyond that a finished file is unlinked
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)  # Linux; not in every Python's fcntl


class InodePool:
    def __init__(self, directory: Path, limit: int = POOL_LIMIT, background: bool = True) -> None:
        self.directory = directory
        self.limit = limit
        # background: a thread of the pool empties given files; else the owner calls
        # empty_given() from a thread of its own (the queue writer's cleaner)
        self.background = background
        self._free: deque[tuple[str, int]] = deque()  # (name in the pool, inode number): empty files
        self._seq = itertools.count(1)
        self._to_empty: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._emptying = 0  # given files not emptied yet
        self._count_lock = threading.Lock()
        self._emptier: threading.Thread | None = None
        try:
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self._dir_fd = -1  # no pool directory: create and unlink as before
            return
        # Someone opening a file while we hold its lease makes the kernel send us SIGIO,
        # whose default action kills (the workers ignore it from the start: spawn.py).
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGIO) == signal.SIG_DFL:
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        # Leftovers of an earlier run are spare files like any other: adopt them.
        for name in os.listdir(self._dir_fd):
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if len(self._free) < limit and _plain_file(st):
                self._free.append((name, st.st_ino))
            else:
                _unlink_at(name, self._dir_fd)

    @property
    def enabled(self) -> bool:
        return self._dir_fd >= 0

    def __len__(self) -> int:
        return len(self._free)

    def take(self, name_for: Callable[[int], os.PathLike[str] | str]) -> tuple[int, int] | None:
        """A spare file renamed to ``name_for(inode)`` and opened for writing, empty;
        returns (fd, inode), or None when the pool is empty (the caller creates a file).

        ``name_for`` maps the inode number to the queue path, because a mess file's name
        is its own inode number."""
        while self._dir_fd >= 0:
            try:
                spare, ino = self._free.pop()
            except IndexError:
                break
            path = name_for(ino)
            try:
                _rename_noreplace(self._dir_fd, spare, path)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and not _exists_at(spare, self._dir_fd):
                    continue  # removed behind our back: try the next one
                # the target exists (a name that does not match its inode, as in a
                # copied queue) or its directory is missing: the caller reports it
                self._free.append((spare, ino))
                raise
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                _unlink(path)  # e.g. EMFILE: leave no named orphan behind
                raise
            try:
                st = os.fstat(fd)
                if st.st_ino != ino:  # cannot happen unless someone renamed files
                    raise OSError(f"spare file {spare} changed identity")
                # not O_TRUNC: truncating is a full setattr even for an empty file, and
                # spares are emptied before they can be taken (adopted ones may not be)
                if st.st_size:
                    os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                _unlink(path)
                raise
            return fd, ino
        return None

    def give(self, path: os.PathLike[str] | str) -> bool:
        """Retire a queue file: into the pool if nobody has it open and there is room,
        else unlinked.  Returns False when ``path`` did not exist.

        "Nobody has it open" is what makes recycling safe: an unlinked file stays
        whole for a process that still reads it (a delivery started by a scanner that
        was killed meanwhile, ``eqmailctl queue``), a recycled one would be emptied
        and rewritten under it.  A write lease (F_SETLEASE) is granted only when no
        other descriptor of the file is open anywhere, and held across the rename;
        after it the file is reachable only through this owner's pool directory.

        A file with data is emptied before it can be taken again: by the pool's own
        thread, or by the owner's (``background=False``).  Truncating waits for any
        write-back of its pages in flight, and the caller should not."""
        if self._dir_fd < 0 or len(self._free) + self._emptying >= self.limit:
            return _unlink(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return _unlink(path)  # not a file we can vouch for (a symlink, no access)
        try:
            st = os.fstat(fd)
            if not _plain_file(st):
                return _unlink(path)
            try:
                fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
            except OSError:
                return _unlink(path)  # open elsewhere (or leases unavailable): let it be
            spare = f"s{next(self._seq)}.{st.st_ino}"
            try:
                os.rename(path, spare, dst_dir_fd=self._dir_fd)
            except FileNotFoundError:
                return False
            finally:
                fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(fd)
        if st.st_size == 0:
            self._free.append((spare, st.st_ino))
        else:
            with self._count_lock:
                self._emptying += 1
            self._to_empty.put((spare, st.st_ino))
            if self.background and self._emptier is None:
                self._emptier = threading.Thread(target=self._empty_forever, name="spare-emptier",
                                                 daemon=True)
                self._emptier.start()
        return True

    def _empty_forever(self) -> None:
        while True:
            self._empty_one(*self._to_empty.get())

    def empty_given(self) -> None:
        """Empty every file given so far (``background=False`` pools)."""
        while True:
            try:
                spare, ino = self._to_empty.get_nowait()
            except queue.Empty:
                return
            self._empty_one(spare, ino)

    def _empty_one(self, spare: str, ino: int) -> None:
        try:
            fd = os.open(spare, os.O_WRONLY, dir_fd=self._dir_fd)
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
        except OSError:
            _unlink_at(spare, self._dir_fd)  # an odd spare is not worth keeping
        else:
            self._free.append((spare, ino))
        finally:
            with self._count_lock:
                self._emptying -= 1

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every given file is emptied and takeable (tests)."""
        deadline = time.monotonic() + timeout
        if not self.background:
            self.empty_given()
        while self._emptying and time.monotonic() < deadline:
            time.sleep(0.005)


def _plain_file(st: os.stat_result) -> bool:
    """Only a regular file with no other name may become spare (a todo file still linked
    as intd/ must not)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def _unlink(path: os.PathLike[str] | str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _unlink_at(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RENAME_NOREPLACE = 1


def _rename_noreplace(src_dir_fd: int, src: str, dst: os.PathLike[str] | str) -> None:
    """rename(2) that fails with EEXIST instead of replacing ``dst`` (renameat2)."""
    if _libc.renameat2(src_dir_fd, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(dst))


AT_FDCWD = -100


def _exists_at(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True
