"""What ``eqmailctl import-qmail`` carries over of a qmail queue (qmail-core §6, §7).

Owns: copying a stopped qmail's queue, in qmail's format, plain (unsplit todo/intd) or
big-todo, into the eqmail instance's queue.  Messages get new ids (an id is the mess
file's inode).  S4 messages (todo present) become new S4 messages with the same
u/p/F/T records; S5 messages (info present) get their info (mtime = birth),
local/remote files (T/D records, mtime = next retry) and bounce file copied.  S2/S3
leftovers (no todo, no info) are skipped: qmail-send would have deleted them.  Nothing
in the qmail queue is changed.

Order per S5 message, so a crash never leaves an info file without its channel
files (eqmail's recovery would then call the message finished): mess, then
local/remote/bounce, then info, each fsync'd with its directory.  S4 messages go
through :class:`eqmail.queue.writer.QueueStore` (intd -> todo link is the commit point).
Every imported message is recorded in ``queue/lock/qmail-import`` so a second run does
not queue it twice.

Privilege: root for a system instance (mess/intd/todo eqmailq, info/local/remote/bounce
eqmails); a private instance runs as its user.  The caller holds qmail-send's and
eqmail's locks (:func:`eqmail.migrate.import_qmail`).
Inputs: QMAILHOME/queue, the instance, the :class:`~eqmail.migrate.plan.ImportReport`.
Outputs: queue files and the import record; a report line per message.
With ``dry_run`` every message is read and classified and nothing is written (not even
the import record); ``progress`` reports (done, total) as messages are handled.
Failure modes: OSError from the file system or the queue writer (a message whose
commit failed is not recorded, so a second run retries it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from eqmail.instance import Instance
from eqmail.ipc.queue import QQExit
from eqmail.migrate.plan import ImportReport, Owners, write_file
from eqmail.queue.envelope import Envelope, origin_of, parse_records, requiretls_of
from eqmail.queue.layout import QueuePaths
from eqmail.queue.writer import PendingMessage, QueueStore, fsync_dir, syncfs

IMPORT_RECORD = "qmail-import"  # in queue/lock/: what earlier runs imported
CHUNK = 1 << 20


def _scan(base: Path) -> dict[int, Path]:
    """id -> file for a qmail queue directory, split (``N/id``) or not (``id``)."""
    found: dict[int, Path] = {}
    if not base.is_dir():
        return found
    for entry in os.scandir(base):
        if entry.is_dir(follow_symlinks=False) and entry.name.isdigit():
            for sub in os.scandir(entry.path):
                if sub.is_file(follow_symlinks=False) and sub.name.isdigit():
                    found[int(sub.name)] = Path(sub.path)
        elif entry.is_file(follow_symlinks=False) and entry.name.isdigit():
            found[int(entry.name)] = Path(entry.path)
    return found


Progress = Callable[[int, int], None]  # (messages handled, messages in the qmail queue)


class QueueImporter:
    """Imports every message of QMAILHOME/queue; with ``dry_run`` it reads and classifies
    them and reports what it would import, writing nothing.  ``progress`` is called
    before the first message and after each one."""

    def __init__(self, qhome: Path, inst: Instance, owners: Owners, report: ImportReport,
                 dry_run: bool = False, progress: Progress | None = None) -> None:
        self.dry_run = dry_run
        self.progress = progress
        self.src = qhome / "queue"
        self.qhome = qhome.resolve()
        self.dst = QueuePaths(inst.queue)
        self.owners = owners
        self.report = report
        self.record_path = self.dst.lock / IMPORT_RECORD
        self.done = self._read_record()

    def _read_record(self) -> dict[str, int]:
        try:
            text = self.record_path.read_text(errors="surrogateescape")
        except FileNotFoundError:
            return {}
        out = {}
        for line in text.splitlines():
            key, _, new = line.rpartition("\t")
            if new.isdigit():
                out[key] = int(new)
        return out

    def run(self) -> None:
        dirs = {name: _scan(self.src / name) for name in
                ("mess", "todo", "intd", "info", "local", "remote")}
        bounce = _scan(self.src / "bounce")
        layout = "big-todo" if any(p.parent != self.src / "todo" for p in dirs["todo"].values()) else "plain"
        ids = sorted(dirs["mess"])
        if self.progress:
            self.progress(0, len(ids))
        if self.dry_run:
            for n, msgid in enumerate(ids, 1):
                self._one(msgid, dirs, bounce, layout)
                if self.progress:
                    self.progress(n, len(ids))
        else:
            self._run_writing(ids, dirs, bounce, layout)
        for name in ("todo", "info"):
            for msgid in sorted(set(dirs[name]) - set(dirs["mess"])):
                self.report.not_carried.append(f"queue {name} {msgid} (no mess file: nothing to deliver)")
        if dirs["mess"]:
            self.report.notes.append("the qmail queue was left as it is: do not start qmail-send again "
                                     "(it would deliver these messages a second time)")

    def _run_writing(self, ids: list[int], dirs: dict[str, dict[int, Path]], bounce: dict[int, Path],
                     layout: str) -> None:
        self.store = QueueStore(self.dst.root)
        try:
            for n, msgid in enumerate(ids, 1):
                self._one(msgid, dirs, bounce, layout)
                if self.progress:
                    self.progress(n, len(ids))
            # Ownership and times of everything above are metadata: one barrier for all.
            syncfs(self.store.root_fd)
        finally:
            os.close(self.store.root_fd)

    def _one(self, msgid: int, dirs: dict[str, dict[int, Path]], bounce: dict[int, Path], layout: str) -> None:
        mess = dirs["mess"][msgid]
        st = mess.stat()
        key = f"{self.qhome}\t{msgid}\t{st.st_size}\t{st.st_mtime_ns}"
        if key in self.done:
            self.report.notes.append(f"queue msg {msgid} was imported earlier as msg {self.done[key]}: skipped")
            return
        if msgid in dirs["todo"]:
            new = self._import_todo(mess, dirs["todo"][msgid])
            what = f"not yet preprocessed, {layout} todo"
        elif msgid in dirs["info"]:
            chans = {ch: dirs[ch].get(msgid) for ch in ("local", "remote")}
            new = self._import_preprocessed(mess, dirs["info"][msgid], chans, bounce.get(msgid))
            what = "preprocessed: " + ", ".join(
                f"{ch} {_count(p, b'T')} to do / {_count(p, b'D')} done" for ch, p in chans.items() if p)
        else:
            state = "S3, mess+intd" if msgid in dirs["intd"] else "S2, mess only"
            self.report.not_carried.append(f"queue msg {msgid} ({state}: an interrupted qmail-queue; "
                                           "qmail-send would have deleted it)")
            return
        if new is None:
            return
        if self.dry_run:
            self.report.imported.append(f"queue msg {msgid} ({what})")
            return
        self._append_record(key, new)
        self.report.imported.append(f"queue msg {msgid} as msg {new} ({what})")

    def _new_mess(self, mess: Path, qp: int, uid: int) -> PendingMessage:
        """A new mess file with the original bytes (no Received line of our own)."""
        msg = self.store.start(qp, uid, b"")
        try:
            with open(mess, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.store.write(msg, chunk)
            owner = self.owners.role("queue")
            if owner is not None:
                os.fchown(msg.mess_fd, *owner)
            os.fchmod(msg.mess_fd, 0o644)
        except BaseException:
            self.store.abort(msg)
            raise
        return msg

    def _import_todo(self, mess: Path, todo: Path) -> int | None:
        recs = parse_records(todo.read_bytes())
        fields = {r.kind: r.value for r in recs if r.kind in "upF"}
        rcpts = tuple(r.value for r in recs if r.kind == "T")
        others = sorted({r.kind for r in recs} - set("upFTX"))  # X: eqmail's origin, kept
        if "F" not in fields:
            self.report.not_carried.append(f"queue msg {todo.name} (todo without an F record)")
            return None
        if others:
            self.report.notes.append(f"queue msg {todo.name}: todo records {''.join(others)} dropped "
                                     "(qmail-send ignores them too)")
        if self.dry_run:
            return 0
        uid = int(fields["u"]) if fields.get("u", "").isdigit() else 0
        qp = int(fields["p"]) if fields.get("p", "").isdigit() else os.getpid()
        pending = self._new_mess(mess, qp, uid)
        msgid = pending.msgid
        pending.envelope = Envelope(fields["F"], rcpts, origin_of(recs), requiretls_of(recs))
        self.store.commit([pending])  # QueueStore removes what it created if this fails
        if pending.result != QQExit.OK:
            raise OSError(f"cannot queue a copy of {mess}: {pending.result!r}")
        owner = self.owners.role("queue")
        if owner is not None:
            os.chown(self.dst.todo(msgid), *owner)  # intd and todo are one inode
        return msgid

    def _import_preprocessed(self, mess: Path, info: Path, chans: dict[str, Path | None],
                             bounce: Path | None) -> int | None:
        if self.dry_run:
            return 0
        pending = self._new_mess(mess, os.getpid(), os.getuid())
        msgid = pending.msgid
        try:
            os.fdatasync(pending.mess_fd)
        finally:
            os.close(pending.mess_fd)
        fsync_dir(self.dst.mess(msgid).parent)
        send = self.owners.role("send")
        # channel files and bounce before info: info without them would read as "finished"
        for ch, src in chans.items():
            if src is not None:
                self._copy(src, self.dst.split_file(ch, msgid), send)
        if bounce is not None:
            self._copy(bounce, self.dst.bounce(msgid), send)
        self._copy(info, self.dst.info(msgid), send)
        return msgid

    def _copy(self, src: Path, dest: Path, owner: tuple[int, int] | None) -> None:
        st = src.stat()
        write_file(dest, src.read_bytes(), 0o600, owner, (st.st_atime_ns, st.st_mtime_ns), exclusive=True)

    def _append_record(self, key: str, new: int) -> None:
        fd = os.open(self.record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{key}\t{new}\n".encode("utf-8", "surrogateescape"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[key] = new


def _count(path: Path | None, tag: bytes) -> int:
    if path is None:
        return 0
    return sum(1 for r in path.read_bytes().split(b"\0") if r[:1] == tag)
