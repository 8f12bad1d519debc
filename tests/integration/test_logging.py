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
from harness import Instance, free_port


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
