"""What ``eqmailctl import-qmail`` carries over of a qmail installation's configuration.

Owns: reading qmail's control/, users/ and alias/ (and qmail-start's argument in ``rc``)
into a list of :class:`Planned` files, checking that eqmail would load the merged
control directory, and writing the plan into the instance (DESIGN §2, qmail-core §1):
- control files eqmail or its shipped plugins read (``control.known_file``, with
  ``tlshosts/`` and ``notlshosts/``); ``morercpthosts`` is regenerated from
  ``morercpthosts.cdb`` because that is what qmail-smtpd read.  Unknown files are
  listed, not copied.  An existing eqmail file is replaced only with ``--force``.
- ``users/assign``: qmail-lspawn reads only ``users/cdb``, so when the cdb exists the
  assign lines are regenerated from it (:func:`assign_from_users_cdb`); a differing
  assign source is reported.
- ``alias/.qmail-*``, owned by eqmail's alias user.
- ``defaultdelivery`` from qmail-start's first argument in ``rc`` when no
  ``control/defaultdelivery`` exists.
Also owns what the queue import (:mod:`eqmail.migrate.queue`) shares with it: the
:class:`ImportReport`, :class:`ImportRefused`, eqmail's owners for qmail's users
(:class:`Owners`) and the durable :func:`write_file`.

Privilege: root for a system instance (files get eqmail's owners, mapped from qmail's);
a private instance runs as its user.  Nothing in the qmail installation is changed.
Inputs: the qmail home, the eqmail :class:`~eqmail.instance.Instance`, ``--force``.
Outputs: files under the instance's control/, users/ and alias/; lines in the report.
Failure modes: :class:`ImportRefused` from :func:`check_merged` (nothing written) when
the merged control directory would not load; OSError from the file system.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from eqmail.cdb import CdbError, cdb_records
from eqmail.control import known_file, load_controls
from eqmail.delivery.hookcheck import import_fragment
from eqmail.errors import ControlErrors
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds
from eqmail.queue.writer import fsync_dir

# qmail's users and groups (conf-users, conf-groups) -> eqmail's roles (privsep.ids)
QMAIL_USER_ROLES = {"qmaild": "daemon", "qmailq": "queue", "qmails": "send", "qmailr": "remote",
                    "qmailp": "plugin", "qmaill": "log", "alias": "alias"}


class ImportRefused(Exception):
    """The import cannot run safely; nothing was changed."""


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False  # --dry-run: "imported" means "would be imported"

    def lines(self) -> list[str]:
        verb = "would import" if self.dry_run else "imported"
        out = [f"{verb} {x}" for x in self.imported]
        out += [f"not carried over: {x}" for x in self.not_carried]
        out += [f"note: {x}" for x in self.notes]
        return out


# ---------------------------------------------------------------- cdb


def read_cdb(path: Path) -> list[tuple[bytes, bytes]]:
    """Every record of a qmail cdb; a truncated or damaged file refuses the import with
    a message naming it (qmail would have failed lookups in it)."""
    try:
        return list(cdb_records(path.read_bytes()))
    except CdbError as e:
        raise ImportRefused(f"{path}: {e}: rebuild it with qmail's tools first") from None


def assign_from_users_cdb(data: bytes | list[tuple[bytes, bytes]]) -> list[str]:
    """users/assign lines (without the final ``.``) regenerated from qmail-newu's cdb.

    qmail-newu stores ``=local`` as key ``!local\\0`` and ``+prefix`` as ``!prefix``
    (both lowercased), the value being the six fields ``user uid gid home dash ext``
    NUL-separated; the empty key holds the wildcard characters, implied by the ``+``
    lines themselves."""
    lines = []
    for key, value in (cdb_records(data) if isinstance(data, bytes) else data):
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
    return known_file(name)


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
        if name == "beforemote" and src.is_file():
            plan += _plan_beforemote(src, owners, report)
            continue
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
        hosts = [k.decode("utf-8", "surrogateescape") for k, _ in read_cdb(mrh)]
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


def _plan_beforemote(src: Path, owners: Owners, report: ImportReport) -> list[Planned]:
    """eQmail sourced control/beforemote as a shell fragment; eqmail runs its lines as
    filter commands.  The stock fragment is dropped, a simple one translated, any other
    left behind with a warning (eqmail.delivery.hookcheck)."""
    result = import_fragment(src.read_bytes().decode("utf-8", "surrogateescape"))
    if result.commands is None:
        report.not_carried.append(result.note)
        return []
    report.notes.append(result.note)
    st = src.stat()
    data = "".join(c + "\n" for c in result.commands).encode("utf-8", "surrogateescape")
    return [Planned("control/beforemote", data, stat.S_IMODE(st.st_mode) & 0o7755, owners.mapped(st),
                    "translated from a qmail-bfrmt fragment")]


def plan_users(qhome: Path, report: ImportReport) -> list[Planned]:
    cdb, assign = qhome / "users" / "cdb", qhome / "users" / "assign"
    if cdb.exists():
        try:
            lines = assign_from_users_cdb(read_cdb(cdb))
        except ValueError as e:  # a well-formed cdb with entries qmail-newu never writes
            raise ImportRefused(f"{cdb}: {e}") from None
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


def apply_plan(inst: Instance, plan: list[Planned], force: bool, report: ImportReport,
               dry_run: bool = False) -> None:
    """Write the plan (or with ``dry_run`` only report what would be written)."""
    for item in plan:
        dest = inst.root / item.dest
        replaced = dest.exists()
        if replaced and dest.read_bytes() == item.data:
            report.imported.append(f"{item.dest} (same as eqmail's)")
            continue
        if replaced and not force:
            report.not_carried.append(f"{item.dest} (eqmail already has one; --force replaces it)")
            continue
        if not dry_run:
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
