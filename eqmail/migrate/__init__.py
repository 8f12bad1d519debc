"""``eqmailctl import-qmail QMAILHOME``: take over a stopped qmail installation.

Owns: the import as a whole — the safety checks and locks, then the configuration
(:mod:`eqmail.migrate.plan`: control files, users/assign, alias/.qmail-*,
defaultdelivery from ``rc``), instance set-up when needed, then the queue
(:mod:`eqmail.migrate.queue`) — reading a qmail (netqmail 1.06 / eQmail 1.09)
installation and writing its configuration and its queue into an eqmail instance
(DESIGN §2, qmail-core §1, §6, §7).  Nothing in the qmail installation is changed.

Privilege: root for a system instance (files get eqmail's owners: mess/intd/todo
eqmailq, info/local/remote/bounce eqmails); a private instance runs as its user.
Inputs: QMAILHOME, the instance root, ``--force`` (replace existing eqmail files),
``--dry-run`` (the same checks and report, nothing written), a progress callback.
Outputs: an :class:`ImportReport` (imported / not carried over / notes).

Refuses (:class:`ImportRefused`, nothing written) when qmail-send or any program from
QMAILHOME/bin runs (``lock/sendmutex`` locked, or /proc), when the eqmail instance runs
(its pid-file lock), or when the merged control directory would not load.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from eqmail.cdb import cdb_get, cdb_hash, cdb_records
from eqmail.instance import Instance
from eqmail.migrate.plan import (
    QMAIL_USER_ROLES,
    ImportRefused,
    ImportReport,
    Owners,
    Planned,
    advise_smtpd,
    apply_plan,
    assign_from_users_cdb,
    check_merged,
    parse_rc_defaultdelivery,
    plan_alias,
    plan_controls,
    plan_users,
    write_file,
)
from eqmail.migrate.queue import CHUNK, IMPORT_RECORD, Progress, QueueImporter

__all__ = [
    "CHUNK", "IMPORT_RECORD", "QMAIL_USER_ROLES", "Progress", "ImportRefused", "ImportReport", "Owners",
    "Planned", "QueueImporter", "advise_smtpd", "apply_plan", "assign_from_users_cdb",
    "cdb_get", "cdb_hash", "cdb_records", "check_merged", "eqmail_stopped", "import_qmail", "lock_eqmail",
    "lock_qmail_send", "parse_rc_defaultdelivery", "plan_alias", "plan_controls", "plan_users",
    "qmail_processes", "write_file",
]


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


# ---------------------------------------------------------------- entry point


def eqmail_stopped(inst: Instance) -> None:
    """For a dry run: ImportRefused when eqmail runs, without creating run/ or the pid
    file (which :func:`lock_eqmail` would)."""
    try:
        fd = os.open(inst.pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).strip().decode(errors="replace")
        raise ImportRefused(f"eqmail is running (pid {pid}): run 'eqmailctl stop' first") from None
    finally:
        os.close(fd)


def import_qmail(qhome: Path, root: Path, force: bool = False, dry_run: bool = False,
                 progress: Progress | None = None) -> ImportReport:
    """Import the qmail installation at ``qhome`` into the eqmail instance at ``root``.

    With ``dry_run`` the same checks run and the report says what would be imported, but
    nothing is written anywhere (the locks taken are flocks on existing files only)."""
    qhome = Path(qhome)
    inst = Instance(Path(root))
    if not (qhome / "control").is_dir() and not (qhome / "queue").is_dir():
        raise ImportRefused(f"{qhome} has neither control/ nor queue/: not a qmail installation")
    running = qmail_processes(qhome)
    if running:
        raise ImportRefused(f"qmail programs from {qhome}/bin are running ({', '.join(running)}): stop qmail first")
    send_fd = lock_qmail_send(qhome)
    try:
        if dry_run:
            eqmail_stopped(inst)
            return _import_locked(qhome, inst, force, dry_run, progress)
        pid_fd = lock_eqmail(inst)
        try:
            return _import_locked(qhome, inst, force, dry_run, progress)
        finally:
            os.close(pid_fd)
    finally:
        if send_fd is not None:
            os.close(send_fd)


def _import_locked(qhome: Path, inst: Instance, force: bool, dry_run: bool,
                   progress: Progress | None) -> ImportReport:
    report = ImportReport(dry_run=dry_run)
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
    if dry_run:
        apply_plan(inst, plan, force, report, dry_run=True)
        if fresh or not inst.queue.is_dir():
            report.notes.append("setup: would create the instance's directories and queue "
                                "(eqmailctl setup) and keep the imported files")
        advise_smtpd(qhome, report)
        if (qhome / "queue").is_dir():
            QueueImporter(qhome, inst, owners, report, dry_run=True, progress=progress).run()
        report.notes.append("dry run: nothing was changed")
        return report
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
        QueueImporter(qhome, inst, owners, report, progress=progress).run()
        report.notes.append(f"queue imported in {time.monotonic() - started:.1f}s")
    return report
