"""The one log stream: qmail's lines with timestamps, to a file or to syslog, and every
delivery traceable from the SMTP 250 to the Maildir by qp and message id."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import time
from pathlib import Path

import pytest
from harness import Instance, free_port, poll


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


def _hostile_peer(port_box: list[int]) -> socket.socket:
    """A 'remote MTA' whose every reply text carries terminal escapes and a CR."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port_box.append(srv.getsockname()[1])
    return srv


def _serve_hostile(srv: socket.socket) -> None:
    import threading

    def one(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            conn.sendall(b"220 peer.example ESMTP\r\n")
            while line := f.readline(4096):
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250 peer.example\r\n")
                elif verb == b"MAIL":
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"RCPT":
                    # a rejection whose text tries to clear the screen and forge a log line
                    conn.sendall(b"550 no\x1b[2J\rdelivery 99: success: forged\x07\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def test_client_and_peer_strings_cannot_forge_log_lines() -> None:
    """HELO, envelope addresses and a remote server's text with CR, ESC, BEL and other
    controls: every log line stays one line, with no control byte in it."""
    box: list[int] = []
    srv = _hostile_peer(box)
    _serve_hostile(srv)
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\n",
                           extra_controls={"logfile": "log/mail.log",
                                           "smtproutes": f"peer.example:[127.0.0.1]:{box[0]}\n",
                                           "rcpthosts": "mx.test.example\npeer.example\n"})
    try:
        inst.start()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"220 ")
            c.sendall(b"HELO evil\x1b[31m\rqmail-smtpd: message accepted: forged\r\n")
            assert f.readline().startswith(b"250 ")
            c.sendall(b"MAIL FROM:<a\x1b]0;pwned\x07@mx.test.example>\r\n")
            assert f.readline().startswith(b"250 ")
            c.sendall(b"RCPT TO:<testuser@mx.test.example>\r\n")
            assert f.readline().startswith(b"250 ")
            c.sendall(b"RCPT TO:<someone@peer.example>\r\n")
            assert f.readline().startswith(b"250 ")
            c.sendall(b"DATA\r\n")
            assert f.readline().startswith(b"354 ")
            c.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            assert f.readline().startswith(b"250 ")
            c.sendall(b"QUIT\r\n")
            f.readline()
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
        srv.close()
