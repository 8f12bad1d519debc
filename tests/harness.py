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

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(os.environ.get("EQMAIL_VENV", Path(sys.executable).parent.parent)) / "bin"
ME = "mx.test.example"
TEST_USER = "eqmtest"
IS_ROOT = os.geteuid() == 0


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
            if not any((self.root / "queue" / "mess" / str(i)).iterdir() for i in range(23)):
                return
            time.sleep(0.05)
        raise AssertionError(f"queue not empty after {timeout}s\n--- log:\n{self.log()}")

    def log(self) -> str:
        try:
            return (self.root / "log" / "eqmail.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alias_maildir(self) -> Path:
        return self.root / "alias" / "Maildir"
