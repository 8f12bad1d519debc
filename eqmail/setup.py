"""``eqmailctl setup``: make an instance (qmail's config-fast, hier.c and INSTALL.alias).

Creates control/ (me, locals, rcpthosts, defaultdomain, plusdomain, databytes, a
self-signed servercert.pem and dh2048.pem, srssecrets — the SRS secret, root 0600),
queue/ with qmail's layout including big-todo, users/, alias/ with the postmaster,
mailer-daemon and root aliases, run/ and log/ — and, when run as root, the system users
and groups of the privilege model, with qmail's ownerships and modes.  An existing
control file is never overwritten without ``--force`` (eQmail 1.09's config scripts
skip existing files too).  Idempotent: running it twice changes nothing.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from eqmail.certs import ensure_tls_files
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds, create_system_users
from eqmail.queue.layout import create_queue

DEFAULT_DATABYTES = 52428800  # 50 MB: finite on purpose (docs/compatibility.md)


def default_me() -> str:
    """This host's fully qualified name.  A name without a dot gets ``.localdomain``:
    qmail-inject appends defaultdomain to dotless hosts, so a bare ``me`` would never
    match itself in locals."""
    name = socket.getfqdn()
    if not name or name == "localhost":
        name = socket.gethostname()
    return name if "." in name else f"{name}.localdomain"


def _write_control(path: Path, text: str, force: bool, report: list[str]) -> None:
    if path.exists() and not force:
        report.append(f"kept {path}")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    report.append(f"wrote {path}")


def setup_instance(root: Path, me: str | None = None, force: bool = False) -> list[str]:
    inst = Instance(Path(root))
    report: list[str] = []
    is_root = os.geteuid() == 0
    inst.root.mkdir(parents=True, exist_ok=True)
    if is_root:
        report += [f"created {x}" for x in create_system_users(str(inst.alias))]
    ids = SystemIds.lookup()
    me = me or default_me()
    for d in (inst.control, inst.users, inst.run, inst.log):
        d.mkdir(exist_ok=True)
    os.chmod(inst.control, 0o755)
    os.chmod(inst.run, 0o755)
    controls = {
        "me": me,
        "locals": f"{me}\nlocalhost\n",
        "rcpthosts": f"{me}\nlocalhost\n",
        "defaultdomain": _parent_domain(me),
        "plusdomain": _parent_domain(me),
        "databytes": str(DEFAULT_DATABYTES),
    }
    for name, value in controls.items():
        _write_control(inst.control / name, value + ("" if value.endswith("\n") else "\n"), force, report)
    # A self-signed servercert.pem and dh2048.pem, as eQmail's ``make cert`` and
    # ``make tmprsadh`` (eqmail.certs); existing ones are kept unless --force.
    ensure_tls_files(inst.control, me, force, report)
    _make_srs_secret(inst.control / "srssecrets", report)
    owners = None
    if is_root:
        q, s = ids["queue"], ids["send"]
        owners = {"queue": (q.uid, q.gid), "send": (s.uid, s.gid)}
    create_queue(inst.queue, owners)
    _make_lock_files(inst, ids, is_root)
    _make_alias(inst, ids, is_root, force, report)
    if is_root:
        os.chown(inst.log, ids["log"].uid, ids["log"].gid)
    # TLS-RPT day files (eqmail.delivery.tlsrpt): remote delivery writes, everyone reads
    (inst.root / "tlsrpt").mkdir(exist_ok=True)
    os.chmod(inst.root / "tlsrpt", 0o755)
    if is_root:
        os.chown(inst.root / "tlsrpt", ids["remote"].uid, ids["remote"].gid)
    _make_sts_dir(inst.root / "sts", ids, is_root)
    report.append(f"instance ready at {inst.root}")
    return report


def _make_sts_dir(sts: Path, ids: SystemIds, is_root: bool) -> None:
    """The MTA-STS policy cache: the policy worker's (eqmailt) alone."""
    sts.mkdir(exist_ok=True)
    os.chmod(sts, 0o700)
    if is_root:
        os.chown(sts, ids["policy"].uid, ids["policy"].gid)


def _make_srs_secret(path: Path, report: list[str]) -> None:
    """control/srssecrets with one random secret (256 bits), readable by the instance's
    owner alone — root for a system instance: the supervisor reads it and hands the
    parsed value to the workers that forward, reverse and check (eqmail.srs).  Never
    replaced, not even with --force: a new secret would make every bounce to mail
    forwarded so far undeliverable; rotating is putting a new line first (the old one
    keeps verifying), which the admin does on purpose."""
    if path.exists():
        report.append(f"kept {path}")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and whatever a leftover tmp had
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    report.append(f"wrote {path}")


def _parent_domain(me: str) -> str:
    parts = me.split(".")
    return ".".join(parts[1:]) if len(parts) > 2 else me


def _make_lock_files(inst: Instance, ids: SystemIds, is_root: bool) -> None:
    lock = inst.queue / "lock"
    trigger = lock / "trigger"
    if not trigger.exists():
        os.mkfifo(trigger, 0o622)
    os.chmod(trigger, 0o622)
    mutex = lock / "sendmutex"
    mutex.touch(0o600, exist_ok=True)
    tcpto = lock / "tcpto"
    if not tcpto.exists():
        with open(tcpto, "wb") as f:
            f.write(b"\0" * 1024)
    os.chmod(tcpto, 0o644)
    if is_root:
        s, r = ids["send"], ids["remote"]
        os.chown(trigger, s.uid, s.gid)
        os.chown(mutex, s.uid, s.gid)
        os.chown(tcpto, r.uid, r.gid)


def _make_alias(inst: Instance, ids: SystemIds, is_root: bool, force: bool, report: list[str]) -> None:
    alias = inst.alias
    alias.mkdir(exist_ok=True)
    os.chmod(alias, 0o2755)
    maildir = alias / "Maildir"
    for sub in ("", "cur", "new", "tmp"):
        (maildir / sub).mkdir(exist_ok=True)
        os.chmod(maildir / sub, 0o700)
    for name in (".qmail-postmaster", ".qmail-mailer-daemon", ".qmail-root"):
        path = alias / name
        if path.exists() and not force:
            continue
        path.write_text("./Maildir/\n")
        os.chmod(path, 0o644)
        report.append(f"wrote {path}")
    if is_root:
        a = ids["alias"]
        for dirpath, _dirnames, filenames in os.walk(alias):
            os.chown(dirpath, a.uid, a.gid)
            for fn in filenames:
                os.chown(os.path.join(dirpath, fn), a.uid, a.gid)
        os.chmod(alias, 0o2755)
