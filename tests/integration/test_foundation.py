"""The foundation end to end, as an admin runs it: eqmailctl start/stop/status, mail
injected with eqmail-sendmail / eqmail-inject, delivered by the real daemons into
Maildirs, mboxes, programs and forwards; bounces, loops, retries, privileges, crashes
of single workers and of the supervisor.

Asserts what the user sees: the bytes of delivered files, exit codes, log lines and
the output of eqmailctl.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from harness import IS_ROOT, ME, Instance, dotqmail, poll, status

pytestmark = pytest.mark.timeout(120)

DATE_RE = rb"\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}"
RECEIVED_RE = rb"Received: \(qmail \d+ invoked (by uid \d+|for bounce|by alias|from network)\); " + DATE_RE
TESTUSER = f"testuser@{ME}"


# ------------------------------------------------------------------ helpers


def send(inst: Instance, message: bytes, *args: str, tool: str = "eqmail-sendmail") -> None:
    res = inst.sendmail(list(args), message, tool=tool)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)


def worker(inst: Instance, kind: str) -> dict:
    return next(w for w in status(inst)["workers"] if w["kind"] == kind)


def proc_ids(pid: int) -> tuple[list[int], list[int]]:
    uids = gids = []
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uids = [int(x) for x in line.split()[1:]]
            elif line.startswith("Gid:"):
                gids = [int(x) for x in line.split()[1:]]
    return uids, gids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = data.partition(b"\n\n")
    return head.split(b"\n"), body


def queue_is_empty(inst: Instance) -> bool:
    q = inst.root / "queue"
    for name in ("mess", "todo", "intd", "info", "local", "remote"):
        if any(os.listdir(q / name / str(i)) for i in range(23)):
            return False
    return not os.listdir(q / "bounce")


# ------------------------------------------------------------------ injection -> Maildir


def test_sendmail_t_delivers_to_maildir_with_qmail_headers(running: Instance) -> None:
    msg = (b"From: Test Sender <testuser@mx.test.example>\n"
           b"To: testuser@mx.test.example\n"
           b"Bcc: testuser+bcc@mx.test.example\n"
           b"Subject: hello maildir\n"
           b"\n"
           b"line one\n"
           b"From the start\n"
           b".\n")
    dotqmail(running, ".qmail-bcc", "./Maildir/\n")
    send(running, msg, "-t", "-f", TESTUSER)
    files = running.wait_for_mail(2)
    copies = {f.read_bytes() for f in files}
    assert len(copies) == 2  # Delivered-To differs between the two
    by_dt = {}
    for data in copies:
        lines, body = split_message(data)
        assert lines[0] == b"Return-Path: <testuser@mx.test.example>"
        assert lines[1].startswith(b"Delivered-To: ")
        by_dt[lines[1]] = (lines, body)
        assert re.fullmatch(RECEIVED_RE, lines[2]), lines[2]
        assert b"From: Test Sender <testuser@mx.test.example>" in lines
        assert b"To: testuser@mx.test.example" in lines
        assert b"Subject: hello maildir" in lines
        assert not any(ln.lower().startswith(b"bcc:") for ln in lines)  # Bcc removed
        assert any(re.fullmatch(rb"Date: " + DATE_RE, ln) for ln in lines)
        assert any(re.fullmatch(rb"Message-ID: <\d{14}\.\d+\.qmail@mx\.test\.example>", ln) for ln in lines)
        assert body == b"line one\nFrom the start\n.\n"
    assert set(by_dt) == {b"Delivered-To: testuser@mx.test.example",
                          b"Delivered-To: testuser+bcc@mx.test.example"}
    running.wait_queue_empty()
    log = running.wait_log(r"end msg \d+")
    assert re.search(r"new msg \d+", log) and re.search(r"end msg \d+", log)
    assert re.search(r"delivery \d+: success: did 1\+0\+0/", log)


def test_inject_with_args_adds_from_date_message_id(running: Instance) -> None:
    running.env.update(QMAILUSER="injector", QMAILHOST=ME, QMAILNAME="The Injector")
    send(running, b"Subject: via inject\n\nbody\n", TESTUSER, tool="eqmail-inject")
    data = running.wait_for_mail(1)[0].read_bytes()
    lines, body = split_message(data)
    assert lines[:2] == [b"Return-Path: <injector@mx.test.example>",
                         b"Delivered-To: testuser@mx.test.example"]
    assert re.fullmatch(RECEIVED_RE, lines[2])
    assert b"Subject: via inject" in lines
    assert b'From: "The Injector" <injector@mx.test.example>' in lines
    # no To/Cc in the header: qmail-inject adds the "recipient list not shown" line
    assert b"Cc: recipient list not shown: ;" in lines
    assert body == b"body\n"


def test_inject_f_sets_the_envelope_sender(running: Instance) -> None:
    send(running, b"To: testuser@mx.test.example\n\nx\n", "-f", "boss@elsewhere.example", TESTUSER,
         tool="eqmail-inject")
    data = running.wait_for_mail(1)[0].read_bytes()
    assert data.startswith(b"Return-Path: <boss@elsewhere.example>\nDelivered-To: testuser@mx.test.example\n")


def test_postmaster_goes_to_the_alias_maildir(running: Instance) -> None:
    send(running, b"To: postmaster@mx.test.example\nSubject: pm\n\nhi\n", "-t")
    data = running.wait_for_mail(1, running.alias_maildir)[0].read_bytes()
    assert b"\nDelivered-To: postmaster@mx.test.example\n" in data
    assert data.endswith(b"\n\nhi\n")


# ------------------------------------------------------------------ mbox, programs, forwards


def test_mbox_delivery(running: Instance) -> None:
    dotqmail(running, ".qmail-mb", "./mbox\n")
    send(running, b"Subject: one\n\nFrom me\n>From you\nlast line without newline", "-f",
         "sender@x.example", f"testuser+mb@{ME}", tool="eqmail-inject")
    send(running, b"Subject: two\n\nsecond\n", "-f", "", f"testuser+mb@{ME}", tool="eqmail-inject")
    mbox = running.home / "mbox"
    poll(lambda: mbox.exists() and mbox.read_bytes().count(b"\nSubject: ") == 2, what="two mbox messages",
         inst=running)
    running.wait_queue_empty()
    data = mbox.read_bytes()
    assert os.stat(mbox).st_uid == running.uid and os.stat(mbox).st_mode & 0o777 == 0o600
    first, second = data.split(b"\n\nFrom ", 1)
    assert re.match(rb"From sender@x\.example \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n"
                    rb"Return-Path: <sender@x\.example>\n"
                    rb"Delivered-To: testuser\+mb@mx\.test\.example\n"
                    rb"Received: ", first), first[:200]
    assert first.endswith(b"\n\n>From me\n>>From you\nlast line without newline")
    assert re.match(rb"MAILER-DAEMON \w{3} .*\nReturn-Path: <>\nDelivered-To: testuser\+mb@", second)
    assert second.endswith(b"\n\nsecond\n\n")


def test_program_delivery_environment(running: Instance) -> None:
    dotqmail(running, ".qmail-prog", "# run a program\n|/usr/bin/env > prog.env; cat > prog.msg\n")
    send(running, b"Subject: prog\n\nprogram body\n", "-f", "who@sender.example",
         f"testuser+prog@{ME}", tool="eqmail-inject")
    envfile = running.home / "prog.env"
    poll(lambda: (running.home / "prog.msg").exists() and running.log().count("end msg") >= 1,
         what="program delivery", inst=running)
    env = dict(line.split("=", 1) for line in envfile.read_text().split("\n") if "=" in line)
    assert env["SENDER"] == "who@sender.example"
    assert env["NEWSENDER"] == "who@sender.example"
    assert env["RECIPIENT"] == f"testuser+prog@{ME}"
    assert env["LOCAL"] == "testuser+prog"
    assert env["HOST"] == ME
    assert (env["HOST2"], env["HOST3"], env["HOST4"]) == ("mx.test", "mx", "mx")
    assert env["EXT"] == "prog" and env["EXT2"] == ""
    assert env["HOME"] == str(running.home)
    # DTLINE/RPLINE end with a newline, so the next "line" of env's output is empty
    assert env["DTLINE"] == f"Delivered-To: testuser+prog@{ME}"
    assert env["RPLINE"] == "Return-Path: <who@sender.example>"
    assert "DEFAULT" not in env
    assert env["UFLINE"].startswith("From who@sender.example ")
    msg = (running.home / "prog.msg").read_bytes()
    assert re.match(RECEIVED_RE + rb"\n", msg)  # no Return-Path / Delivered-To for programs
    assert msg.endswith(b"\n\nprogram body\n")
    if IS_ROOT:
        assert os.stat(envfile).st_uid == running.uid
    assert re.search(r"delivery \d+: success: did 0\+0\+1/", running.log())


def test_extension_default_file(running: Instance) -> None:
    dotqmail(running, ".qmail-lists-default", "|/usr/bin/env > default.env\n")
    send(running, b"Subject: d\n\nx\n", f"testuser+lists-Foo.Bar@{ME}", tool="eqmail-inject")
    envfile = running.home / "default.env"
    poll(envfile.exists, what="default delivery", inst=running)
    running.wait_queue_empty()
    env = dict(line.split("=", 1) for line in envfile.read_text().split("\n") if "=" in line)
    assert env["EXT"] == "lists-Foo.Bar"
    assert env["EXT2"] == "Foo.Bar"
    assert env["DEFAULT"] == "Foo.Bar"


def test_forward(running: Instance) -> None:
    dotqmail(running, ".qmail-fwd", f"&testuser+target@{ME}\n")
    dotqmail(running, ".qmail-target", "./Maildir/\n")
    send(running, b"Subject: fwd\n\nforwarded body\n", "-f", "orig@x.example", f"testuser+fwd@{ME}",
         tool="eqmail-inject")
    data = running.wait_for_mail(1)[0].read_bytes()
    running.wait_queue_empty()
    lines, body = split_message(data)
    # the forward keeps the sender and adds the first Delivered-To above the new Received line
    assert lines[0] == b"Return-Path: <orig@x.example>"
    assert lines[1] == b"Delivered-To: testuser+target@mx.test.example"
    assert re.fullmatch(RECEIVED_RE, lines[2])
    assert lines[3] == b"Delivered-To: testuser+fwd@mx.test.example"
    assert re.fullmatch(RECEIVED_RE, lines[4])
    assert body == b"forwarded body\n"
    assert re.search(r"success: did 0\+1\+0/qp \d+/", running.log())


# ------------------------------------------------------------------ bounces


BOUNCE_INTRO = (
    b"Hi. This is the qmail-send program at mx.test.example.\n"
    b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
    b"\n"
)


def test_unknown_user_bounces_to_sender(running: Instance) -> None:
    send(running, b"Subject: to nobody\n\noriginal body\n", "-f", TESTUSER, f"nosuchuser@{ME}",
         tool="eqmail-inject")
    data = running.wait_for_mail(1)[0].read_bytes()
    running.wait_queue_empty()
    lines, body = split_message(data)
    assert lines[0] == b"Return-Path: <>"
    assert lines[1] == b"Delivered-To: testuser@mx.test.example"
    assert re.fullmatch(RECEIVED_RE, lines[2]) and b" invoked for bounce); " in lines[2], lines[2]
    assert re.fullmatch(rb"Date: " + DATE_RE, lines[3])
    assert lines[4:] == [b"From: MAILER-DAEMON@mx.test.example", b"To: testuser@mx.test.example",
                         b"Subject: failure notice"]
    assert body.startswith(
        BOUNCE_INTRO
        + b"<nosuchuser@mx.test.example>:\n"
        b"Sorry, no mailbox here by that name. (#5.1.1)\n"
        b"\n"
        b"--- Below this line is a copy of the message.\n"
        b"\n"
        b"Return-Path: <testuser@mx.test.example>\n"
        b"Received: (qmail ")
    assert body.endswith(b"\nSubject: to nobody\n\noriginal body\n")
    assert re.search(r"delivery \d+: failure: " + re.escape("Sorry, no mailbox here by that name. (#5.1.1)/"),
                     running.log())
    assert re.search(r"bounce msg \d+ qp \d+", running.log())


def test_bounce_of_a_bounce_is_a_double_bounce_to_postmaster(running: Instance) -> None:
    send(running, b"Subject: doomed\n\nbody\n", "-f", f"nosuchsender@{ME}", f"nosuchuser@{ME}",
         tool="eqmail-inject")
    data = running.wait_for_mail(1, running.alias_maildir)[0].read_bytes()
    running.wait_queue_empty()
    lines, body = split_message(data)
    assert lines[0] == b"Return-Path: <#@[]>"
    assert lines[1] == b"Delivered-To: postmaster@mx.test.example"
    assert lines[-3:] == [b"From: MAILER-DAEMON@mx.test.example", b"To: postmaster@mx.test.example",
                          b"Subject: failure notice"]
    assert body.startswith(
        b"Hi. This is the qmail-send program at mx.test.example.\n"
        b"I tried to deliver a bounce message to this address, but the bounce bounced!\n"
        b"\n"
        b"<nosuchsender@mx.test.example>:\n"
        b"Sorry, no mailbox here by that name. (#5.1.1)\n"
        b"\n"
        b"--- Below this line is the original bounce.\n"
        b"\n"
        b"Return-Path: <>\n"
        b"Received: (qmail ")
    # the original bounce follows, with its own copy of the message
    assert BOUNCE_INTRO + b"<nosuchuser@mx.test.example>:\n" in body
    assert body.endswith(b"\nReturn-Path: <nosuchsender@mx.test.example>\n" + body.split(
        b"\nReturn-Path: <nosuchsender@mx.test.example>\n", 1)[1])
    assert body.endswith(b"Subject: doomed\n\nbody\n")
    assert running.maildir_files() == []


def test_failed_double_bounce_is_discarded(instance: Instance) -> None:
    instance.write_control("doublebounceto", "nosuchpostmaster")
    instance.start()
    send(instance, b"Subject: doomed\n\nbody\n", "-f", f"nosuchsender@{ME}", f"nosuchuser@{ME}",
         tool="eqmail-inject")
    poll(lambda: re.search(r"triple bounce: discarding bounce/\d+", instance.log()), what="triple bounce",
         inst=instance)
    instance.wait_queue_empty()
    assert instance.maildir_files() == [] and instance.maildir_files(instance.alias_maildir) == []
    assert queue_is_empty(instance)


def test_mail_loop_bounces(running: Instance) -> None:
    dotqmail(running, ".qmail-loop", f"&testuser+loop@{ME}\n")
    send(running, b"Subject: loop\n\nround and round\n", "-f", TESTUSER, f"testuser+loop@{ME}",
         tool="eqmail-inject")
    data = running.wait_for_mail(1)[0].read_bytes()
    running.wait_queue_empty()
    _, body = split_message(data)
    assert body.startswith(BOUNCE_INTRO + b"<testuser+loop@mx.test.example>:\n"
                           b"This message is looping: it already has my Delivered-To line. (#5.4.6)\n"
                           b"\n--- Below this line is a copy of the message.\n\n"
                           b"Return-Path: <testuser@mx.test.example>\n")
    assert b"\nDelivered-To: testuser+loop@mx.test.example\n" in body
    assert body.endswith(b"round and round\n")


# ------------------------------------------------------------------ temporary failure and retry


def test_temporary_failure_stays_queued_and_is_retried_on_flush(running: Instance) -> None:
    qm = dotqmail(running, ".qmail-tmp", "|echo not now; exit 111\n")
    send(running, b"Subject: later\n\nretry me\n", "-f", TESTUSER, f"testuser+tmp@{ME}", tool="eqmail-inject")
    poll(lambda: "deferral: not now/" in running.log(), what="deferral", inst=running)
    listing = running.ctl("queue", "list").stdout
    assert re.search(r"#\d+  \d+  <testuser@mx\.test\.example> \n\tlocal\ttestuser\+tmp@mx\.test\.example\n",
                     listing), listing
    q = status(running)["queue"]
    assert q["messages"] == 1 and q["todo"] == 0 and q["local"] == 1
    assert "messages in queue: 1\n" in running.ctl("queue", "stat").stdout
    # fix the .qmail, then ask for an immediate retry (qmail: SIGALRM to qmail-send)
    qm.write_text("./Maildir/\n")
    out = running.ctl("queue", "flush").stdout
    assert "flush" in out
    data = running.wait_for_mail(1)[0].read_bytes()
    assert data.startswith(b"Return-Path: <testuser@mx.test.example>\nDelivered-To: testuser+tmp@")
    running.wait_queue_empty()
    assert running.log().count("deferral: not now/") == 1


# ------------------------------------------------------------------ processes and status

FOUNDATION_TITLES = {"logger": "eqmail: logger", "queuewriter": "eqmail: queue writer",
                     "local": "eqmail: local delivery", "scanner": "eqmail: scanner"}
# qmail-core §7 / DESIGN §1: who each worker runs as (user, primary group)
WORKER_IDS = {"logger": ("eqmaill", "nofiles"), "queuewriter": ("eqmailq", "eqmail"),
              "scanner": ("eqmails", "eqmail"), "remote": ("eqmailr", "eqmail"),
              "listener": ("eqmaild", "nofiles"), "policy": ("eqmailt", "nofiles")}


def test_status_json(running: Instance) -> None:
    proc = running.ctl("status", "--json")
    assert proc.returncode == 0
    s = json.loads(proc.stdout)
    assert s["running"] is True and s["pid"] == running.supervisor_pid()
    assert s["generation"] == 1 and s["listeners"] == []
    assert {"messages", "todo"} <= set(s["queue"])
    kinds = {w["kind"] for w in s["workers"]}
    assert FOUNDATION_TITLES.keys() <= kinds  # (listeners, remote, watcher... may come on top)
    for w in s["workers"]:
        assert {"kind", "pid", "uid", "state", "title"} <= set(w)
        assert w["state"] == "running" and w["pid"] > 0 and alive(w["pid"])
        assert w["title"].startswith("eqmail: ")
    titles = {w["kind"]: w["title"] for w in s["workers"] if w["kind"] in FOUNDATION_TITLES}
    assert titles == FOUNDATION_TITLES
    text = running.ctl("status").stdout
    assert text.startswith(f"eqmail: running, pid {s['pid']}")


def test_delivery_side_runs_at_a_lower_cpu_priority(running: Instance) -> None:
    # receiving first: the scanner and the delivery workers (and what they start) are
    # niced by 5, the listeners and the queue writer are not
    def nice(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])

    base = nice(running.supervisor_pid())
    got = {w["kind"]: nice(w["pid"]) - base for w in status(running)["workers"]}
    assert got["scanner"] == got["local"] == got["remote"] == 5, got
    assert got["queuewriter"] == got["logger"] == 0, got
    assert all(v == 0 for k, v in got.items() if k == "listener"), got
    # and every worker ignores SIGIO: a file lease of the spare pools (queue/recycle.py)
    # broken by someone opening the file must not kill the queue writer or the scanner
    for w in status(running)["workers"]:
        with open(f"/proc/{w['pid']}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGIO - 1)), w
    dotqmail(running, ".qmail-nice", "|cut -d' ' -f19 /proc/self/stat > nice.out\n")
    send(running, b"Subject: nice\n\nx\n", f"testuser+nice@{ME}", tool="eqmail-inject")
    out = running.home / "nice.out"
    # the shell creates the file before cut has written to it
    text = poll(lambda: out.exists() and out.read_text().strip(), what="program output", inst=running)
    assert int(str(text)) - base == 5


@pytest.mark.skipif(not IS_ROOT, reason="needs root: real uid changes")
def test_worker_privileges(running: Instance) -> None:
    import grp
    import pwd

    s = status(running)
    for w in s["workers"]:
        uids, gids = proc_ids(w["pid"])
        if w["kind"] == "local":
            assert uids == [0, 0, 0, 0]  # qmail-lspawn: root, only to switch to the recipient
            continue
        assert 0 not in uids, w  # nothing else keeps root
        if w["kind"] not in WORKER_IDS:
            continue
        user, group = WORKER_IDS[w["kind"]]
        assert uids == [pwd.getpwnam(user).pw_uid] * 4, w
        assert gids == [grp.getgrnam(group).gr_gid] * 4, w
        assert w["uid"] == uids[0]
        with open(f"/proc/{w['pid']}/status") as f:
            groups = next(line for line in f if line.startswith("Groups:")).split()[1:]
        assert [int(g) for g in groups] == [grp.getgrnam(group).gr_gid]
    # a delivery child runs as the recipient, never as root
    dotqmail(running, ".qmail-who", "|id -u > who.uid; id -g > who.gid\n")
    send(running, b"Subject: who\n\nx\n", f"testuser+who@{ME}", tool="eqmail-inject")
    who_gid = running.home / "who.gid"
    # the shell creates the file before id writes into it: wait for its content
    poll(lambda: who_gid.exists() and who_gid.read_text().endswith("\n"), what="program output",
         inst=running)
    assert (running.home / "who.uid").read_text().strip() == str(running.uid)
    assert (running.home / "who.gid").read_text().strip() == str(running.gid)
    local_pid = worker(running, "local")["pid"]
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == local_pid]
    assert children, "the delivery child should stay for reuse"
    for pid in children:
        uids, gids = proc_ids(pid)
        assert uids == [running.uid] * 4 and 0 not in uids
        assert gids == [running.gid] * 4
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().startswith(f"eqmail: local delivery for uid {running.uid}".encode())
    # the queue files belong to the queue user, the alias Maildir to alias
    mess = running.root / "queue" / "mess"
    assert os.stat(mess).st_uid == pwd.getpwnam("eqmailq").pw_uid
    assert os.stat(running.root / "queue" / "info").st_uid == pwd.getpwnam("eqmails").pw_uid


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_stop_is_graceful_and_leaves_an_empty_queue(running: Instance) -> None:
    for i in range(5):
        send(running, f"Subject: m{i}\n\nbody {i}\n".encode(), TESTUSER, tool="eqmail-inject")
    pids = [w["pid"] for w in status(running)["workers"]]
    sup = running.supervisor_pid()
    proc = running.ctl("stop")
    running.started = False
    assert proc.stdout.strip() == "eqmail: stopped"
    assert len(running.maildir_files()) == 5
    assert queue_is_empty(running)
    assert not any(alive(p) for p in [*pids, sup])
    assert "status: eqmail stopped" in running.log()
    st = running.ctl("status", check=False)
    assert st.returncode == 3 and "not running" in st.stdout
    assert running.ctl("stop").stdout.strip() == "eqmail: not running"


def test_start_twice_is_refused(running: Instance) -> None:
    proc = running.ctl("start", check=False)
    assert proc.returncode == 1 and "already running" in proc.stderr


@pytest.mark.slow
def test_kill_9_of_the_supervisor_leaves_no_worker_and_restart_works(running: Instance) -> None:
    send(running, b"Subject: before\n\nx\n", TESTUSER, tool="eqmail-inject")
    running.wait_for_mail(1)
    pids = [w["pid"] for w in status(running)["workers"]]
    local_pid = worker(running, "local")["pid"]
    pids += [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == local_pid]
    sup = running.supervisor_pid()
    assert sup is not None
    os.kill(sup, signal.SIGKILL)
    poll(lambda: not any(alive(p) for p in [sup, *pids]), timeout=15, what="every worker gone")
    st = running.ctl("status", check=False)
    assert st.returncode in (3, 4) and not json.loads(running.ctl("status", "--json", check=False).stdout)["running"]
    running.start()
    assert status(running)["running"]
    send(running, b"Subject: after\n\nx\n", TESTUSER, tool="eqmail-inject")
    running.wait_for_mail(2)
    running.wait_queue_empty()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["scanner", "queuewriter", "local", "logger"])
def test_killed_worker_is_restarted(running: Instance, kind: str) -> None:
    old = worker(running, kind)["pid"]
    os.kill(old, signal.SIGKILL)

    def restarted() -> dict | None:
        w = worker(running, kind)
        return w if w["pid"] not in (0, old) and w["state"] == "running" else None

    w = poll(restarted, timeout=20, what=f"{kind} restarted", inst=running)
    assert isinstance(w, dict) and w["restarts"] == 1 and w["title"] == FOUNDATION_TITLES[kind]
    assert re.search(rf"alert: .* \(pid {old}\) exited with -9; restarting in 0s", running.log()) or kind == "logger"
    send(running, f"Subject: after {kind}\n\nx\n".encode(), TESTUSER, tool="eqmail-inject")
    running.wait_for_mail(1)
    running.wait_queue_empty()
