"""eqmailctl queue delete / bounce and the live parts of eqmailctl status, on a running
instance: a message that keeps deferring is removed by the postmaster, with or without
a bounce; status shows open SMTP sessions per listener and messages being delivered."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
from harness import Instance, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scanner's admin socket is root-only")


def _deferred_message(inst: Instance, subject: str) -> int:
    """Queue a message for testuser+defer (a .qmail program that exits 111); its id."""
    dot = inst.home / ".qmail-defer"
    dot.write_text("|exit 111\n")
    os.chown(dot, inst.uid, inst.gid)
    msg = f"To: testuser+defer@mx.test.example\nSubject: {subject}\n\nplease defer\n".encode()
    proc = inst.sendmail(["-f", "testuser@mx.test.example", "-t"], msg)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.findall(r"delivery \d+: deferral", inst.log())
        listing = inst.ctl("queue", "list").stdout
        ids = re.findall(r"#(\d+)", listing)
        if found and ids:
            return int(ids[-1])
        time.sleep(0.05)
    raise AssertionError("no deferral\n" + inst.log())


def test_bounce_removes_the_message_and_tells_the_sender(running: Instance) -> None:
    msgid = _deferred_message(running, "to be bounced")
    out = running.ctl("queue", "bounce", str(msgid)).stdout
    assert out == f"eqmail: msg {msgid}: 1 recipient(s) bounced\n"
    bounce = running.wait_for_mail(1)[0].read_text()
    assert "<testuser+defer@mx.test.example>:\nThis message was removed from the queue by the postmaster. (#5.0.0)\n" in bounce
    assert "Subject: to be bounced" in bounce
    running.wait_queue_empty()


def test_delete_removes_the_message_silently(running: Instance) -> None:
    msgid = _deferred_message(running, "to be deleted")
    assert running.ctl("queue", "delete", str(msgid)).stdout == f"eqmail: msg {msgid}: 1 recipient(s) deleted\n"
    running.wait_queue_empty()
    assert running.maildir_files() == []
    assert f"status: msg {msgid}: 1 recipient(s) removed by the postmaster" in running.log()
    missing = running.ctl("queue", "delete", str(msgid), check=False)
    assert missing.returncode == 1 and f"no message {msgid} in the queue" in missing.stderr


def test_status_shows_open_sessions() -> None:
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port} concurrency=7\n")
    try:
        inst.start()
        with socket.create_connection(("127.0.0.1", port)) as c:
            assert c.recv(100).startswith(b"220 ")
            deadline = time.monotonic() + 10
            while True:
                st = json.loads(inst.ctl("status", "--json").stdout)
                (lst,) = st["listeners"]
                if lst["sessions"] == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert (lst["port"], lst["sessions"], lst["concurrency"]) == (port, 1, 7)
            assert "deliveries" in st
            human = inst.ctl("status").stdout
            assert re.search(rf"smtp\s+127\.0\.0\.1:{port}\s+1/7", human), human
    finally:
        inst.destroy()
