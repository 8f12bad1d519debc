"""eqmail run by a normal user, the way a developer runs the embedded instance: no
privilege change, every worker as that user, mail by SMTP and by eqmail-sendmail lands
in the user's Maildir.  (CI runs as root; this test becomes the user with runuser.)"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from harness import TEST_USER, bin_path, ensure_test_user, free_port, null_dns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")


def _as_user(*cmd: str, root: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["runuser", "-u", TEST_USER, "--", "env", f"EQMAIL_ROOT={root}", "HOME=/tmp",
                           *cmd], input=stdin, capture_output=True, timeout=120)


def _proc_uids(pid: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return tuple(int(x) for x in line.split()[1:])
    return ()


def test_normal_user_runs_its_own_instance() -> None:
    uid, gid = ensure_test_user()
    if not os.access(bin_path("eqmailctl"), os.X_OK):
        pytest.skip("no eqmailctl")
    root = Path(tempfile.mkdtemp(prefix="eqm-user-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    os.chown(root, uid, gid)
    port = free_port(("127.0.0.1",))
    try:
        ctl = bin_path("eqmailctl")
        setup = _as_user(ctl, "--root", str(root), "setup", "--me", "user.test.example", root=root)
        assert setup.returncode == 0, setup.stderr
        (root / "control" / "listen").write_text(f"smtp 127.0.0.1:{port}\n")
        (root / "control" / "dnsservers").write_text(f"127.0.0.1:{null_dns()}\n")
        home = root / "home"
        for sub in ("", "Maildir", "Maildir/new", "Maildir/cur", "Maildir/tmp"):
            (home / sub).mkdir(exist_ok=True)
        (root / "users" / "assign").write_text(f"=me:{TEST_USER}:{uid}:{gid}:{home}:::\n.\n")
        for path in [root / "control" / "listen", root / "users" / "assign", *home.rglob("*"), home]:
            os.chown(path, uid, gid)
        os.chmod(home, 0o755)
        start = _as_user(ctl, "--root", str(root), "start", root=root)
        assert start.returncode == 0, start.stderr + (root / "log" / "eqmail.log").read_bytes()
        pid = int((root / "run" / "eqmail.pid").read_text())
        # every process of the instance runs as the user
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        assert children
        for p in [pid, *map(int, children)]:
            assert set(_proc_uids(p)) == {uid}, (p, _proc_uids(p))
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("a@example.org", ["me@user.test.example"], b"Subject: by smtp\r\n\r\nhi\r\n")
        sent = _as_user(bin_path("eqmail-sendmail"), "-t", root=root,
                        stdin=b"To: me@user.test.example\nSubject: by sendmail\n\nhi\n")
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 20
        while len(list((home / "Maildir" / "new").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        files = [p.read_bytes() for p in (home / "Maildir" / "new").iterdir()]
        assert sorted(b"by smtp" in f for f in files) == [False, True], files
        assert all(os.stat(p).st_uid == uid for p in (home / "Maildir" / "new").iterdir())
        user = pwd.getpwuid(uid).pw_name
        assert any(f"invoked by uid {uid}".encode() in f for f in files), user
        stop = _as_user(ctl, "--root", str(root), "stop", root=root)
        assert stop.returncode == 0, stop.stderr
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)
