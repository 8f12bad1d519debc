"""The one log stream: qmail's lines with timestamps, to a file or to syslog, and every
delivery traceable from the SMTP 250 to the Maildir by qp and message id; the stamp
formats of control/logformat read by the tools that read them (tai64nlocal, json.loads),
no stamp for the journal, and rotation by the real logrotate with the shipped config."""

from __future__ import annotations

import calendar
import gzip
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from harness import Instance, bin_path, free_port, poll

REPO = Path(__file__).resolve().parents[2]


def test_smtp_to_maildir_is_traceable_in_the_log_file() -> None:
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\n", extra_controls={"logfile": "log/mail.log"})
    try:
        inst.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.example")
            s.mail("sender@example.org")
            s.rcpt("testuser@mx.test.example")
            code, text = s.data(b"Subject: trace me\r\n\r\nbody\r\n")
        assert code == 250
        qp = re.fullmatch(rb"ok \d+ qp (\d+)", text).group(1).decode()  # type: ignore[union-attr]
        inst.wait_for_mail(1)
        inst.wait_queue_empty()
        log = (inst.root / "log" / "mail.log").read_text()
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} "
        assert re.search(stamp + r"qmail-smtpd: message accepted: sender@example.org from 127.0.0.1 "
                         r"to testuser@mx.test.example helo client.example\n", log), log
        info = re.search(stamp + rf"info msg (\d+): bytes \d+ from <sender@example.org> qp {qp} uid \d+\n", log)
        assert info, log
        msgid = info.group(1)
        start = re.search(stamp + rf"starting delivery (\d+): msg {msgid} to local testuser@mx.test.example\n", log)
        assert start, log
        assert re.search(stamp + rf"delivery {start.group(1)}: success: did 1\+0\+0/\n", log), log
        assert re.search(stamp + rf"end msg {msgid}\n", log), log
        assert re.search(stamp + rf"new msg {msgid}\n", log), log
    finally:
        inst.destroy()


@pytest.mark.skipif(os.path.exists("/dev/log") or os.geteuid() != 0,
                    reason="needs root and no system syslog socket to stand in for")
def test_logfile_syslog_sends_mail_facility_lines() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    os.chmod("/dev/log", 0o666)
    sock.settimeout(0.5)
    inst = Instance.create(extra_controls={"logfile": "syslog"})
    try:
        inst.start()
        proc = inst.sendmail(["-t"], b"To: testuser@mx.test.example\nSubject: s\n\nb\n")
        assert proc.returncode == 0
        inst.wait_for_mail(1)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(b"end msg" in g for g in got):
            try:
                got.append(sock.recv(8192))
            except TimeoutError:
                continue
        # <22> = facility mail (2) * 8 + severity info (6); tag eqmail[pid]
        assert any(re.match(rb"<22>.*eqmail\[\d+\]: new msg \d+", g) for g in got), got
        assert any(b"end msg" in g for g in got), got
    finally:
        inst.destroy()
        sock.close()
        Path("/dev/log").unlink(missing_ok=True)


def test_client_and_peer_strings_cannot_forge_log_lines() -> None:
    """HELO, envelope addresses and a remote server's text with CR, ESC, BEL and other
    controls: every log line stays one line, with no control byte in it."""
    from smtpsink import Script, SmtpSink

    # a "remote MTA" whose rejection tries to clear the screen and forge a log line
    peer = SmtpSink(Script(rcpt=lambda _addr: "550 no\x1b[2J\rdelivery 99: success: forged\x07"))
    peer_port = peer.listen("127.0.0.1")
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\n",
                           extra_controls={"logfile": "log/mail.log",
                                           "smtproutes": f"peer.example:[127.0.0.1]:{peer_port}\n",
                                           "rcpthosts": "mx.test.example\npeer.example\n"})
    try:
        inst.start()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"220 ")
            for line, code in ((b"HELO evil\x1b[31m\rqmail-smtpd: message accepted: forged", b"250"),
                               (b"MAIL FROM:<a\x1b]0;pwned\x07@mx.test.example>", b"250"),
                               (b"RCPT TO:<testuser@mx.test.example>", b"250"),
                               (b"RCPT TO:<someone@peer.example>", b"250"), (b"DATA", b"354"),
                               (b"Subject: x\r\n\r\nbody\r\n.", b"250"), (b"QUIT", b"221")):
                c.sendall(line + b"\r\n")
                assert f.readline().startswith(code + b" "), line
        inst.wait_for_mail(1)
        path = inst.root / "log" / "mail.log"
        poll(lambda: b"Remote host said" in path.read_bytes(), what="the remote failure logged")
        inst.wait_queue_empty()
        raw = path.read_bytes()
        bad = [ln for ln in raw.split(b"\n") if any(b < 0x20 or b == 0x7F for b in ln)]
        assert not bad, bad
        stamp = rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} "
        # the forged text is still there, inside the one line it came in
        assert re.search(stamp + rb"qmail-smtpd: message accepted: a_\]0;pwned_@mx.test.example from "
                         rb"127.0.0.1 to someone@peer.example helo evil_\[31m_qmail-smtpd: message "
                         rb"accepted: forged\n", raw), raw
        assert not re.search(stamp + rb"(qmail-smtpd: message accepted: forged|delivery 99)", raw), raw
        # qmail-remote's own rule for echoed text (unprintable -> ?) ran first
        assert re.search(stamp + rb"delivery \d+: failure: .*Remote host said: 550 no\?\[2Jdelivery 99: "
                         rb"success: forged\?/", raw), raw
    finally:
        inst.destroy()
        peer.stop()


# ------------------------------------------------------------------ control/logformat

TAI64N_LINE = re.compile(rb"@4000[0-9a-f]{20} [^\n]*")
LOCAL_STAMP = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} ")


def _deliver_one(inst: Instance, subject: str = "s") -> None:
    proc = inst.sendmail(["-t"], f"To: testuser@mx.test.example\nSubject: {subject}\n\nb\n".encode())
    assert proc.returncode == 0, proc


@pytest.mark.skipif(shutil.which("tai64nlocal") is None, reason="daemontools' tai64nlocal not installed")
def test_tai64n_log_is_read_by_tai64nlocal() -> None:
    inst = Instance.create(extra_controls={"logfile": "log/mail.log", "logformat": "tai64n"})
    t0 = time.time()
    try:
        inst.start()
        _deliver_one(inst)
        inst.wait_for_mail(1)
        inst.wait_queue_empty()
        inst.stop()
        raw = (inst.root / "log" / "mail.log").read_bytes()
    finally:
        inst.destroy()
    t1 = time.time()
    lines = raw.split(b"\n")[:-1]
    assert lines and all(TAI64N_LINE.fullmatch(ln) for ln in lines), raw  # the last lines too
    res = subprocess.run(["tai64nlocal"], input=raw, capture_output=True, timeout=10, check=True,
                         env=dict(os.environ, TZ="UTC"))
    text = res.stdout.decode()
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.\d{9} ", text, re.M)
    assert len(stamps) == len(lines), text
    for s in stamps:
        when = calendar.timegm(time.strptime(s, "%Y-%m-%d %H:%M:%S"))
        assert t0 - 2 <= when <= t1 + 2, (s, t0, t1)
    assert re.search(r"\.\d{9} new msg \d+\n", text), text
    assert re.search(r"\.\d{9} delivery \d+: success: ", text), text
    assert re.search(r"\.\d{9} status: eqmail stopped\n", text), text


def test_json_log_one_object_per_line_with_qmail_fields() -> None:
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\n",
                           extra_controls={"logfile": "log/mail.log", "logformat": "json"})
    try:
        inst.start()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"220 ")
            # invalid UTF-8, a quote and a backslash in what the client says
            for cmd in (b'HELO h\xff\xfe"q\\\r\n', b"MAIL FROM:<s\xe9@example.org>\r\n",
                        b"RCPT TO:<testuser@mx.test.example>\r\n", b"DATA\r\n"):
                c.sendall(cmd)
                assert f.readline()[:1] in (b"2", b"3")
            c.sendall(b"Subject: j\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            assert f.readline().startswith(b"250 ")
        inst.wait_for_mail(1)
        inst.wait_queue_empty()
        inst.stop()
        raw = (inst.root / "log" / "mail.log").read_bytes()
    finally:
        inst.destroy()
    from eqmail.logformat import JSON_FIELDS

    records = [json.loads(ln) for ln in raw.split(b"\n")[:-1]]
    for r in records:
        assert set(r) <= set(JSON_FIELDS) and {"time", "level", "text"} <= set(r), r
        datetime.fromisoformat(r["time"])
    accepted = [r for r in records if r.get("event") == "smtpd" and "message accepted" in r["text"]]
    assert accepted and accepted[0]["text"].endswith('helo h__"q\\'), accepted
    info = next(r for r in records if r.get("event") == "info msg")
    assert info["from"] == "s_@example.org" and isinstance(info["qp"], int), info
    start = next(r for r in records if r.get("event") == "starting delivery")
    assert start["msg"] == info["msg"] and start["channel"] == "local"
    assert start["to"] == "testuser@mx.test.example"
    done = next(r for r in records if r.get("event") == "delivery")
    assert done["delivery"] == start["delivery"] and done["status"] == "success", done
    assert any(r.get("event") == "end msg" and r["msg"] == info["msg"] for r in records)
    assert records[-1]["text"] == "status: eqmail stopped"  # written by the supervisor itself


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "other-stdout"])
def test_journal_stream_gets_no_timestamp(journal: bool) -> None:
    """Under systemd (stdout is the stream JOURNAL_STREAM names) the logger adds no
    stamp: journald has its own; each line starts with its priority (<6> info, <4>
    warning).  Any other stdout keeps the stamp."""
    inst = Instance.create()
    out_path = inst.root / "stdout"
    try:
        with open(out_path, "wb") as out:
            st = os.fstat(out.fileno())
            stream = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
            env = dict(os.environ, JOURNAL_STREAM=stream)
            proc = subprocess.Popen([bin_path("eqmailctl"), "--root", str(inst.root), "start", "--foreground"],
                                    stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
        inst.started = True
        poll(lambda: b"status: eqmail started" in out_path.read_bytes(), what="the start", inst=inst)
        _deliver_one(inst)
        inst.wait_for_mail(1)
        inst.stop()
        assert proc.wait(60) == 0
        lines = out_path.read_bytes().split(b"\n")[:-1]
    finally:
        inst.destroy()
    stamped = [ln for ln in lines if LOCAL_STAMP.match(ln)]
    assert b"status: eqmail stopped" in lines[-1]
    if journal:
        # no stamp; the syslog priority first, as journald reads it
        assert not stamped and b"<6>new msg " in b"\n".join(lines), lines
        assert all(re.match(rb"<[46]>", ln) for ln in lines), lines
    else:
        assert stamped == lines, lines


# ------------------------------------------------------------------ rotation


def _logrotate_conf(inst: Instance) -> Path:
    """The shipped init/eqmail.logrotate, pointed at this instance and this venv."""
    text = (REPO / "init" / "eqmail.logrotate").read_text()
    assert "postrotate" in text and "copytruncate" not in text.replace("No copytruncate", "")
    text = text.replace("/opt/eqmail/venv/bin/eqmailctl", bin_path("eqmailctl"))
    text = text.replace("/var/eqmail", str(inst.root))
    conf = inst.root / "logrotate.conf"
    conf.write_text(text)
    os.chmod(conf, 0o644)
    return conf


def _all_log_lines(log_dir: Path) -> dict[str, list[bytes]]:
    out = {}
    for p in sorted(log_dir.iterdir()):
        if p.name.startswith("mail.log"):
            data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
            out[p.name] = data.split(b"\n")[:-1]
    return out


@pytest.mark.skipif(shutil.which("logrotate") is None or os.geteuid() != 0,
                    reason="needs logrotate and root")
def test_logrotate_postrotate_reopens_the_log_and_nothing_is_lost() -> None:
    inst = Instance.create(extra_controls={"logfile": "log/mail.log"})
    conf = _logrotate_conf(inst)
    state = inst.root / "logrotate.state"
    errors: list[BaseException] = []
    try:
        inst.start()
        done = threading.Event()
        count = [0]

        def traffic() -> None:
            try:
                while not done.is_set() or count[0] < 10:
                    _deliver_one(inst, f"m{count[0]}")
                    count[0] += 1
                    time.sleep(0.02)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        t = threading.Thread(target=traffic)
        t.start()
        for _ in range(2):  # rotate twice while mail flows: mail.log.1 and mail.log.2.gz
            poll(lambda: b"end msg" in (inst.root / "log" / "mail.log").read_bytes(), what="a delivery logged",
                 inst=inst)
            res = subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)], capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
        done.set()
        t.join(120)
        assert not errors, errors
        sent = count[0]
        inst.wait_for_mail(sent)
        inst.wait_queue_empty()
        after = inst.ctl("status", "--json")
        assert json.loads(after.stdout)["log"]["reopens"] == 2
        size = (inst.root / "log" / "mail.log").stat().st_size
        _deliver_one(inst, "after")  # new lines go to the new file
        inst.wait_for_mail(sent + 1)
        inst.wait_queue_empty()
        tail = (inst.root / "log" / "mail.log").read_bytes()[size:]
        assert re.search(rb" new msg \d+\n.* end msg \d+\n", tail, re.S), tail
        inst.stop()
        files = _all_log_lines(inst.root / "log")
    finally:
        inst.destroy()
    assert set(files) == {"mail.log", "mail.log.1", "mail.log.2.gz"}, list(files)
    new, mid, old = files["mail.log"], files["mail.log.1"], files["mail.log.2.gz"]
    assert b"status: log reopened" in new[0] and b"status: log reopened" in mid[0], (new[0], mid[0])
    assert any(b"status: eqmail started" in ln for ln in old)
    # every message: one "new msg", "info msg", "delivery: success" and "end msg" in the
    # files together (message ids are inode numbers, reused: count the lines)
    every = b"\n".join(ln for name in ("mail.log.2.gz", "mail.log.1", "mail.log") for ln in files[name])
    for pattern in (rb" new msg \d+\n", rb" info msg \d+: bytes", rb" delivery \d+: success: ",
                    rb" end msg \d+\n"):
        assert len(re.findall(pattern, every + b"\n")) == sent + 1, (pattern, sent)
    assert sent >= 10 and all(b"new msg" in b"".join(f) for f in files.values())
    # order is kept: all of old precedes all of mid precedes all of new
    stamps = [[ln[:26] for ln in lines] for lines in (old, mid, new)]
    assert max(stamps[0]) <= min(stamps[1]) and max(stamps[1]) <= min(stamps[2])


def test_sigusr1_reopens_the_background_starts_log() -> None:
    """No control/logfile, background start: the log is log/eqmail.log, and SIGUSR1
    (what a postrotate script sends) moves the logger to a fresh file of that name."""
    inst = Instance.create()
    try:
        inst.start()
        log = inst.root / "log" / "eqmail.log"
        os.rename(log, inst.root / "log" / "eqmail.log.1")
        pid = inst.supervisor_pid()
        assert pid
        os.kill(pid, signal.SIGUSR1)
        poll(lambda: log.exists() and b"status: log reopened" in log.read_bytes(), what="the reopened log",
             inst=inst)
        if os.geteuid() == 0:
            import pwd

            assert log.stat().st_uid == pwd.getpwnam("eqmaill").pw_uid
            assert log.stat().st_mode & 0o777 == 0o640
        _deliver_one(inst)
        inst.wait_for_mail(1)
        poll(lambda: b"end msg" in log.read_bytes(), what="the delivery in the new file", inst=inst)
        old = (inst.root / "log" / "eqmail.log.1").read_bytes()
        assert b"status: eqmail started" in old and b"new msg" not in old
        # nothing holds the rotated file open (its space is freed once it is compressed)
        holders = [(pid, fd) for pid in inst.pids() for fd, target in _open_files(pid)
                   if target.endswith("/log/eqmail.log.1")]
        assert not holders, holders
    finally:
        inst.destroy()


def _open_files(pid: int) -> list[tuple[str, str]]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append((fd, os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            continue
    return out


def test_logfile_and_logformat_change_take_effect_at_reload() -> None:
    inst = Instance.create(extra_controls={"logfile": "log/a.log"})
    try:
        inst.start()
        _deliver_one(inst, "one")
        inst.wait_for_mail(1)
        inst.wait_queue_empty()
        inst.write_control("logfile", "log/b.log")
        inst.write_control("logformat", "json")
        res = inst.ctl("reload")
        assert re.match(r"eqmail: reload complete, generation \d+", res.stdout), res.stdout
        b_log = inst.root / "log" / "b.log"
        assert json.loads(b_log.read_bytes().split(b"\n")[0])["text"] == "status: log reopened"
        a_size = (inst.root / "log" / "a.log").stat().st_size
        _deliver_one(inst, "two")
        inst.wait_for_mail(2)
        inst.wait_queue_empty()
        poll(lambda: b'"event": "end msg"' in b_log.read_bytes(), what="the delivery in b.log", inst=inst)
        assert (inst.root / "log" / "a.log").stat().st_size == a_size
        # a log file that cannot be opened refuses the reload; the old one stays
        inst.write_control("logfile", "control/me/x.log")
        res = inst.ctl("reload", check=False)
        assert res.returncode == 1
        assert "control/logfile:1: cannot open" in res.stderr and "reload refused" in res.stderr, res.stderr
        _deliver_one(inst, "three")
        inst.wait_for_mail(3)
        poll(lambda: b_log.read_bytes().count(b'"event": "end msg"') == 2, what="b.log still used", inst=inst)
    finally:
        inst.destroy()


def test_a_restarted_logger_writes_to_the_reopened_file() -> None:
    inst = Instance.create(extra_controls={"logfile": "log/mail.log"})
    try:
        inst.start()
        log = inst.root / "log" / "mail.log"
        os.rename(log, inst.root / "log" / "mail.log.1")
        inst.ctl("reopen-logs")
        assert b"status: log reopened" in log.read_bytes()  # reopen-logs waited for it
        st = json.loads(inst.ctl("status", "--json").stdout)
        logger = next(w["pid"] for w in st["workers"] if w["kind"] == "logger")
        os.kill(logger, signal.SIGKILL)

        def restarted() -> bool:
            s = json.loads(inst.ctl("status", "--json").stdout)
            return any(w["kind"] == "logger" and w["state"] == "running" and w["pid"] != logger
                       for w in s["workers"])

        poll(restarted, 30, "the logger's restart", inst)
        _deliver_one(inst)
        inst.wait_for_mail(1)
        poll(lambda: b"end msg" in log.read_bytes(), what="the delivery in the current file", inst=inst)
        assert b"new msg" not in (inst.root / "log" / "mail.log.1").read_bytes()
    finally:
        inst.destroy()
