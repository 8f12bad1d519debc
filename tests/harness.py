"""Test harness: real eqmail instances started the way an admin starts them.

An instance lives in a fresh world-traversable directory under /var/tmp (pytest's own
tmp_path is 0700 and the dropped worker users could not enter it).  Commands run as
subprocesses of the installed console scripts (``eqmailctl``, ``eqmail-sendmail``,
``eqmail-inject``) from the venv the test command uses.

When the tests run as root the instance is privileged (workers drop to the eqmail
system users) and the mailbox owner is the system user ``eqmtest``; otherwise every
process runs as the invoking user and users/assign maps the test addresses to it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(os.environ.get("EQMAIL_VENV", Path(sys.executable).parent.parent)) / "bin"
ME = "mx.test.example"
TEST_USER = "eqmtest"
IS_ROOT = os.geteuid() == 0

_null_dns_port: int | None = None


def null_dns() -> int:
    """The port of this test process's loopback DNS server that knows no names (every
    query is NXDOMAIN).  Every instance uses it unless a test gives control/dnsservers:
    no test may ask the machine's resolver (that would send queries off the machine)."""
    global _null_dns_port
    if _null_dns_port is None:
        from dnsserver import DnsServer

        _null_dns_port = DnsServer({}).start()
    return _null_dns_port


def bin_path(name: str) -> str:
    p = VENV_BIN / name
    return str(p) if p.exists() else name


def ensure_test_user(name: str = TEST_USER) -> tuple[int, int]:
    """(uid, gid) of the mailbox owner used by the tests."""
    if not IS_ROOT:
        return os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", f"/var/tmp/{name}-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def make_maildir(path: Path, uid: int, gid: int) -> None:
    for sub in ("", "cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(path / sub, 0o700)
        os.chown(path / sub, uid, gid)



def free_port(hosts: Sequence[str] = ("127.0.0.1", "::1"), attempts: int = 50) -> int:
    """A TCP port that is free on every address in ``hosts`` right now (bind port 0 on
    the first, then check the same number on the others), for control/listen lines
    such as ``smtp 127.0.0.1:PORT`` plus ``smtp [::1]:PORT``.  The listener binds what
    control/listen says, so the port is chosen here and released before the start."""
    import socket

    for _ in range(attempts):
        socks = []
        try:
            first = socket.socket(socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET)
            socks.append(first)
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            for host in hosts[1:]:
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                socks.append(s)
                s.bind((host, port))
            return port
        except OSError:
            continue  # taken on another address: try another number
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no port free on all of {hosts}")

@dataclass
class Instance:
    root: Path
    uid: int
    gid: int
    home: Path
    started: bool = False
    env: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, listen: str | None = "", extra_controls: dict[str, str] | None = None,
               assign_extra: Sequence[str] = ()) -> Instance:
        root = Path(tempfile.mkdtemp(prefix="eqm-test-", dir="/var/tmp"))
        os.chmod(root, 0o755)
        uid, gid = ensure_test_user()
        home = root / "home" / "testuser"
        home.mkdir(parents=True)
        os.chmod(root / "home", 0o755)
        os.chmod(home, 0o755)
        os.chown(home, uid, gid)
        make_maildir(home / "Maildir", uid, gid)
        inst = cls(root, uid, gid, home)
        inst.ctl("setup", "--me", ME)
        inst.write_control("dnsservers", f"127.0.0.1:{null_dns()}")
        if listen is not None:
            inst.write_control("listen", listen)
        for name, value in (extra_controls or {}).items():
            inst.write_control(name, value)
        assign = [f"=testuser:{TEST_USER if IS_ROOT else pwd.getpwuid(uid).pw_name}:{uid}:{gid}:{home}:::",
                  f"+testuser+:{TEST_USER if IS_ROOT else pwd.getpwuid(uid).pw_name}:{uid}:{gid}:{home}:-::",
                  *assign_extra, "."]
        (root / "users" / "assign").write_text("\n".join(assign) + "\n")
        return inst

    def write_control(self, name: str, value: str) -> None:
        path = self.root / "control" / name
        path.write_text(value if value.endswith("\n") or value == "" else value + "\n")

    def ctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([bin_path("eqmailctl"), "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"eqmailctl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}\n--- log:\n{self.log()}")
        return proc

    def start(self) -> None:
        self.ctl("start")
        self.started = True

    def stop(self) -> None:
        if self.started:
            self.ctl("stop", check=False)
            self.started = False

    def kill_all(self) -> None:
        """Whatever is left of this instance's processes (after a crash test)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        out = []
        marker = str(self.root).encode()
        sup = self.supervisor_pid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if marker in cmd or (sup and ppid == sup):
                out.append(int(entry))
        return out

    def supervisor_pid(self) -> int | None:
        try:
            return int((self.root / "run" / "eqmail.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def destroy(self) -> None:
        self.stop()
        self.kill_all()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- mail
    def sendmail(self, args: Sequence[str], message: bytes, tool: str = "eqmail-sendmail",
                 as_user: str | None = None) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, EQMAIL_ROOT=str(self.root), **self.env)
        cmd = [bin_path(tool), *args]
        if as_user is not None and IS_ROOT:
            cmd = ["runuser", "-u", as_user, "--", "env", f"EQMAIL_ROOT={self.root}", *cmd]
        return subprocess.run(cmd, input=message, capture_output=True, env=env, timeout=60)

    def maildir_files(self, maildir: Path | None = None) -> list[Path]:
        new = (maildir or self.home / "Maildir") / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def flush_until_mail(self, count: int, timeout: float = 60.0) -> list[Path]:
        """Flush the queue every 2 s until ``count`` messages are in the Maildir.

        A delivery that read a .qmail file before the test rewrote it can end in a
        deferral after one flush (qmail-send's ALRM, too, reschedules only what is
        waiting then); its retry would otherwise come by the schedule, minutes later."""
        deadline = time.monotonic() + timeout
        while len(self.maildir_files()) < count and time.monotonic() < deadline:
            self.ctl("queue", "flush")
            next_flush = time.monotonic() + 2
            while len(self.maildir_files()) < count and time.monotonic() < next_flush:
                time.sleep(0.05)
        return self.wait_for_mail(count, timeout=1)

    def wait_for_mail(self, count: int = 1, maildir: Path | None = None, timeout: float = 20.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.maildir_files(maildir)
            if len(files) >= count:
                return files
            time.sleep(0.05)
        raise AssertionError(f"expected {count} messages in {maildir or self.home / 'Maildir'}, "
                             f"found {len(self.maildir_files(maildir))}\n--- log:\n{self.log()}")

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # any() of each directory's entries: a bare iterdir() generator is always true
            if not any(any((self.root / "queue" / "mess" / str(i)).iterdir()) for i in range(23)):
                return
            time.sleep(0.05)
        raise AssertionError(f"queue not empty after {timeout}s\n--- log:\n{self.log()}")

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The log once ``pattern`` (a regex) is in it: the scanner logs ``end msg``
        after the mess file is gone, and every line passes the logger first."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if re.search(pattern, log) or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return (self.root / "log" / "eqmail.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alias_maildir(self) -> Path:
        return self.root / "alias" / "Maildir"


# ---------------------------------------------------------------- a qmail installation, by hand


def cdb_make(records: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A cdb file (djb's format, as cdbmake writes it): 2048-byte header of 256
    (pos, len) pairs, the records (klen, dlen, key, data), then 256 hash tables of
    (hash, pos) slots, each twice as long as its number of entries."""
    import struct

    def h(key: bytes) -> int:
        v = 5381
        for c in key:
            v = (((v << 5) + v) & 0xFFFFFFFF) ^ c
        return v

    body = bytearray()
    entries: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    for key, data in records:
        entries[h(key) & 255].append((h(key), 2048 + len(body)))
        body += struct.pack("<II", len(key), len(data)) + key + data
    header = bytearray()
    tables = bytearray()
    pos = 2048 + len(body)
    for lst in entries:
        n = 2 * len(lst)
        slots = [(0, 0)] * n
        for hv, rpos in lst:
            i = (hv >> 8) % n
            while slots[i][1]:
                i = (i + 1) % n
            slots[i] = (hv, rpos)
        header += struct.pack("<II", pos + len(tables), n)
        tables += b"".join(struct.pack("<II", *s) for s in slots)
    return bytes(header + body + tables)


@dataclass
class QmailTree:
    """A stopped qmail installation built from the documented layout (qmail-core §1.1):
    control/, users/, alias/, rc and queue/ with mess/ split 23 and todo/ + intd/ split
    (big-todo, eQmail) or flat (netqmail).  Message ids are the mess files' inodes."""

    home: Path
    big_todo: bool = True

    @classmethod
    def create(cls, big_todo: bool = True) -> QmailTree:
        home = Path(tempfile.mkdtemp(prefix="qmail-test-", dir="/var/tmp"))
        os.chmod(home, 0o755)
        for d in ("control", "users", "alias", "bin"):
            (home / d).mkdir()
        q = home / "queue"
        for name in ("pid", "mess", "intd", "todo", "info", "local", "remote", "bounce", "lock"):
            (q / name).mkdir(parents=True)
            split = name in ("mess", "info", "local", "remote") or (big_todo and name in ("intd", "todo"))
            for i in range(23 if split else 0):
                (q / name / str(i)).mkdir()
        (q / "lock" / "sendmutex").touch(0o600)
        return cls(home, big_todo)

    def write(self, rel: str, data: str | bytes, mode: int = 0o644) -> Path:
        path = self.home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(path, mode)
        return path

    def _qfile(self, name: str, msgid: int) -> Path:
        split = name in ("mess", "info", "local", "remote") or (self.big_todo and name in ("intd", "todo"))
        base = self.home / "queue" / name
        return base / str(msgid % 23) / str(msgid) if split else base / str(msgid)

    def add_mess(self, data: bytes) -> int:
        """qmail-queue's S2: a pid/ file linked to mess/<ino % 23>/<ino>."""
        tmp = self.home / "queue" / "pid" / f"{os.getpid()}.{time.time_ns()}.1"
        tmp.write_bytes(data)
        msgid = tmp.stat().st_ino
        os.link(tmp, self._qfile("mess", msgid))
        tmp.unlink()
        return msgid

    def add_todo(self, msgid: int, sender: str, rcpts: Sequence[str], uid: int = 0, pid: int = 4321,
                 intd: bool = True) -> None:
        data = f"u{uid}\0p{pid}\0F{sender}\0".encode() + b"".join(f"T{r}\0".encode() for r in rcpts)
        if intd:
            self._qfile("intd", msgid).write_bytes(data)
            os.link(self._qfile("intd", msgid), self._qfile("todo", msgid))
        else:
            self._qfile("todo", msgid).write_bytes(data)

    def add_intd(self, msgid: int, sender: str, rcpts: Sequence[str]) -> None:
        """qmail-queue's S3 (envelope written, never linked to todo)."""
        self._qfile("intd", msgid).write_bytes(
            f"u0\0p1\0F{sender}\0".encode() + b"".join(f"T{r}\0".encode() for r in rcpts))

    def add_info(self, msgid: int, sender: str, birth: float) -> None:
        p = self._qfile("info", msgid)
        p.write_bytes(f"F{sender}\0".encode())
        os.chmod(p, 0o600)
        os.utime(p, (birth, birth))

    def add_channel(self, msgid: int, channel: str, records: Sequence[tuple[bool, str]], next_try: float) -> None:
        """``records``: (done, address); done ones are ``D`` (qmail-send's done marker)."""
        p = self._qfile(channel, msgid)
        p.write_bytes(b"".join(f"{'D' if done else 'T'}{a}\0".encode() for done, a in records))
        os.chmod(p, 0o600)
        os.utime(p, (next_try, next_try))

    def add_bounce(self, msgid: int, text: str) -> None:
        self.write(f"queue/bounce/{msgid}", text, 0o600)

    def destroy(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------- shared helpers for fault tests

QUEUE_DIRS = ("pid", "mess", "intd", "todo", "info", "local", "remote", "bounce")


def poll(cond: Callable[[], object], timeout: float = 20.0, what: str = "condition",
         inst: Instance | None = None, interval: float = 0.05) -> object:
    """Call ``cond`` until it returns something true (returned) or ``timeout`` passes
    (AssertionError naming ``what``, with the instance's log when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"\n--- log:\n{inst.log()[-8000:]}" if inst else ""))
        time.sleep(interval)


def queue_files(inst: Instance) -> list[str]:
    """Every file in the instance's queue directories, relative to queue/ (lock/ aside)."""
    q = inst.root / "queue"
    out = []
    for name in QUEUE_DIRS:
        for dirpath, _dirs, files in os.walk(q / name):
            out += [os.path.relpath(os.path.join(dirpath, f), q) for f in files]
    return sorted(out)


def dotqmail(inst: Instance, name: str, text: str) -> Path:
    """A .qmail file in the test user's home, owned by them, mode 0644."""
    path = inst.home / name
    path.write_text(text)
    os.chmod(path, 0o644)
    os.chown(path, inst.uid, inst.gid)
    return path


def status(inst: Instance) -> dict[str, Any]:
    """``eqmailctl status --json`` of a running instance."""
    return json.loads(inst.ctl("status", "--json").stdout)


def proc_children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, cmdline) of the live (non-zombie) children of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append((int(entry), cmd))
    return out


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def proc_dead(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def worker_pids(inst: Instance, title: str) -> list[int]:
    """Pids of the supervisor's children whose process title starts with ``title``
    (``"eqmail: listener"``, ``"eqmail: queue writer"``...)."""
    sup = inst.supervisor_pid()
    if sup is None:
        return []
    return [pid for pid, cmd in proc_children(sup) if cmd.startswith(title.encode())]


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def parsed_controls(files: dict[str, str] | None = None, **changes: Any) -> Any:
    """A Controls as the supervisor parses it (eqmail.control.load_controls of a
    throw-away control/ with ``me`` and ``files``), with ``changes`` replaced: the
    table's defaults for everything else, so a test names only what it is about."""
    from dataclasses import replace

    from eqmail.control import load_controls

    root = Path(tempfile.mkdtemp(prefix="eqmail-controls-"))
    try:
        (root / "control").mkdir()
        (root / "users").mkdir()
        for name, text in {"me": "a.example\n", **(files or {})}.items():
            (root / name if name.startswith("users/") else root / "control" / name).write_text(text)
        return replace(load_controls(root), **changes)
    finally:
        shutil.rmtree(root)
