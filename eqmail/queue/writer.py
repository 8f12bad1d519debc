"""qmail-queue and qmail-clean: the only code that creates or removes queue entries.

Runs inside the queue-writer worker as eqmailq (or the invoking user for a private
instance), with the queue directory as its only writable place.

qmail's states (INTERNALS, qmail-core §1.3):

    S1  nothing
    S2  +mess                      (pid/ name linked to mess/<n>/<id>; id = inode)
    S3  +mess +intd                (envelope written)
    S4  +mess ?intd +todo          queued: the intd -> todo link is THE commit point
    S5  +mess -intd -todo +info    preprocessed by the scanner

Order per message, as qmail-queue: create ``pid/<qp>.<time>.<seq>`` O_EXCL, fstat for
the inode, link it to ``mess/<id%23>/<id>``, unlink the pid name, write the Received
line and the body; create ``intd/<id%23>/<id>`` O_EXCL with ``u``/``p``/``F``/``T``
records (then eqmail's ``Xorigin=``, docs/queue-format.md); make mess and intd durable; link intd to ``todo/<id%23>/<id>``; make that link
durable (eqmail is stricter than qmail-queue, which never fsyncs todo/); only then answer.

eqmail names the mess file without the pid/ detour: a recycled file from
``spare-queue/`` (eqmail.queue.recycle) renamed to ``mess/<n>/<its inode>``, or an
O_TMPFILE linked there; intd files are recycled the same way.

Durability is batched (group commit, DESIGN §6) and pipelined: every message that is
complete when the committer is free goes into one batch; a step writes that batch's
intd files and links the todo/ names of the previous batch (whose files are already
durable), then ONE barrier (syncfs; fsync of its todo/N for a lone link) makes both
durable, and the previous batch is answered.  So a todo link never
reaches the disk before its files, and under load each barrier serves two batches.
Any error is a qmail-queue exit code for every message it touches, and what was
created is removed, so nothing half-written is ever acknowledged or left behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from eqmail.dates import date822
from eqmail.ipc.queue import CleanAnswer, CleanKind, CleanRequest, QQExit
from eqmail.queue.envelope import Envelope, todo_bytes
from eqmail.queue.layout import SPLIT, QueuePaths
from eqmail.queue.recycle import InodePool

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

OSSIFIED = 129600  # 36 h: pid/ leftovers older than this are removed (qmail-clean)


def syncfs(fd: int) -> None:
    """syncfs(2), which (since Linux 5.8) reports write-back errors; os.sync() never does."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class QueueFailure(Exception):
    def __init__(self, code: QQExit, detail: str = "") -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code


@dataclass
class PendingMessage:
    """A message being written (S2) or waiting for the committer."""

    msgid: int
    qp: int
    mess_fd: int
    uid: int
    envelope: Envelope | None = None
    intd_fd: int = -1
    linked: bool = False
    result: QQExit | None = None
    bytes_written: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def received_line(qp: int, who: str, now: float | None = None) -> bytes:
    return f"Received: (qmail {qp} invoked {who}); {date822(now)}\n".encode()


class QueueStore:
    """The file operations; one instance per queue.  Not thread-safe by itself: the
    worker calls start/write/abort from its event loop, commit_step from its committer
    thread and clean from its cleaner thread.  What they share is safe for that:
    ``inflight`` (single set operations) and the spare pool (see eqmail.queue.recycle)."""

    def __init__(self, queue_root: Path) -> None:
        self.paths = QueuePaths(queue_root)
        self.root_fd = os.open(queue_root, os.O_RDONLY | os.O_DIRECTORY)
        self._seq = 0
        # Ids of messages between start() and their commit or abort.  A foop/ clean
        # request for one of them is refused, so the scanner may sweep orphaned mess
        # files (left by a writer that was killed) at any time, not only after 36 h.
        # Set by the loop thread, cleared by the committer: single set operations are
        # atomic under the GIL, and an id leaves the set only after its todo link.
        self.inflight: set[int] = set()
        self._tmpfile = True  # O_TMPFILE works here until shown otherwise
        self._proc_fd = -1
        # Finished mess and todo files are recycled as new mess and intd files
        # (eqmail.queue.recycle): no inode is allocated or freed per message.
        # Emptied by the worker's cleaner thread after it answered (empty_given): a
        # pool thread of its own would be a fourth thread contending for the GIL.
        self.spares = InodePool(self.paths.dir("spare-queue"), background=False)

    # -- S1 -> S2 -------------------------------------------------------------
    def start(self, qp: int, uid: int, received: bytes) -> PendingMessage:
        fd, msgid = self._create_mess(qp)
        msg = PendingMessage(msgid=msgid, qp=qp, mess_fd=fd, uid=uid)
        self.inflight.add(msgid)
        try:
            self.write(msg, received)
        except BaseException:
            # e.g. ENOSPC on the Received line: the mess file is already linked, so
            # remove it as qmail-queue does, not leave an S2 orphan for the 36 h sweep.
            self.abort(msg)
            raise
        return msg

    def _create_mess(self, qp: int) -> tuple[int, int]:
        """S1 -> S2: a new mess file named by its own inode number.

        qmail-queue creates ``pid/<pid>.<time>.<seq>``, takes its inode number, links
        it to ``mess/<n>/<id>`` and unlinks the pid name: three directory operations.
        eqmail creates the file unnamed (O_TMPFILE) in mess/ and links it straight to
        its final name: one create and one link, and a crash before the link leaves
        nothing behind.  Filesystems without O_TMPFILE get qmail's sequence."""
        try:
            spare = self.spares.take(self.paths.mess)
        except OSError as e:
            raise QueueFailure(QQExit.MESS_DIR, str(e)) from e
        if spare is not None:
            return spare
        if self._tmpfile:
            try:
                fd = os.open(self.paths.dir("mess"), os.O_TMPFILE | os.O_WRONLY, 0o644)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise QueueFailure(QQExit.MESS_DIR, str(e)) from e
                self._tmpfile = False
            else:
                msgid = os.fstat(fd).st_ino
                try:
                    # linkat(AT_SYMLINK_FOLLOW) on the /proc/self/fd entry gives the unnamed
                    # file a name; os.link only uses linkat when a dir fd is passed.
                    if self._proc_fd < 0:
                        self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
                    os.link(str(fd), self.paths.mess(msgid), src_dir_fd=self._proc_fd,
                            follow_symlinks=True)
                except OSError as e:
                    os.close(fd)
                    raise QueueFailure(QQExit.MESS_DIR, str(e)) from e
                return fd, msgid
        return self._create_mess_via_pid(qp)

    def _create_mess_via_pid(self, qp: int) -> tuple[int, int]:
        now = int(time.time())
        fd = -1
        pidname = ""
        for seq in range(1, 10):
            pidname = f"{qp}.{now}.{seq}"
            try:
                fd = os.open(self.paths.pid(pidname), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise QueueFailure(QQExit.PID_DIR, str(e)) from e
        if fd < 0:
            raise QueueFailure(QQExit.PID_DIR, "no free pid name")
        msgid = os.fstat(fd).st_ino
        try:
            try:
                os.link(self.paths.pid(pidname), self.paths.mess(msgid))
            except OSError as e:
                raise QueueFailure(QQExit.MESS_DIR, str(e)) from e
            finally:
                try:
                    os.unlink(self.paths.pid(pidname))
                except OSError:
                    pass
        except BaseException:
            os.close(fd)
            raise
        return fd, msgid

    def write(self, msg: PendingMessage, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(msg.mess_fd, view)
            except OSError as e:
                raise QueueFailure(QQExit.WRITE_ERROR, str(e)) from e
            view = view[n:]
            msg.bytes_written += n

    def prepend(self, msg: PendingMessage, fields: bytes) -> None:
        """Put ``fields`` (complete header fields, checked by eqmail.ipc.queue's
        QueuePrepend) right after this writer's Received line of ``msg``, whose body is
        all written: issue 16's Authentication-Results, which the listener knows only
        at the end of DATA, after it streamed the message here.

        A file cannot grow at its front, so the message moves to a new mess file (S2,
        like the old: no intd, no todo): the Received line and ``fields`` are written,
        the rest is copied in the kernel (copy_file_range), and the new file, named by
        its own inode, becomes the message (``msg.msgid`` changes); the old one is
        retired.  The crash argument is start()'s: until the intd->todo link nothing
        is queued, and a mess file without intd/todo is an orphan that the scanner's
        sweep removes.  A failure removes both files (the message is gone, as after
        any write error) and raises QueueFailure with qmail-queue's code."""
        new: PendingMessage | None = None
        try:
            src = os.open(self.paths.mess(msg.msgid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.abort(msg)
            raise QueueFailure(QQExit.MESS_DIR, str(e)) from e
        try:
            received = os.pread(src, 1024, 0)
            end = received.find(b"\n") + 1
            if not received.startswith(b"Received: ") or end <= 0:
                raise QueueFailure(QQExit.BUG, "no Received line to prepend after")
            fd, msgid = self._create_mess(msg.qp)
            new = PendingMessage(msgid=msgid, qp=msg.qp, mess_fd=fd, uid=msg.uid)
            self.inflight.add(msgid)
            self.write(new, received[:end] + fields)
            _copy_rest(src, new.mess_fd, end, msg.bytes_written - end)
        except BaseException as e:
            if new is not None:
                self.abort(new)
            self.abort(msg)
            if isinstance(e, OSError):
                raise QueueFailure(QQExit.WRITE_ERROR, str(e)) from e
            raise
        finally:
            os.close(src)
        assert new is not None
        old_id, old_fd = msg.msgid, msg.mess_fd
        msg.msgid, msg.mess_fd = new.msgid, new.mess_fd
        msg.bytes_written += len(fields)
        os.close(old_fd)
        self.spares.give(self.paths.mess(old_id))  # or unlinked when the pool is full
        self.inflight.discard(old_id)

    def abort(self, msg: PendingMessage) -> None:
        """Remove whatever this message created (qmail-queue's cleanup on error)."""
        for fd in (msg.intd_fd, msg.mess_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        msg.intd_fd = msg.mess_fd = -1
        if msg.linked:
            _unlink(self.paths.todo(msg.msgid))
        _unlink(self.paths.intd(msg.msgid))
        try:
            os.truncate(self.paths.mess(msg.msgid), 0)
        except OSError:
            pass
        _unlink(self.paths.mess(msg.msgid))
        self.inflight.discard(msg.msgid)

    # -- S2 -> S4 -------------------------------------------------------------
    def commit(self, batch: list[PendingMessage]) -> None:
        """Commit every message of ``batch``; sets ``msg.result`` for each."""
        durable = self.commit_step([], batch)
        if durable:
            self.commit_step(durable, [])

    def commit_step(self, durable: list[PendingMessage], batch: list[PendingMessage]) -> list[PendingMessage]:
        """One step of the pipelined group commit, with ONE durability barrier.

        ``durable``: messages whose mess and intd files an earlier step made durable;
        they get their todo links now, and their result (OK, or the failure) after the
        barrier.  ``batch``: newly complete messages; their intd files are written, and
        those that are durable after the barrier are returned, to be linked by the next
        step.  Under load every barrier thus serves two batches (the links of one, the
        files of the next) instead of each batch needing two of its own, and the todo
        link still never reaches the disk before the files it names."""
        live: list[PendingMessage] = []
        for msg in batch:
            try:
                self._write_intd(msg)
                live.append(msg)
            except QueueFailure as e:
                msg.result = e.code
                self.abort(msg)
        linked: list[PendingMessage] = []
        for msg in durable:
            try:
                os.link(self.paths.intd(msg.msgid), self.paths.todo(msg.msgid))
            except OSError:
                msg.result = QQExit.TODO_DIR  # qmail-queue: "trouble creating links"
                self.abort(msg)
                continue
            msg.linked = True
            # From here the scanner may see todo/ and even finish the message before
            # our barrier returns: its foop/ must not be refused as "in flight".
            self.inflight.discard(msg.msgid)
            linked.append(msg)
        if not live and not linked:
            return []
        try:
            self._barrier(linked, live)
        except OSError:
            for msg in linked + live:
                msg.result = QQExit.WRITE_ERROR
                self.abort(msg)
            return []
        for msg in linked:
            for fd in (msg.intd_fd, msg.mess_fd):
                os.close(fd)
            msg.intd_fd = msg.mess_fd = -1
            msg.result = QQExit.OK
        return live

    def _write_intd(self, msg: PendingMessage) -> None:
        assert msg.envelope is not None
        path = self.paths.intd(msg.msgid)
        try:
            spare = self.spares.take(lambda _ino: path)
            fd = spare[0] if spare else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise QueueFailure(QQExit.INTD_DIR, str(e)) from e
        msg.intd_fd = fd
        data = memoryview(todo_bytes(msg.uid, msg.qp, msg.envelope))
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            raise QueueFailure(QQExit.WRITE_ERROR, str(e)) from e

    def _barrier(self, linked: list[PendingMessage], written: list[PendingMessage]) -> None:
        """Make durable the todo links of ``linked`` and the mess and intd files (and
        mess directory entries) of ``written``: one syncfs, which writes every dirty
        inode and metadata block of the filesystem, directories included, with one
        cache flush (three separate fdatasync/fsync calls for one message's files
        would be three flushes).  A single todo link needs only its directory."""
        if written or len(linked) > 1:
            syncfs(self.root_fd)
        else:
            fsync_dir(self.paths.dir("todo") / str(linked[0].msgid % SPLIT))

    # -- qmail-clean ----------------------------------------------------------
    def clean(self, request: CleanRequest) -> CleanAnswer:
        """qmail-clean: ``foop/<id>`` removes intd+mess, ``todo/[<n>/]<id>`` removes
        todo then intd.  Answers DONE (``+``; absent is fine) or REFUSED (``!``); a
        request it cannot read (``x``) never gets here (eqmail.ipc.queue.CleanRequest).

        ``foop/`` is refused (``!``) for a message still being written or already
        committed (todo/ present): then the scanner's sweep of mess files that have
        neither info nor todo cannot race a message being queued.  The in-flight check
        comes first because an id leaves ``inflight`` only after its todo link exists,
        and the scanner cannot preprocess (remove todo) while it waits for this answer.
        """
        msgid = request.msgid
        foop = request.kind is CleanKind.FOOP
        if foop and (msgid in self.inflight or os.path.exists(self.paths.todo(msgid))):
            return CleanAnswer.REFUSED
        # A finished file goes to the spare pool under its last name, so the other one is
        # unlinked first.  For todo/ the todo name goes first (qmail-clean removes intd/
        # first) and the file leaves through intd/: todo/ then only ever loses names by
        # unlink, which anything watching todo/ (an admin's inotify tool) sees as a
        # plain delete.  A crash between the two leaves an intd/ file alone, which the
        # message's foop/ removes with its mess file.
        try:
            if foop:
                _unlink(self.paths.intd(msgid), strict=True)
                self.spares.give(self.paths.mess(msgid))
            else:
                _unlink(self.paths.todo(msgid), strict=True)
                self.spares.give(self.paths.intd(msgid))
        except OSError:
            return CleanAnswer.REFUSED
        return CleanAnswer.DONE

    def clean_pid_dir(self, now: float | None = None, older_than: float = OSSIFIED) -> int:
        """Remove pid/ leftovers older than ``older_than`` (qmail-clean: 36 h, at start
        and periodically).  The writer passes 0 when it starts: it is the only writer of
        the queue, so no pid/ name can be in use then."""
        now = time.time() if now is None else now
        removed = 0
        piddir = self.paths.dir("pid")
        for name in os.listdir(piddir):
            p = piddir / name
            try:
                if now - os.stat(p).st_atime >= older_than:
                    os.unlink(p)
                    removed += 1
            except OSError:
                continue
        return removed


def _copy_rest(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (at its position):
    copy_file_range, which stays in the kernel (and may share extents); pread/write
    where the filesystem or kernel cannot do it."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, offset + done)
            if n == 0:
                raise QueueFailure(QQExit.READ_ERROR, "message shorter than written")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while done < count:
        data = os.pread(src, min(count - done, 1 << 20), offset + done)
        if not data:
            raise QueueFailure(QQExit.READ_ERROR, "message shorter than written")
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
        done += len(data)


def _unlink(path: Path, strict: bool = False) -> None:
    """Remove ``path``; absent is fine, other errors count only when ``strict``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        if strict:
            raise


def failure_code(exc: BaseException) -> QQExit:
    if isinstance(exc, QueueFailure):
        return exc.code
    if isinstance(exc, MemoryError):
        return QQExit.NO_MEMORY
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return QQExit.WRITE_ERROR
    return QQExit.BUG
