"""``eqmail-sendmail -bs``: an SMTP dialogue on stdin/stdout, as qmail's sendmail runs
qmail-smtpd with the local environment (RELAYCLIENT="", DATABYTES=0,
TCPREMOTEINFO=sendmail-bs, ...).  The dialogue is scripted on stdin; the replies,
the exit code and the delivered bytes are what is checked.  No listener is involved.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator

import pytest
from harness import IS_ROOT, ME, TEST_USER, Instance, bin_path
from live_smtp import DATE_RE, add_catchall_mailbox, qp_of

from eqmail.smtp import replies

LOCAL_RCPT = f"testuser@{ME}"


@pytest.fixture(scope="module")
def inst() -> Iterator[Instance]:
    i = Instance.create(listen="", extra_controls={"virtualdomains": "remote.example:testuser",
                                                  "timeoutsmtpd": "1"})
    add_catchall_mailbox(i)
    i.start()
    try:
        yield i
    finally:
        i.destroy()


def bs(inst: Instance, dialogue: bytes, env: dict[str, str] | None = None,
       as_user: str | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = [bin_path("eqmail-sendmail"), "-bs"]
    if as_user is not None:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TCP", "PROTO", "RELAYCLIENT"))}
    full_env.update(EQMAIL_ROOT=str(inst.root), **(env or {}))
    return subprocess.run(cmd, input=dialogue, capture_output=True, env=full_env, timeout=30)


def test_bs_delivers_with_qmails_replies(inst: Instance) -> None:
    proc = bs(inst, b"EHLO client\r\nMAIL FROM:<me@client.example>\r\n"
              + f"RCPT TO:<{LOCAL_RCPT}>\r\nRCPT TO:<friend@remote.example>\r\nDATA\r\n".encode()
              + b"Subject: bs\r\n\r\n..dot\r\nline\r\n.\r\nQUIT\r\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split(b"\r\n")
    # DATABYTES=0 from the -bs environment: SIZE 0 (no limit), whatever control/databytes says
    assert lines[:6] == [b"220 " + ME.encode() + b" ESMTP", b"250-" + ME.encode(), b"250-PIPELINING",
                         b"250-8BITMIME", b"250-CHUNKING", b"250 SIZE 0"]
    assert lines[6:10] == [b"250 ok", b"250 ok", b"250 ok", b"354 go ahead"]  # RELAYCLIENT=""
    qp = qp_of(lines[10] + b"\r\n")
    assert qp is not None, proc.stdout
    assert lines[11:] == [replies.quit_(ME).wire().rstrip(b"\r\n"), b""]
    assert b"qmail-smtpd: message accepted: me@client.example from 127.0.0.1" in proc.stderr
    # the queue writer labels the message by the invoker's uid, not "from network"
    marker = f"(qmail {qp} invoked by uid {os.getuid()})".encode()
    files = [p.read_bytes() for p in (inst.home / "Maildir" / "new").iterdir()]
    deadline_files = [f for f in files if marker in f]
    if len(deadline_files) < 2:
        deadline_files = _wait(inst, marker, 2)
    want_received = (re.escape(b"Received: from localhost (HELO client) (sendmail-bs@127.0.0.1)\n"
                               b"  by localhost with SMTP; ") + DATE_RE + b"\n")
    for data in deadline_files:
        assert re.search(re.escape(marker) + b"; " + DATE_RE + b"\n" + want_received
                         + re.escape(b"Subject: bs\n\n.dot\nline\n") + b"\\Z", data), data
    assert sorted(d.split(b"\n")[1] for d in deadline_files) == sorted([
        b"Delivered-To: " + LOCAL_RCPT.encode(), b"Delivered-To: testuser-friend@remote.example"])


def _wait(inst: Instance, marker: bytes, count: int) -> list[bytes]:
    import time
    deadline = time.monotonic() + 20
    while True:
        found = [d for p in (inst.home / "Maildir" / "new").iterdir() if marker in (d := p.read_bytes())]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, inst.log()[-3000:]
            return found
        time.sleep(0.02)


@pytest.mark.skipif(not IS_ROOT, reason="needs another uid")
def test_bs_as_another_user(inst: Instance) -> None:
    import pwd
    uid = pwd.getpwnam(TEST_USER).pw_uid
    proc = bs(inst, f"MAIL FROM:<u@client.example>\r\nRCPT TO:<{LOCAL_RCPT}>\r\nDATA\r\n".encode()
              + b"Subject: other user\r\n\r\nx\r\n.\r\nQUIT\r\n", as_user=TEST_USER)
    assert proc.returncode == 0, proc.stderr
    qp = qp_of(proc.stdout.split(b"\r\n")[4] + b"\r\n")
    assert qp is not None, proc.stdout
    _wait(inst, f"(qmail {qp} invoked by uid {uid})".encode(), 1)


def test_bs_preset_proto_keeps_callers_environment(inst: Instance) -> None:
    """PROTO already set: qmail's sendmail leaves the environment alone, so there is no
    RELAYCLIENT and rcpthosts applies."""
    proc = bs(inst, b"MAIL FROM:<a@client.example>\r\nRCPT TO:<friend@remote.example>\r\nQUIT\r\n",
              env={"PROTO": "TCP", "TCPREMOTEIP": "192.0.2.7"})
    assert proc.returncode == 0
    assert proc.stdout.split(b"\r\n")[2] == replies.NO_RCPTHOSTS.wire().rstrip(b"\r\n")


def test_bs_end_of_input_and_timeout(inst: Instance) -> None:
    """Without QUIT, qmail-smtpd exits 1 and logs ``read failed``; nothing queued from
    a half message.  A client that says nothing gets 451 timeout after timeoutsmtpd."""
    before = len(list((inst.home / "Maildir" / "new").iterdir()))
    proc = bs(inst, f"MAIL FROM:<a@client.example>\r\nRCPT TO:<{LOCAL_RCPT}>\r\nDATA\r\nSubject: cut".encode())
    assert proc.returncode == 1
    assert proc.stdout.endswith(b"354 go ahead\r\n")
    assert b"qmail-smtpd: read failed: a@client.example from 127.0.0.1" in proc.stderr
    p = subprocess.Popen([bin_path("eqmail-sendmail"), "-bs"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, EQMAIL_ROOT=str(inst.root)))
    guard = threading.Timer(15, p.kill)  # a hang fails the test instead of blocking it
    guard.start()
    try:
        assert p.stdout is not None
        out = p.stdout.read()  # stdin stays open: only the timeout can end the session
        p.wait()
    finally:
        guard.cancel()
        assert p.stdin is not None
        p.stdin.close()
    assert out == b"220 " + ME.encode() + b" ESMTP\r\n" + replies.TIMEOUT.wire()
    assert p.returncode == 1
    inst.wait_queue_empty()
    assert len(list((inst.home / "Maildir" / "new").iterdir())) == before
