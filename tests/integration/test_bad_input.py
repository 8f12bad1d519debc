"""Bad input an admin or a user can produce: invalid control files, unknown users,
broken .qmail files, over-long addresses, a full disk.  eqmail must say what is wrong
in qmail's words, keep running where qmail keeps running, and lose no acknowledged mail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from harness import IS_ROOT, ME, Instance, dotqmail, poll, queue_files

from eqmail.queue.client import submit

pytestmark = pytest.mark.timeout(180)
TESTUSER = f"testuser@{ME}"


# ------------------------------------------------------------------ control files


def test_bad_databytes_refuses_start_and_check(instance: Instance) -> None:
    instance.write_control("databytes", "abc")
    proc = instance.ctl("start", check=False)
    assert proc.returncode != 0
    assert "control/databytes:1: not a number: 'abc'" in proc.stderr
    assert instance.supervisor_pid() is None or not os.path.exists(f"/proc/{instance.supervisor_pid()}")
    check = instance.ctl("check", check=False)
    assert check.returncode != 0
    assert "control/databytes:1: not a number: 'abc'" in check.stdout + check.stderr
    st = instance.ctl("status", check=False)
    assert st.returncode == 3
    # fixed: starts
    instance.write_control("databytes", "1000000")
    instance.start()
    assert "databytes: 1000000" in instance.ctl("check").stdout


def test_check_names_every_bad_or_unreadable_file(instance: Instance) -> None:
    instance.write_control("smtproutes", "# routes\nnocolon.example\n")
    instance.write_control("concurrencyremote", "lots")
    if not IS_ROOT:  # root reads anything: an unreadable file needs a normal user
        instance.write_control("badmailfrom", "x@y\n")
        os.chmod(instance.root / "control" / "badmailfrom", 0)
    proc = instance.ctl("check", check=False)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "control/smtproutes:2: missing ':'" in lines
    assert "control/concurrencyremote:1: not a number: 'lots'" in lines
    if not IS_ROOT:
        assert "control/badmailfrom:0: unreadable: Permission denied" in lines
    start = instance.ctl("start", check=False)
    assert start.returncode == 1 and "control/smtproutes:2: missing ':'" in start.stderr


def test_reload_with_a_bad_file_is_refused_and_the_daemon_keeps_delivering(running: Instance) -> None:
    running.write_control("databytes", "abc")
    proc = running.ctl("reload", check=False)
    assert proc.returncode == 1
    assert "control/databytes:1: not a number: 'abc'" in proc.stderr
    assert "reload refused" in proc.stderr
    s = json.loads(running.ctl("status", "--json").stdout)
    assert s["running"] and s["generation"] == 1
    # (the control watcher may have tried the edited file on its own: then status says so)
    assert s["last_reload"]["time"] is None or s["last_reload"]["ok"] is False
    # the running configuration still delivers (the queue client needs no control files)
    res = submit(running.root, TESTUSER, [TESTUSER], b"Subject: still here\n\nstill delivering\n")
    assert res.ok, res
    data = running.wait_for_mail(1)[0].read_bytes()
    assert data.endswith(b"still delivering\n")
    # a good file reloads
    running.write_control("databytes", "2000000")
    proc = running.ctl("reload")
    assert proc.returncode == 0
    poll(lambda: json.loads(running.ctl("status", "--json").stdout)["generation"] >= 2, what="reload",
         inst=running)


def test_sendmail_still_works_with_a_bad_unrelated_control_file(running: Instance) -> None:
    running.write_control("databytes", "abc")
    proc = running.sendmail(["-f", TESTUSER, TESTUSER], b"Subject: s\n\nx\n", tool="eqmail-inject")
    assert proc.returncode == 0, proc.stderr
    running.wait_for_mail(1)


# ------------------------------------------------------------------ .qmail and users


def test_blank_first_line_of_dotqmail_defers_and_keeps_the_message(running: Instance) -> None:
    dotqmail(running, ".qmail-blank", "\n./Maildir/\n")
    proc = running.sendmail(["-f", TESTUSER, f"testuser+blank@{ME}"], b"Subject: b\n\nkept\n", tool="eqmail-inject")
    assert proc.returncode == 0, proc.stderr
    poll(lambda: re.search(r"delivery \d+: deferral: Uh-oh: first line of .qmail file is blank. \(#4.2.1\)/",
                           running.log()), what="deferral", inst=running)
    assert running.maildir_files() == []
    s = json.loads(running.ctl("status", "--json").stdout)
    assert s["queue"]["messages"] == 1 and s["queue"]["local"] == 1
    assert "\tlocal\ttestuser+blank@mx.test.example" in running.ctl("queue", "list").stdout
    # the user fixes the file: the next try delivers
    dotqmail(running, ".qmail-blank", "./Maildir/\n")
    running.ctl("queue", "flush")
    assert running.wait_for_mail(1)[0].read_bytes().endswith(b"kept\n")
    running.wait_queue_empty()


def test_world_writable_dotqmail_defers(running: Instance) -> None:
    path = dotqmail(running, ".qmail-ww", "./Maildir/\n")
    os.chmod(path, 0o666)
    proc = running.sendmail([f"testuser+ww@{ME}"], b"Subject: w\n\nx\n", tool="eqmail-inject")
    assert proc.returncode == 0
    poll(lambda: "deferral: Uh-oh: .qmail file is writable. (#4.7.0)/" in running.log(), what="deferral",
         inst=running)
    assert running.maildir_files() == []


def test_unknown_user_is_a_permanent_failure(running: Instance) -> None:
    proc = running.sendmail(["-f", TESTUSER, f"nosuchuser@{ME}"], b"Subject: u\n\nx\n", tool="eqmail-inject")
    assert proc.returncode == 0
    bounce = running.wait_for_mail(1)[0].read_bytes()
    assert b"\n<nosuchuser@mx.test.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n" in bounce
    running.wait_queue_empty()


# ------------------------------------------------------------------ addresses


def test_over_long_recipient_is_refused_by_the_queue(running: Instance) -> None:
    rcpt = "x" * (1100 - len(ME) - 1) + "@" + ME
    assert len(rcpt) == 1100
    proc = running.sendmail([rcpt], b"Subject: long\n\nx\n", tool="eqmail-inject")
    assert proc.returncode == 100
    assert b"envelope address too long for qq (#5.1.3)" in proc.stderr
    assert proc.stderr == b"qmail-inject: fatal: envelope address too long for qq (#5.1.3)\n"
    assert queue_files(running) == []


def test_1002_byte_address_is_accepted(running: Instance) -> None:
    # qmail-queue takes an address of up to 1002 bytes (its NUL within 1003)
    dotqmail(running, ".qmail-default", "./Maildir/\n")
    rcpt = "testuser+" + "y" * (1002 - len("testuser+") - len(ME) - 1) + "@" + ME
    assert len(rcpt) == 1002
    res = submit(running.root, TESTUSER, [rcpt], b"Subject: edge\n\nx\n")
    assert res.ok, res
    res = submit(running.root, TESTUSER, ["z" + rcpt], b"Subject: edge\n\nx\n")
    assert res.code == 11 and res.text == "envelope address too long for qq (#5.1.3)"
    running.wait_for_mail(1)


# ------------------------------------------------------------------ disk full


@pytest.fixture
def small_queue() -> Iterator[Instance]:
    """An instance whose queue/ is a 2 MB tmpfs."""
    inst = Instance.create()
    queue = inst.root / "queue"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0750", "eqmail-test", str(queue)], check=True)
    try:
        inst.ctl("setup", "--me", ME)  # builds the queue tree on the new filesystem
        yield inst
    finally:
        inst.stop()
        inst.kill_all()
        subprocess.run(["umount", "-l", str(queue)], check=False)
        inst.destroy()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_disk_full(small_queue: Instance) -> None:
    inst = small_queue
    qm = dotqmail(inst, ".qmail-hold", "|exit 111\n")  # keep the messages in the queue
    inst.start()
    body = b"".join(b"%07d " % i + b"z" * 91 + b"\n" for i in range(1000))  # ~100 KB
    acked: list[str] = []
    failure = None
    for n in range(60):
        tag = uuid.uuid4().hex
        msg = f"Subject: fill {n} {tag}\n\n".encode() + body + f"END {tag}\n".encode()
        proc = inst.sendmail(["-f", TESTUSER, f"testuser+hold@{ME}"], msg, tool="eqmail-inject")
        if proc.returncode != 0:
            failure = proc
            break
        acked.append(tag)
    assert failure is not None, "the 2 MB queue never filled up"
    assert failure.returncode == 111, failure.stderr
    assert failure.stderr == b"qmail-inject: fatal: qq write error or disk full (#4.3.0)\n"
    assert 5 <= len(acked) < 20
    # the failed message left nothing: no pid/ file, no mess without todo
    files = queue_files(inst)
    assert not [f for f in files if f.startswith("pid/")]
    mess = {f.rsplit("/", 1)[1] for f in files if f.startswith("mess/")}
    known = {f.rsplit("/", 1)[1] for f in files if f.startswith(("info/", "todo/"))}
    assert mess <= known, (mess - known)
    # space comes back (the user fixes the .qmail, the messages go), everything acked arrives
    qm.write_text("./Maildir/\n")
    files = inst.flush_until_mail(len(acked))
    inst.wait_queue_empty(timeout=60)
    got = {}
    for f in files:
        data = f.read_bytes()
        m = re.search(rb"Subject: fill \d+ (\w+)\n", data)
        assert m, data[:300]
        tag = m.group(1).decode()
        assert data.endswith(body + f"END {tag}\n".encode()), f"{f} is truncated"
        got[tag] = data
    assert set(got) == set(acked)
    assert queue_files(inst) == []


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_disk_full_with_a_fill_file_and_recovery(small_queue: Instance) -> None:
    """The disk is full for another reason (a big file on it); messages that were
    acknowledged before are delivered once the space is back."""
    inst = small_queue
    qm = dotqmail(inst, ".qmail-hold", "|exit 111\n")
    inst.start()
    acked = []
    for n in range(3):
        tag = uuid.uuid4().hex
        proc = inst.sendmail(["-f", TESTUSER, f"testuser+hold@{ME}"],
                             f"Subject: pre {n} {tag}\n\nbody {tag}\n".encode(), tool="eqmail-inject")
        assert proc.returncode == 0, proc.stderr
        acked.append(tag)
    poll(lambda: inst.log().count("deferral") >= 3, what="three deferrals", inst=inst)
    fill = inst.root / "queue" / "fill"
    with open(fill, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    proc = inst.sendmail(["-f", TESTUSER, f"testuser+hold@{ME}"], b"Subject: no room\n\n" + b"q" * 200_000,
                         tool="eqmail-inject")
    assert proc.returncode == 111
    assert proc.stderr == b"qmail-inject: fatal: qq write error or disk full (#4.3.0)\n"
    fill.unlink()
    qm.write_text("./Maildir/\n")
    inst.ctl("queue", "flush")
    files = inst.wait_for_mail(3, timeout=30)
    inst.wait_queue_empty()
    assert {re.search(rb"body (\w+)\n$", f.read_bytes()).group(1).decode() for f in files} == set(acked)
    assert queue_files(inst) == []
    assert IS_ROOT
