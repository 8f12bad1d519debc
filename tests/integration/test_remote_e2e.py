"""Remote delivery end to end: queue -> scanner -> remote worker -> a second eqmail.

Two real instances on loopback: A sends, B receives with its SMTP listener.  A routes
``remote.example`` to B with control/smtproutes (``[127.0.0.1]:PORT``).  What a user
sees is checked: the message in B's Maildir, the QSBMF bounce with the remote text in
the sender's Maildir, a deferral that is delivered after the receiver comes back, a
before-remote hook run by A's plugin sandbox (as eqmailp, without access to A's queue).
"""

from __future__ import annotations

import inspect
import os
import pwd
import time
from collections.abc import Iterator

import pytest
from harness import Instance, free_port

from eqmail.supervisor import plant as supervisor_plant

RECEIVER_DOMAIN = "remote.example"


@pytest.fixture
def pair() -> Iterator[tuple[Instance, Instance, int]]:
    port = free_port(("127.0.0.1",))
    receiver = Instance.create(
        listen=f"smtp 127.0.0.1:{port}\n",
        extra_controls={"locals": f"mx.test.example\n{RECEIVER_DOMAIN}\n",
                        "rcpthosts": f"{RECEIVER_DOMAIN}\n"})
    sender = Instance.create(extra_controls={"smtproutes": f"{RECEIVER_DOMAIN}:[127.0.0.1]:{port}\n"
                                                           f"refused.example:[127.0.0.1]:{port}\n"})
    try:
        yield sender, receiver, port
    finally:
        sender.destroy()
        receiver.destroy()


def _send(inst: Instance, to: str, subject: str) -> None:
    msg = f"From: testuser@mx.test.example\nTo: {to}\nSubject: {subject}\n\nbody of {subject}\n".encode()
    proc = inst.sendmail(["-f", "testuser@mx.test.example", "-t"], msg)
    assert proc.returncode == 0, proc.stderr


def test_delivered_to_the_receiving_mta(pair: tuple[Instance, Instance, int]) -> None:
    sender, receiver, _ = pair
    receiver.start()
    sender.start()
    _send(sender, f"testuser@{RECEIVER_DOMAIN}", "remote one")
    files = receiver.wait_for_mail(1)
    data = files[0].read_bytes()
    assert b"Subject: remote one" in data
    assert b"body of remote one\n" in data
    # B's listener wrote its SMTP Received line for a connection from 127.0.0.1
    # ...over the TLS session the sender's opportunistic STARTTLS set up
    assert b"(127.0.0.1)\n  by mx.test.example with ESMTPS (" in data
    assert b"invoked from network" in data
    sender.wait_queue_empty()
    assert "delivery 1: success: 127.0.0.1 accepted message./Remote host said: 250 ok " in sender.log()


def test_permanent_refusal_bounces_with_the_remote_text(pair: tuple[Instance, Instance, int]) -> None:
    sender, receiver, _ = pair
    receiver.start()
    sender.start()
    # B does not accept refused.example (not in its rcpthosts): 553 at RCPT -> bounce
    _send(sender, "someone@refused.example", "to be refused")
    bounce = sender.wait_for_mail(1)[0].read_text()
    assert "Subject: failure notice" in bounce
    assert "Hi. This is the qmail-send program at mx.test.example." in bounce
    assert "<someone@refused.example>:\n" in bounce
    assert "127.0.0.1 does not like recipient." in bounce
    # the sender used STARTTLS (the receiver offers it), so eQmail's TLS suffix is there
    assert ("Remote host said: 553 sorry, that domain isn't in my list of allowed rcpthosts; "
            "no valid cert for gatewaying (#5.7.1)\nGiving up on 127.0.0.1.\n") in bounce
    assert "--- Below this line is a copy of the message." in bounce
    assert "Subject: to be refused" in bounce
    sender.wait_queue_empty()


def test_temporary_failure_is_retried_and_delivered(pair: tuple[Instance, Instance, int]) -> None:
    sender, receiver, _ = pair
    sender.start()  # the receiver is down: connection refused -> deferral
    _send(sender, f"testuser@{RECEIVER_DOMAIN}", "deferred")
    deadline = time.monotonic() + 30
    while "deferral" not in sender.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "delivery 1: deferral: Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)/" in sender.log()
    listing = sender.ctl("queue", "list").stdout
    assert f"\tremote\ttestuser@{RECEIVER_DOMAIN}" in listing
    receiver.start()
    sender.ctl("queue", "flush")  # qmail-tcpok + ALRM: retry now
    files = receiver.wait_for_mail(1, timeout=30)
    assert b"Subject: deferred" in files[0].read_bytes()
    sender.wait_queue_empty()


SUPERVISOR_BINDS_REMOTE_SANDBOX = "sandbox-remote.sock" in inspect.getsource(supervisor_plant)
HOOK = ("ls queue/mess >/dev/null 2>&1 && echo 'X-Queue: readable'; "
        "printf 'X-Hook: %s %s %s as %s\\n' \"$1\" \"$2\" \"$3\" \"$(id -un)\"; cat")


@pytest.mark.skipif(not SUPERVISOR_BINDS_REMOTE_SANDBOX,
                    reason="the supervisor does not bind run/sandbox-remote.sock yet")
def test_before_remote_hook_runs_in_the_sandbox(pair: tuple[Instance, Instance, int]) -> None:
    sender, receiver, _ = pair
    sender.write_control("beforemote", HOOK + "\n")
    receiver.start()
    sender.start()
    _send(sender, f"testuser@{RECEIVER_DOMAIN}", "hooked")
    data = receiver.wait_for_mail(1)[0].read_bytes()
    user = "eqmailp" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    assert (f"X-Hook: {RECEIVER_DOMAIN} testuser@mx.test.example testuser@{RECEIVER_DOMAIN} "
            f"as {user}\n").encode() in data
    assert b"Subject: hooked" in data
    if os.geteuid() == 0:  # the sandbox's user gets the message as an fd, not the queue
        assert b"X-Queue:" not in data
    sender.wait_queue_empty()
