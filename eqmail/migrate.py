"""``eqmailctl import-qmail QMAILHOME``: take over a stopped qmail installation.

Owns: reading a qmail (netqmail 1.06 / eQmail 1.09) installation and writing its
configuration and its queue into an eqmail instance (DESIGN §2, qmail-core §1, §6, §7).

What is carried over:
- control files eqmail knows (``control.KNOWN_FILES`` / ``OTHER_KNOWN_FILES``, with
  ``tlshosts/`` and ``notlshosts/``); ``morercpthosts`` is regenerated from
  ``morercpthosts.cdb`` because that is what qmail-smtpd read.  Unknown files are
  listed, not copied.  An existing eqmail file is replaced only with ``--force``.
- ``users/assign``: qmail-lspawn reads only ``users/cdb``, so when the cdb exists the
  assign lines are regenerated from it (a small cdb reader below); a differing assign
  source is reported.
- ``alias/.qmail-*``, owned by eqmail's alias user.
- ``defaultdelivery`` from qmail-start's first argument in ``rc`` when no
  ``control/defaultdelivery`` exists.
- the queue, in qmail's format, plain (unsplit todo/intd) or big-todo: messages get new
  ids (an id is the mess file's inode).  S4 messages (todo present) become new S4
  messages with the same u/p/F/T records; S5 messages (info present) get their info
  (mtime = birth), local/remote files (T/D records, mtime = next retry) and bounce
  file copied.  S2/S3 leftovers (no todo, no info) are skipped: qmail-send would have
  deleted them.  Nothing in the qmail installation is changed.

Order per S5 message, so a crash never leaves an info file without its channel
files (eqmail's recovery would then call the message finished): mess, then
local/remote/bounce, then info, each fsync'd with its directory.  S4 messages go
through :class:`eqmail.queue.writer.QueueStore` (intd -> todo link is the commit point).
Every imported message is recorded in ``queue/lock/qmail-import`` so a second run does
not queue it twice.

Privilege: root for a system instance (files get eqmail's owners: mess/intd/todo
eqmailq, info/local/remote/bounce eqmails); a private instance runs as its user.

Refuses (:class:`ImportRefused`, nothing written) when qmail-send or any program from
QMAILHOME/bin runs (``lock/sendmutex`` locked, or /proc), when the eqmail instance runs
(its pid-file lock), or when the merged control directory would not load.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from eqmail.cdb import cdb_get, cdb_hash, cdb_records  # noqa: F401 (re-exported)
from eqmail.control import KNOWN_FILES, OTHER_KNOWN_FILES, load_controls
from eqmail.errors import ControlErrors
from eqmail.instance import Instance
from eqmail.ipc import QQExit
from eqmail.queue.envelope import Envelope, parse_records
from eqmail.queue.layout import QueuePaths
from eqmail.queue.writer import PendingMessage, QueueStore, fsync_dir, syncfs
from eqmail.supervisor.ids import SystemIds

IMPORT_RECORD = "qmail-import"  # in queue/lock/: what earlier runs imported
# qmail's users and groups (conf-users, conf-groups) -> eqmail's roles (supervisor.ids)
QMAIL_USER_ROLES = {"qmaild": "daemon", "qmailq": "queue", "qmails": "send", "qmailr": "remote",
                    "qmailp": "plugin", "qmaill": "log", "alias": "alias"}
CHUNK = 1 << 20


class ImportRefused(Exception):
    """The import cannot run safely; nothing was changed."""


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported {x}" for x in self.imported]
        out += [f"not carried over: {x}" for x in self.not_carried]
        out += [f"note: {x}" for x in self.notes]
        return out


# ---------------------------------------------------------------- cdb


def assign_from_users_cdb(data: bytes) -> list[str]:
    """users/assign lines (without the final ``.``) regenerated from qmail-newu's cdb.

    qmail-newu stores ``=local`` as key ``!local\\0`` and ``+prefix`` as ``!prefix``
    (both lowercased), the value being the six fields ``user uid gid home dash ext``
    NUL-separated; the empty key holds the wildcard characters, implied by the ``+``
    lines themselves."""
    lines = []
    for key, value in cdb_records(data):
        if not key:
            continue
        if not key.startswith(b"!"):
            raise ValueError(f"unexpected key {key!r} in users/cdb")
        fields = value.split(b"\0")
        if len(fields) < 6:
            raise ValueError(f"users/cdb entry {key!r} has {len(fields)} fields, not 6")
        text = ":".join(f.decode("utf-8", "surrogateescape") for f in fields[:6])
        if key.endswith(b"\0"):
            lines.append(f"={key[1:-1].decode('utf-8', 'surrogateescape')}:{text}:")
        else:
            lines.append(f"+{key[1:].decode('utf-8', 'surrogateescape')}:{text}:")
    return lines


# ---------------------------------------------------------------- safety checks


def qmail_processes(qhome: Path) -> list[str]:
    """Running programs of this qmail installation: any process whose executable lives
    in QMAILHOME/bin (qmail-send, qmail-smtpd under tcpserver, qmail-queue...)."""
    bindir = str(qhome.resolve() / "bin") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if exe.startswith(bindir):
            found.append(f"pid {entry} ({os.path.basename(exe)})")
    return found


def lock_qmail_send(qhome: Path) -> int | None:
    """Take qmail-send's own lock (``lock/sendmutex``, flock exclusive, as qmail-send's
    lock_exnb) so it cannot start during the import.  None when the queue has no
    sendmutex; ImportRefused when someone holds it."""
    path = qhome / "queue" / "lock" / "sendmutex"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a qmail built without flock uses lockf
    except OSError:
        os.close(fd)
        raise ImportRefused(f"qmail-send is running ({path} is locked): stop qmail first") from None
    return fd


def lock_eqmail(inst: Instance) -> int:
    """Hold the supervisor's pid-file lock for the import: refuses when eqmail runs, and
    keeps ``eqmailctl start`` from starting half-way through."""
    inst.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(inst.pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).strip().decode(errors="replace")
        os.close(fd)
        raise ImportRefused(f"eqmail is running (pid {pid}): run 'eqmailctl stop' first") from None
    return fd


# ---------------------------------------------------------------- file helpers


class Owners:
    """eqmail's uid/gid for a qmail file owner, and for each queue role."""

    def __init__(self) -> None:
        self.ids = SystemIds.lookup()
        self.root = os.geteuid() == 0

    def role(self, role: str) -> tuple[int, int] | None:
        if not self.root:
            return None
        ids = self.ids[role]
        return ids.uid, ids.gid

    def mapped(self, st: os.stat_result) -> tuple[int, int] | None:
        """A control file owned by qmailr (say) becomes eqmailr's; group qmail becomes
        group eqmail; root and other owners stay root."""
        if not self.root:
            return None
        import grp
        import pwd

        uid = gid = 0
        try:
            role = QMAIL_USER_ROLES.get(pwd.getpwuid(st.st_uid).pw_name)
            if role:
                uid = self.ids[role].uid
        except KeyError:
            pass
        try:
            group = grp.getgrgid(st.st_gid).gr_name
            if group in ("qmail", "nofiles"):
                gid = grp.getgrnam("eqmail" if group == "qmail" else "nofiles").gr_gid
        except KeyError:
            pass
        return uid, gid


def write_file(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None,
               times_ns: tuple[int, int] | None = None, exclusive: bool = False) -> None:
    """Write ``path`` durably: a temporary name renamed over it (or O_EXCL for queue
    files), owner, mode and times set before the fsync, then the directory fsync'd."""
    target = path if exclusive else path.with_name(f".{path.name}.import")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC) | os.O_NOFOLLOW
    fd = os.open(target, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        if times_ns is not None:
            os.utime(fd, ns=times_ns)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not exclusive:
        os.replace(target, path)
    fsync_dir(path.parent)


@dataclass
class Planned:
    """One file the import will write into the instance."""

    dest: str  # relative to the instance root, e.g. "control/me"
    data: bytes
    mode: int
    owner: tuple[int, int] | None
    note: str = ""


# ---------------------------------------------------------------- configuration


def _known_control(name: str) -> bool:
    return name in KNOWN_FILES or name in OTHER_KNOWN_FILES


def plan_controls(qhome: Path, inst: Instance, force: bool, owners: Owners,
                  report: ImportReport) -> list[Planned]:
    plan: list[Planned] = []
    cdir = qhome / "control"
    names = sorted(os.listdir(cdir)) if cdir.is_dir() else []
    for name in names:
        src = cdir / name
        if name.startswith("."):
            continue
        if not _known_control(name):
            report.not_carried.append(f"control/{name} (eqmail has no idea what this file does)")
            continue
        if name == "morercpthosts.cdb":
            continue  # turned into morercpthosts below
        if name == "morercpthosts" and (cdir / "morercpthosts.cdb").exists():
            continue  # qmail-smtpd read the cdb, not this source
        if src.is_dir():
            for dirpath, _dirs, files in os.walk(src):
                for fn in sorted(files):
                    p = Path(dirpath) / fn
                    rel = p.relative_to(cdir)
                    st = p.stat()
                    plan.append(Planned(f"control/{rel}", p.read_bytes(), stat.S_IMODE(st.st_mode) & 0o7755,
                                        owners.mapped(st)))
            continue
        st = src.stat()
        plan.append(Planned(f"control/{name}", src.read_bytes(), stat.S_IMODE(st.st_mode) & 0o7755,
                            owners.mapped(st)))
    mrh = cdir / "morercpthosts.cdb"
    if mrh.exists():
        hosts = [k.decode("utf-8", "surrogateescape") for k, _ in cdb_records(mrh.read_bytes())]
        plan.append(Planned("control/morercpthosts", "".join(h + "\n" for h in hosts).encode("utf-8", "surrogateescape"),
                            0o644, None, f"from morercpthosts.cdb, {len(hosts)} domains"))
        src = cdir / "morercpthosts"
        if src.exists() and sorted(_lines(src.read_bytes())) != sorted(hosts):
            report.notes.append("control/morercpthosts differs from morercpthosts.cdb (qmail-newmrh not run "
                                "since the last edit); imported what qmail-smtpd used: the cdb")
    elif (cdir / "morercpthosts").exists():
        report.notes.append("control/morercpthosts has no morercpthosts.cdb, so qmail-smtpd ignored it; "
                            "eqmail reads it directly")
    if "defaultdelivery" not in names:
        plan += _plan_defaultdelivery(qhome, report)
    return plan


def _lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "surrogateescape")
    return [ln.strip() for ln in text.split("\n") if ln.strip() and not ln.startswith("#")]


def parse_rc_defaultdelivery(text: str) -> str | None:
    """qmail-start's first argument in an rc script (``exec env - ... qmail-start ./Maildir/
    splogger qmail``); None when there is no literal one.  A command substitution
    (netqmail's ``"`cat /var/qmail/control/defaultdelivery`"``) also gives None: that file
    is imported on its own."""
    text = text.replace("\\\n", " ")
    for line in text.split("\n"):
        if "qmail-start" not in line or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            return None
        for i, w in enumerate(words):
            if os.path.basename(w) == "qmail-start":
                if i + 1 >= len(words):
                    return "./Mailbox"  # qmail-lspawn's compiled default
                arg = words[i + 1]
                return None if "`" in arg or "$(" in arg else arg
    return None


def _plan_defaultdelivery(qhome: Path, report: ImportReport) -> list[Planned]:
    rc = qhome / "rc"
    if not rc.exists():
        report.notes.append("no rc script and no control/defaultdelivery: eqmail's default ./Maildir/ "
                            "applies (check what qmail-start was given)")
        return []
    value = parse_rc_defaultdelivery(rc.read_text(errors="surrogateescape"))
    if value is None:
        report.not_carried.append("rc (qmail-start's argument is not a literal: set control/defaultdelivery)")
        return []
    if "\n" in value.strip("\n"):
        report.not_carried.append("rc: qmail-start's default delivery has several lines; eqmail's "
                                  "control/defaultdelivery has one: put the rest into .qmail files")
        return []
    return [Planned("control/defaultdelivery", value.strip("\n").encode() + b"\n", 0o644, None,
                    "from qmail-start's argument in rc")]


def plan_users(qhome: Path, report: ImportReport) -> list[Planned]:
    cdb, assign = qhome / "users" / "cdb", qhome / "users" / "assign"
    if cdb.exists():
        lines = assign_from_users_cdb(cdb.read_bytes())
        if assign.exists():
            source = [ln for ln in _lines(assign.read_bytes()) if ln != "."]
            if _normal(source) == _normal(lines):
                return [Planned("users/assign", assign.read_bytes(), 0o644, None)]
            report.notes.append("users/assign differs from users/cdb (qmail-newu not run since the last "
                                "edit); imported what qmail-lspawn used: users/cdb")
        data = "".join(ln + "\n" for ln in [*lines, "."]).encode("utf-8", "surrogateescape")
        return [Planned("users/assign", data, 0o644, None, f"regenerated from users/cdb, {len(lines)} {'entry' if len(lines) == 1 else 'entries'}")]
    if assign.exists():
        report.notes.append("users/assign has no users/cdb, so qmail-lspawn ignored it; eqmail reads it directly")
        return [Planned("users/assign", assign.read_bytes(), 0o644, None)]
    return []


def _normal(lines: list[str]) -> list[str]:
    """Compare assign lines as qmail-newu keys them (local part lowercased)."""
    out = []
    for ln in lines:
        key, _, rest = ln.partition(":")
        out.append(key.lower() + ":" + rest)
    return out


def plan_alias(qhome: Path, owners: Owners, report: ImportReport) -> list[Planned]:
    adir = qhome / "alias"
    if not adir.is_dir():
        return []
    plan = []
    for name in sorted(os.listdir(adir)):
        p = adir / name
        if name.startswith(".qmail") and p.is_file() and not p.is_symlink():
            plan.append(Planned(f"alias/{name}", p.read_bytes(), stat.S_IMODE(p.stat().st_mode) & 0o755,
                                owners.role("alias")))
        elif name not in (".", ".."):
            report.not_carried.append(f"alias/{name} (only .qmail files are copied; mail already "
                                      "delivered there stays in qmail's alias home)")
    return plan


def advise_smtpd(qhome: Path, report: ImportReport) -> None:
    """qmail-smtpd ran under tcpserver from a run script: eqmail binds the listeners
    itself, so that part is configuration to redo, not files to copy."""
    for base in ("supervise", "service"):
        d = qhome / base
        if d.is_dir():
            for name in sorted(os.listdir(d)):
                if (d / name / "run").exists():
                    report.not_carried.append(f"{base}/{name}/run (a daemontools run script)")
    report.notes.append("qmail-smtpd's tcpserver set-up is not carried over: put the tcprules source "
                        "(often /etc/tcp.smtp; tcp.smtp.cdb is not read) into control/tcp.smtp and one line "
                        "per listening port into control/listen (SERVICE ADDRESS:PORT [VAR=value ...])")


def apply_plan(inst: Instance, plan: list[Planned], force: bool, report: ImportReport) -> None:
    for item in plan:
        dest = inst.root / item.dest
        replaced = dest.exists()
        if replaced and dest.read_bytes() == item.data:
            report.imported.append(f"{item.dest} (same as eqmail's)")
            continue
        if replaced and not force:
            report.not_carried.append(f"{item.dest} (eqmail already has one; --force replaces it)")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_file(dest, item.data, item.mode, item.owner)
        what = ", ".join(x for x in (item.note, "replaced eqmail's" if replaced else "") if x)
        report.imported.append(item.dest + (f" ({what})" if what else ""))


def check_merged(inst: Instance, plan: list[Planned], force: bool) -> None:
    """Load the control directory as it will be after the import; refuse if eqmail
    would refuse it (qmail silently ignored what eqmail names as file:line)."""
    with tempfile.TemporaryDirectory() as tmp:
        troot = Path(tmp)
        for sub in ("control", "users"):
            if (inst.root / sub).is_dir():
                shutil.copytree(inst.root / sub, troot / sub, symlinks=True)
            (troot / sub).mkdir(exist_ok=True)
        for item in plan:
            dest = troot / item.dest
            if item.dest.startswith(("control/", "users/")) and (force or not dest.exists()):
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(item.data)
        try:
            load_controls(troot)
        except ControlErrors as e:
            raise ImportRefused("eqmail would refuse the imported configuration (nothing changed):\n"
                                + "\n".join(str(x) for x in e.errors)) from None


# ---------------------------------------------------------------- the queue


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


class QueueImporter:
    def __init__(self, qhome: Path, inst: Instance, owners: Owners, report: ImportReport) -> None:
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
        self.store = QueueStore(self.dst.root)
        try:
            for msgid in sorted(dirs["mess"]):
                self._one(msgid, dirs, bounce, layout)
            # Ownership and times of everything above are metadata: one barrier for all.
            syncfs(self.store.root_fd)
        finally:
            os.close(self.store.root_fd)
        for name in ("todo", "info"):
            for msgid in sorted(set(dirs[name]) - set(dirs["mess"])):
                self.report.not_carried.append(f"queue {name} {msgid} (no mess file: nothing to deliver)")
        if dirs["mess"]:
            self.report.notes.append("the qmail queue was left as it is: do not start qmail-send again "
                                     "(it would deliver these messages a second time)")

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
        others = sorted({r.kind for r in recs} - set("upFT"))
        if "F" not in fields:
            self.report.not_carried.append(f"queue msg {todo.name} (todo without an F record)")
            return None
        if others:
            self.report.notes.append(f"queue msg {todo.name}: todo records {''.join(others)} dropped "
                                     "(qmail-send ignores them too)")
        uid = int(fields["u"]) if fields.get("u", "").isdigit() else 0
        qp = int(fields["p"]) if fields.get("p", "").isdigit() else os.getpid()
        pending = self._new_mess(mess, qp, uid)
        msgid = pending.msgid
        pending.envelope = Envelope(fields["F"], rcpts)
        self.store.commit([pending])  # QueueStore removes what it created if this fails
        if pending.result != QQExit.OK:
            raise OSError(f"cannot queue a copy of {mess}: {pending.result!r}")
        owner = self.owners.role("queue")
        if owner is not None:
            os.chown(self.dst.todo(msgid), *owner)  # intd and todo are one inode
        return msgid

    def _import_preprocessed(self, mess: Path, info: Path, chans: dict[str, Path | None],
                             bounce: Path | None) -> int | None:
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


# ---------------------------------------------------------------- entry point


def import_qmail(qhome: Path, root: Path, force: bool = False) -> ImportReport:
    """Import the qmail installation at ``qhome`` into the eqmail instance at ``root``."""
    qhome = Path(qhome)
    inst = Instance(Path(root))
    if not (qhome / "control").is_dir() and not (qhome / "queue").is_dir():
        raise ImportRefused(f"{qhome} has neither control/ nor queue/: not a qmail installation")
    running = qmail_processes(qhome)
    if running:
        raise ImportRefused(f"qmail programs from {qhome}/bin are running ({', '.join(running)}): stop qmail first")
    send_fd = lock_qmail_send(qhome)
    pid_fd = lock_eqmail(inst)
    try:
        return _import_locked(qhome, inst, force)
    finally:
        os.close(pid_fd)
        if send_fd is not None:
            os.close(send_fd)


def _import_locked(qhome: Path, inst: Instance, force: bool) -> ImportReport:
    report = ImportReport()
    fresh = not (inst.control / "me").exists()
    if fresh:
        force = True  # nothing there yet but what set-up would write
    owners = Owners()
    plan = plan_controls(qhome, inst, force, owners, report)
    plan += plan_users(qhome, report)
    plan += plan_alias(qhome, owners, report)
    if fresh and not any(p.dest == "control/me" for p in plan):
        raise ImportRefused(f"{qhome}/control/me is missing and the instance is not set up: "
                            "run 'eqmailctl setup --me HOST' first")
    check_merged(inst, plan, force)
    for d in (inst.control, inst.users, inst.alias):
        d.mkdir(parents=True, exist_ok=True)
    apply_plan(inst, plan, force, report)
    if fresh or not inst.queue.is_dir():
        from eqmail.setup import setup_instance

        me = (inst.control / "me").read_text().split("\n", 1)[0].strip()
        report.notes += [f"setup: {x}" for x in setup_instance(inst.root, me=me, force=False)
                         if not x.startswith("kept")]
    advise_smtpd(qhome, report)
    if (qhome / "queue").is_dir():
        started = time.monotonic()
        QueueImporter(qhome, inst, owners, report).run()
        report.notes.append(f"queue imported in {time.monotonic() - started:.1f}s")
    return report
