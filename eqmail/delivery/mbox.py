"""Delivery of one message to an mbox file (qmail-local's mailfile, mbox(5)).

What it owns: open for append (created 0600), take an exclusive lock -- a POSIX record
lock (fcntl/lockf, the lock mutt, dovecot and procmail honour, and one that works over
NFS) -- giving up after 30 s; append the UFLINE (``From sender date``), RPLINE and DTLINE,
then the message with ``>`` added before every line matching ``^>*From ``, a newline if
the last line lacks one and one empty line; fsync.  If anything fails after the lock was
taken the file is truncated back to its old length, so a half message never corrupts the
mailbox.

Privilege: runs as the recipient.

Inputs: the path to open (already joined to the home directory), the name to show in
errors (the path as written in .qmail), the three header lines as bytes, the message as a
binary file at offset 0.

Failures: :class:`MboxError`, always temporary: ``Unable to open <fn>: <error>.
(#4.2.1)``, ``File has been locked for 30 seconds straight. (#4.3.0)``, ``Unable to write
<fn>: <error>. (#4.3.0)``, ``Unable to read message: <error>. (#4.3.0)``.  If the lock
call itself fails (no lock daemon, say) delivery goes on unlocked, as qmail does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from typing import BinaryIO

CHUNK = 65536
LOCK_TIMEOUT = 30.0
LOCKED_TEXT = "File has been locked for 30 seconds straight. (#4.3.0)"

_FROM = b"From "


class MboxError(Exception):
    """An mbox delivery failed; always a temporary failure."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class FromQuoter:
    """Streaming ``>From `` quoting with bounded memory.

    At the start of each line the bytes ``>``* and a prefix of ``From `` are held back
    (the ``>`` run only as a count) until it is clear whether the line matches
    ``^>*From ``; then they are released, with one more ``>`` if it did.
    """

    def __init__(self) -> None:
        self._at_start = True
        self._gts = 0  # '>' characters held at the start of the current line
        self._matched = 0  # bytes of b"From " matched after them

    def _release(self, quote: bool) -> Iterator[bytes]:
        count = self._gts + (1 if quote else 0)
        while count > 0:
            piece = min(count, CHUNK)
            yield b">" * piece
            count -= piece
        if self._matched:
            yield _FROM[: self._matched]
        self._gts = self._matched = 0
        self._at_start = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        pos = 0
        size = len(data)
        while pos < size:
            if not self._at_start:
                end = data.find(b"\n", pos)
                stop = size if end < 0 else end + 1
                yield data[pos:stop]
                self._at_start = end >= 0
                pos = stop
                continue
            if self._matched == 0:
                run_end = pos
                while run_end < size and data[run_end] == 0x3E:  # '>'
                    run_end += 1
                self._gts += run_end - pos
                pos = run_end
                if pos == size:
                    return
            want = _FROM[self._matched:]
            got = data[pos:pos + len(want)]
            if want.startswith(got):
                self._matched += len(got)
                pos += len(got)
                if self._matched == len(_FROM):
                    yield from self._release(quote=True)
            else:
                yield from self._release(quote=False)

    def finish(self) -> Iterator[bytes]:
        """Release anything held at end of input (a last line too short to decide)."""
        if self._at_start and (self._gts or self._matched):
            yield from self._release(quote=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _lock(fd: int, timeout: float) -> bool:
    """Exclusive lock within ``timeout`` seconds; False if locking is not possible."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MboxError(LOCKED_TEXT)
        # Poll rather than alarm(): signals belong to the calling process, not to us.
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.5)


class _ReadError(Exception):
    pass


def _message_chunks(message: BinaryIO) -> Iterator[bytes]:
    while True:
        try:
            chunk = message.read(CHUNK)
        except OSError as exc:
            raise _ReadError(exc.strerror or str(exc)) from exc
        if not chunk:
            return
        yield chunk


def _append(fd: int, header: bytes, message: BinaryIO) -> None:
    """Write the header lines and the quoted message, batching small pieces."""
    quoter = FromQuoter()
    pending = bytearray(header)
    last_byte: int | None = None  # of the message, to know whether it ends in a newline
    for chunk in _message_chunks(message):
        for piece in quoter.feed(chunk):
            pending += piece
            if len(pending) >= CHUNK:
                _write_all(fd, bytes(pending))
                pending.clear()
        last_byte = chunk[-1]
    for piece in quoter.finish():
        pending += piece
    if last_byte is not None and last_byte != 0x0A:
        pending += b"\n"
    pending += b"\n"  # the empty line that separates messages
    _write_all(fd, bytes(pending))


def deliver(
    path: str,
    display_name: str,
    header: bytes,
    message: BinaryIO,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """Append ``header`` (UFLINE + RPLINE + DTLINE) and ``message`` to the mbox at ``path``.

    ``lock_timeout`` exists for tests; the error text always says 30 seconds, as qmail's.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MboxError(f"Unable to open {display_name}: {exc.strerror}. (#4.2.1)") from exc
    try:
        locked = _lock(fd, lock_timeout)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _append(fd, header, message)
            os.fsync(fd)
        except (OSError, _ReadError) as exc:
            if locked:
                _truncate_quietly(fd, start)
            if isinstance(exc, _ReadError):
                raise MboxError(f"Unable to read message: {exc}. (#4.3.0)") from exc
            reason = exc.strerror or str(exc)
            raise MboxError(f"Unable to write {display_name}: {reason}. (#4.3.0)") from exc
    finally:
        os.close(fd)  # also releases the lock


def _truncate_quietly(fd: int, length: int) -> None:
    try:
        os.ftruncate(fd, length)
    except OSError:
        pass  # nothing more we can do; the write error is what gets reported
