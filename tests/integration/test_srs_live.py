"""SRS end to end (issue 16): a real eqmail instance forwards, bounces come back.

An outside sender's message (smtplib to eqmail's SMTP port) reaches a local user
whose .qmail forwards it to ``remote.example`` — a loopback SMTP sink (tests/smtpsink.py)
that control/smtproutes routes to.  The sink must see an SRS0 MAIL FROM at ``me``'s
domain, which Mail::SRS (the ``srs`` command by SRS's author) reverses with our secret
to the original sender.  The sink's bounce — null sender, to that SRS address, sent
with smtplib to eqmail's SMTP port — is accepted, reversed by the scanner and delivered
to the original sender, whose domain is routed to a second sink.  A tampered SRS
address is refused at RCPT; with control/srs 0 the MAIL FROM is the sender's own.
Over IPv4 and IPv6: the listener, both sinks and the routes on 127.0.0.1 or ::1.

The forward test needs both halves of issue 16's origin contract: the queue carrying
the origin to remote delivery and the .qmail forward claiming FORWARD (branch i16h1);
the way back is tested on its own as well.
"""

from __future__ import annotations

import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import ME, Instance, dotqmail, free_port
from smtpsink import SmtpSink, Transaction

from eqmail import srs
from eqmail.control import load_controls

FAMILIES = ["127.0.0.1", "::1"]
SENDER = "alice@origin.example"


@dataclass
class World:
    inst: Instance
    host: str
    port: int
    forward_sink: SmtpSink   # remote.example: where the .qmail forwards to
    origin_sink: SmtpSink    # origin.example: the original sender's domain


def literal(host: str) -> str:
    return f"[{host}]"


@pytest.fixture(params=FAMILIES, ids=["ipv4", "ipv6"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    host: str = request.param
    forward_sink, origin_sink = SmtpSink(), SmtpSink()
    fport, oport = forward_sink.listen(host), origin_sink.listen(host)
    port = free_port((host,))
    shown = f"[{host}]" if ":" in host else host
    inst = Instance.create(
        listen=f"smtp {shown}:{port}\n",
        extra_controls={"smtproutes": f"remote.example:{literal(host)}:{fport}\n"
                                      f"origin.example:{literal(host)}:{oport}\n"})
    dotqmail(inst, ".qmail", "&friend@remote.example\n")
    try:
        yield World(inst, host, port, forward_sink, origin_sink)
    finally:
        inst.destroy()
        forward_sink.stop()
        origin_sink.stop()


def smtp(w: World) -> smtplib.SMTP:
    return smtplib.SMTP(w.host, w.port, timeout=30)


def send_from_outside(w: World, subject: str) -> None:
    msg = (f"From: {SENDER}\r\nTo: testuser@{ME}\r\nSubject: {subject}\r\n\r\n"
           f"body of {subject}\r\n")
    with smtp(w) as s:
        s.sendmail(SENDER, [f"testuser@{ME}"], msg)


def mail_from(tr: Transaction) -> str:
    """The address of the sink's MAIL line (``FROM:<addr> SIZE=n``)."""
    assert tr.mail.startswith("FROM:<"), tr.mail
    return tr.mail[len("FROM:<"):].split(">", 1)[0]


def wait_for(sink: SmtpSink, count: int, inst: Instance, timeout: float = 30) -> list[Transaction]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sink.lock:
            if len(sink.transactions) >= count:
                return list(sink.transactions)
        time.sleep(0.05)
    raise AssertionError(f"sink got {len(sink.transactions)} of {count} messages\n--- log:\n{inst.log()}")


def test_forward_gets_srs_and_its_bounce_returns_to_the_sender(world: World) -> None:
    w = world
    w.inst.start()
    send_from_outside(w, "forward me")
    (fwd,) = wait_for(w.forward_sink, 1, w.inst)
    assert fwd.rcpts == ["friend@remote.example"]
    assert b"Subject: forward me" in fwd.data
    srs_address = mail_from(fwd)
    assert srs_address.startswith("SRS0=") and srs_address.endswith(f"=origin.example=alice@{ME}")

    # somebody else's implementation reverses it with our secret: Mail::SRS
    secret = (w.inst.root / "control" / "srssecrets").read_text().splitlines()[0]
    out = subprocess.run(["srs", f"--secret={secret}", "--reverse", srs_address],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == SENDER, out.stderr

    # the remote domain bounces: null sender, to the SRS address, at our SMTP port
    bounce = (f"From: MAILER-DAEMON@remote.example\r\nTo: {srs_address}\r\n"
              "Subject: Undelivered Mail Returned to Sender\r\n\r\n"
              "friend@remote.example: mailbox full\r\n")
    with smtp(w) as s:
        assert s.sendmail("", [srs_address], bounce) == {}
    (back,) = wait_for(w.origin_sink, 1, w.inst)
    assert mail_from(back) == "" and back.rcpts == [SENDER]
    assert b"friend@remote.example: mailbox full" in back.data
    assert f"SRS: <{srs_address}> reversed to <{SENDER}>" in w.inst.log()

    # a tampered SRS address (the user part changed) is refused at RCPT
    tampered = srs_address.replace("=alice@", "=mallory@")
    with smtp(w) as s:
        s.ehlo("bouncer.example")
        assert s.mail("")[0] == 250
        assert s.rcpt(tampered) == (550, b"sorry, that SRS address has an invalid signature (#5.1.1)")
        assert s.rcpt(f"SRS0=nonsense@{ME}") == (550, b"sorry, that SRS address is malformed (#5.1.1)")
    w.inst.wait_queue_empty()
    assert len(w.origin_sink.transactions) == 1


def test_bounces_to_srs_addresses_reversed_refused_or_bounced(world: World) -> None:
    """The way back alone (no forward needed): an SRS address made with the instance's
    secret, as eqmail.srs makes it, is taken and reversed; forged ones are refused at
    RCPT, and one injected locally bounces to its sender with the reason."""
    w = world
    w.inst.start()
    keys = load_controls(w.inst.root).srs_keys
    assert keys is not None and keys.domain == ME  # eqmailctl setup made the secret
    good = srs.forward("bob@origin.example", keys)
    with smtp(w) as s:
        assert s.sendmail("", [good], "Subject: bounce\r\n\r\nyour mail bounced\r\n") == {}
    (back,) = wait_for(w.origin_sink, 1, w.inst)
    assert mail_from(back) == "" and back.rcpts == ["bob@origin.example"]
    assert b"your mail bounced" in back.data
    forged = f"SRS0=AAAA={good.split('=')[2]}=origin.example=bob@{ME}"
    with smtp(w) as s:
        s.ehlo("bouncer.example")
        assert s.mail("")[0] == 250
        assert s.rcpt(forged) == (550, b"sorry, that SRS address has an invalid signature (#5.1.1)")
    # injected locally, the forged address bounces to the sender with the reason (the
    # sender's .qmail forwards the bounce on to remote.example; a bounce keeps <>)
    proc = w.inst.sendmail(["-f", f"testuser@{ME}", forged], b"Subject: local\n\nto a forged SRS\n")
    assert proc.returncode == 0, proc.stderr
    (fwd,) = wait_for(w.forward_sink, 1, w.inst)
    assert mail_from(fwd) == "" and fwd.rcpts == ["friend@remote.example"]
    bounce = fwd.data.decode().replace("\r\n", "\n")
    assert f"<{forged}>:\nSorry, this SRS address has an invalid signature: it was not made " \
        "here, or it was altered. (#5.1.1)\n" in bounce
    assert "to a forged SRS" in bounce
    w.inst.wait_queue_empty()
    assert len(w.origin_sink.transactions) == 1


def test_srs_off_keeps_the_senders_address(world: World) -> None:
    w = world
    w.inst.write_control("srs", "0")
    w.inst.start()
    send_from_outside(w, "no srs")
    (fwd,) = wait_for(w.forward_sink, 1, w.inst)
    assert mail_from(fwd) == SENDER and fwd.rcpts == ["friend@remote.example"]
    # without SRS an SRS-looking address is an ordinary one: no such mailbox
    with smtp(w) as s:
        s.ehlo("bouncer.example")
        s.mail("")
        assert s.rcpt(f"SRS0=abcd=J3=origin.example=alice@{ME}") == \
            (550, b"sorry, no mailbox here by that name (#5.1.1)")
