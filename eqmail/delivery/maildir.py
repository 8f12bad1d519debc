"""Delivery of one message into a Maildir (qmail-local's maildir child, maildir(5)).

What it owns: writing ``prefix`` (Return-Path + Delivered-To lines) and the message into
a new file, fsync, and linking it to ``new/<time>.<unique>.<host>``; then -- stricter
than qmail -- fsync ``new/`` so the new directory entry is on disk before success is
reported.  The file is created unnamed in ``tmp/`` (O_TMPFILE) where the filesystem
allows, else as qmail does: ``tmp/<name>`` with O_EXCL, linked, the tmp name unlinked.

Privilege: runs as the recipient; creates files 0600 (qmail-local runs with umask 077).

Inputs: the maildir path (already joined to the home directory), the prefix bytes, the
message as a binary file positioned at offset 0, the host name for the unique name.

Failures: :class:`MaildirError`, always temporary, with qmail's texts:
``Unable to chdir to maildir. (#4.2.1)`` (the maildir is missing or not a directory),
``Unable to read message. (#4.3.0)``, ``Temporary error on maildir delivery. (#4.3.0)``.
The tmp file is removed on every failure after it was created.  qmail's 24-hour alarm is
not reproduced here: a delivery that hangs is the calling worker's to time out.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from typing import BinaryIO

CHUNK = 65536
_TRIES = 3  # like qmail: three attempts at a fresh name, 2 s apart
_RETRY_SLEEP = 2.0

_counter = itertools.count(1)
_PROC_FD = os.path.isdir("/proc/self/fd")

CHDIR_TEXT = "Unable to chdir to maildir. (#4.2.1)"
READ_TEXT = "Unable to read message. (#4.3.0)"
TEMP_TEXT = "Temporary error on maildir delivery. (#4.3.0)"


class MaildirError(Exception):
    """A maildir delivery failed; always a temporary failure."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def safe_hostname(hostname: str) -> str:
    """maildir(5): ``/`` and ``:`` in the host part are written as ``\\057`` and ``\\072``."""
    return hostname.replace("/", "\\057").replace(":", "\\072")


def unique_name(hostname: str) -> str:
    """``<unix time>.M<usec>P<pid>Q<n>.<host>``.

    qmail uses the pid alone, which is unique only because qmail-local delivers once per
    process; eqmail may deliver several times per process (two lines naming the same
    maildir), so the microseconds and a per-process counter are added.
    """
    now = time.time()
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{usec}P{os.getpid()}Q{next(_counter)}.{safe_hostname(hostname)}"


def _create_tmp(dir_fd: int, hostname: str) -> tuple[int, str]:
    for attempt in range(_TRIES):
        name = unique_name(hostname)
        try:
            fd = os.open(
                f"tmp/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                dir_fd=dir_fd,
            )
        except FileExistsError:
            if attempt + 1 < _TRIES:
                time.sleep(_RETRY_SLEEP)
            continue
        except OSError as exc:
            raise MaildirError(TEMP_TEXT) from exc
        return fd, name
    raise MaildirError(TEMP_TEXT)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy(fd: int, prefix: bytes, message: BinaryIO) -> None:
    """Write prefix + message; MaildirError(READ_TEXT) on a read error."""
    try:
        _write_all(fd, prefix)
    except OSError as exc:
        raise MaildirError(TEMP_TEXT) from exc
    while True:
        try:
            chunk = message.read(CHUNK)
        except OSError as exc:
            raise MaildirError(READ_TEXT) from exc
        if not chunk:
            return
        try:
            _write_all(fd, chunk)
        except OSError as exc:
            raise MaildirError(TEMP_TEXT) from exc


def _fsync_dir(dir_fd: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(maildir: str, prefix: bytes, message: BinaryIO, *, hostname: str | None = None) -> str:
    """Deliver into ``maildir``; return the file name created under ``new/``."""
    if hostname is None:
        hostname = socket.gethostname()
    try:
        dir_fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MaildirError(CHDIR_TEXT) from exc
    try:
        name = _deliver_unnamed(dir_fd, prefix, message, hostname)
        if name is None:
            name = _deliver_via_tmp(dir_fd, prefix, message, hostname)
        try:
            _fsync_dir(dir_fd, "new")
        except OSError as exc:
            # Not durable, so not delivered: withdraw it, or the retry would duplicate it.
            _unlink_quietly(dir_fd, f"new/{name}")
            raise MaildirError(TEMP_TEXT) from exc
        return name
    finally:
        os.close(dir_fd)


def _deliver_unnamed(dir_fd: int, prefix: bytes, message: BinaryIO, hostname: str) -> str | None:
    """The file is created without a name (O_TMPFILE in tmp/), written, fsynced and only
    then linked into new/: readers never see it partial, a crash leaves nothing, and
    neither tmp/ name nor unlink is needed.  Creating a file without a name does not
    lock tmp/, so concurrent deliveries to one Maildir do not queue on that directory
    while the filesystem allocates their inodes.  None where the filesystem has no
    O_TMPFILE (NFS, old kernels): then qmail's tmp/ name is used."""
    if not _PROC_FD:
        return None  # no /proc: an unnamed file could not be given its name
    try:
        fd = os.open("tmp", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise MaildirError(TEMP_TEXT) from exc
    try:
        _copy(fd, prefix, message)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise MaildirError(TEMP_TEXT) from exc
        for attempt in range(_TRIES):
            name = unique_name(hostname)
            try:
                # the unnamed file gets its name through its /proc/self/fd entry
                os.link(f"/proc/self/fd/{fd}", f"new/{name}", dst_dir_fd=dir_fd, follow_symlinks=True)
                return name
            except FileExistsError:
                if attempt + 1 < _TRIES:
                    time.sleep(_RETRY_SLEEP)
            except OSError as exc:
                raise MaildirError(TEMP_TEXT) from exc
        raise MaildirError(TEMP_TEXT)
    finally:
        os.close(fd)


def _deliver_via_tmp(dir_fd: int, prefix: bytes, message: BinaryIO, hostname: str) -> str:
    """maildir(5) as qmail does it: tmp/<name>, fsync, link to new/<name>, unlink tmp/."""
    fd, name = _create_tmp(dir_fd, hostname)
    tmp = f"tmp/{name}"
    try:
        try:
            _copy(fd, prefix, message)
            os.fsync(fd)
        finally:
            os.close(fd)  # close errors matter on NFS: reported below as failure
        os.link(tmp, f"new/{name}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except MaildirError:
        _unlink_quietly(dir_fd, tmp)
        raise
    except OSError as exc:
        # Includes EEXIST from link(): qmail assumes an NFS retry succeeded, but a
        # new/ name we did not just create is not ours to vouch for.
        _unlink_quietly(dir_fd, tmp)
        raise MaildirError(TEMP_TEXT) from exc
    _unlink_quietly(dir_fd, tmp)
    return name


def _unlink_quietly(dir_fd: int, path: str) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass  # a stale tmp/ file is harmless; maildir readers clean tmp/ after 36 hours
