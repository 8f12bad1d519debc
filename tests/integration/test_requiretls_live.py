"""REQUIRETLS (RFC 8689, issue 17 item 4) end to end, with real clients and peers.

One eqmail instance (module scope) receives with STARTTLS on 127.0.0.1 (a certificate of
a CA minted by tests/certs.py) and relays the test domains through control/smtproutes
to peers on other loopback addresses: scripted servers (tests/smtpsink.py) with
STARTTLS, with or without the REQUIRETLS keyword, a tlshosts/ pin or not, a certificate
of the pinned CA or of another one; a second eqmail instance with STARTTLS; and a
pinned address where nothing listens.  Python's smtplib is the sending client.

What a user sees is checked: the EHLO keywords and MAIL replies (530 #5.7.10 in clear
text), ``eqmailctl queue show`` naming the demand, the delivery log line, the MAIL
FROM line the peer received (`` REQUIRETLS``), the bounce in the sender's Maildir
(5.7.10, the header of the message and not its body, RFC 8689 §5), the message in the
second eqmail's Maildir.
"""

from __future__ import annotations

import json
import re
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CA
from harness import IS_ROOT, ME, Instance, dotqmail, free_port, poll
from smtpsink import Script, SmtpSink

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (privilege split, eqmaild)")

SENDER = f"testuser@{ME}"
SECRET = "the body nobody may read in clear"
REQUIRETLS = ("REQUIRETLS",)


@dataclass
class World:
    relay: Instance   # the instance under test
    peer: Instance    # a second eqmail, reached over pinned TLS
    port: int         # the relay's SMTP port on 127.0.0.1
    cafile: Path
    sinks: dict[str, SmtpSink]


def _sink(tmp: Path, ca: CA, addr: str, script: Script) -> tuple[SmtpSink, int]:
    cert, key = ca.server(addr).write(tmp, f"sink-{addr}")
    sink = SmtpSink(script, cert, key)
    return sink, sink.listen(addr)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("requiretls")
    ca, other = CA.create(), CA.create("another CA")
    cafile = tmp / "ca.pem"
    cafile.write_bytes(ca.pem)
    sinks: dict[str, SmtpSink] = {}
    routes: list[str] = []
    pins: list[str] = []
    for domain, addr, script, issuer, pinned in (
        ("pinned.example", "127.0.0.2", Script(starttls=True, tls_keywords=REQUIRETLS), ca, True),
        ("unoffered.example", "127.0.0.3", Script(starttls=True), ca, True),
        ("nopolicy.example", "127.0.0.4", Script(starttls=True, tls_keywords=REQUIRETLS), ca, False),
        ("badpin.example", "127.0.0.6", Script(starttls=True, tls_keywords=REQUIRETLS), other, True),
    ):
        sink, port = _sink(tmp, issuer, addr, script)
        sinks[domain] = sink
        routes.append(f"{domain}:[{addr}]:{port}")
        if pinned:
            pins.append(addr)
    # a pinned address where nothing listens: the message waits in the queue
    routes.append(f"held.example:[127.0.0.7]:{free_port(('127.0.0.7',))}")
    pins.append("127.0.0.7")
    peer_port = free_port(("127.0.0.5",))
    peer = Instance.create(listen=f"smtp 127.0.0.5:{peer_port}\n",
                           extra_controls={"locals": f"{ME}\neqmail.example\n",
                                           "rcpthosts": "eqmail.example\n"})
    _servercert(peer, ca.server("127.0.0.5").chain_and_key)
    routes.append(f"eqmail.example:[127.0.0.5]:{peer_port}")
    pins.append("127.0.0.5")
    port = free_port(("127.0.0.1",))
    relay = Instance.create(listen=f"smtp 127.0.0.1:{port} rules=tcp.smtp\n",
                            extra_controls={"smtproutes": "\n".join(routes) + "\n",
                                            "tcp.smtp": ':allow,RELAYCLIENT=""',
                                            "timeoutremote": "10"})
    _servercert(relay, ca.server(ME, "127.0.0.1").chain_and_key)
    (relay.root / "control" / "tlshosts").mkdir()
    for addr in pins:
        (relay.root / "control" / "tlshosts" / f"{addr}.pem").write_bytes(ca.pem)
    try:
        peer.start()
        relay.start()
        yield World(relay, peer, port, cafile, sinks)
    finally:
        relay.destroy()
        peer.destroy()
        for sink in sinks.values():
            sink.stop()


def _servercert(inst: Instance, pem: bytes) -> None:
    path = inst.root / "control" / "servercert.pem"
    path.write_bytes(pem)
    path.chmod(0o600)


def _tls(w: World) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", w.port, local_hostname="client.example", timeout=20)
    s.ehlo()
    s.starttls(context=ssl.create_default_context(cafile=str(w.cafile)))
    s.ehlo()
    return s


def _message(to: str, subject: str, extra: str = "") -> str:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n"
            f"{SECRET}\r\n\r\nsecond paragraph\r\n")


def _send(w: World, to: str, subject: str, requiretls: bool = True, extra: str = "") -> None:
    with _tls(w) as s:
        s.sendmail(SENDER, [to], _message(to, subject, extra),
                   mail_options=["REQUIRETLS"] if requiretls else [])


def _result(inst: Instance, rcpt: str, timeout: float = 40) -> tuple[str, str]:
    """The scanner's log line for the delivery to ``rcpt``: (success|deferral|failure, text)."""
    def find() -> tuple[str, str] | None:
        log = inst.log()
        start = re.search(rf"starting delivery (\d+): msg \d+ to remote {re.escape(rcpt)}\n", log)
        if start is None:
            return None
        done = re.search(rf"delivery {start.group(1)}: (success|deferral|failure): (.*)\n", log)
        return (done.group(1), done.group(2)) if done else None

    return poll(find, timeout, f"the delivery to {rcpt}", inst)  # type: ignore[return-value]


def _bounce_for(inst: Instance, rcpt: str) -> str:
    def find() -> str | None:
        for f in inst.maildir_files():
            text = f.read_text(errors="replace")
            if "Subject: failure notice" in text and f"<{rcpt}>:\n" in text:
                return text
        return None

    return poll(find, 30, f"the bounce for {rcpt}", inst)  # type: ignore[return-value]


# ---------------------------------------------------------------- receiving


def test_offered_and_accepted_only_under_tls(world: World) -> None:
    with smtplib.SMTP("127.0.0.1", world.port, local_hostname="client.example", timeout=20) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("requiretls")
        assert s.mail(SENDER, ["REQUIRETLS"]) == (
            530, b"REQUIRETLS needs a TLS session, use STARTTLS first (#5.7.10)")
        assert s.rcpt("u@pinned.example") == (503, b"MAIL first (#5.5.1)")
        s.starttls(context=ssl.create_default_context(cafile=str(world.cafile)))
        s.ehlo()
        assert s.has_extn("requiretls")
        assert s.esmtp_features["requiretls"] == ""
        assert s.mail(SENDER, ["REQUIRETLS=YES"]) == (
            501, b"syntax error, REQUIRETLS takes no value (#5.5.4)")
        assert s.mail(SENDER, ["REQUIRETLS"]) == (250, b"ok")
        assert s.rset()[0] == 250


def test_queue_show_names_a_requiretls_message(world: World) -> None:
    _send(world, "u@held.example", "held")
    word, text = _result(world.relay, "u@held.example")
    assert word == "deferral", text
    listing = world.relay.ctl("queue", "list").stdout
    ids = re.findall(r"#(\d+) +\d+ +<[^>]*> *\n\tremote\tu@held\.example\n", listing)
    assert ids, listing
    shown = world.relay.ctl("queue", "show", ids[-1]).stdout
    assert ("\tremote\tu@held.example\norigin: relay\nrequiretls: yes\n"
            "tls: held.example: opportunistic (no DANE") in shown, shown
    assert "Subject: held\n" in shown
    data = json.loads(world.relay.ctl("queue", "show", ids[-1], "--json").stdout)
    assert data["requiretls"] is True


# ---------------------------------------------------------------- relaying (RFC 8689 §4.2.1)


def test_without_validated_tls_it_bounces_with_5_7_10(world: World) -> None:
    """nopolicy.example's peer offers STARTTLS and REQUIRETLS, but nothing validates it
    (no DANE, MTA-STS or pin): the message is bounced, never sent; the bounce reaches
    the sender with the header of the message and without its body (RFC 8689 §5)."""
    sink = world.sinks["nopolicy.example"]
    _send(world, "u@nopolicy.example", "no policy")
    word, text = _result(world.relay, "u@nopolicy.example")
    assert word == "failure", text
    assert "(#5.7.10)" in text and "REQUIRETLS" in text
    bounce = _bounce_for(world.relay, "u@nopolicy.example")
    assert "REQUIRETLS: no validated TLS to this domain is possible" in bounce
    assert "(#5.7.10)" in bounce
    assert ("--- Below this line is the header of the message, without its body:\n"
            "--- it was sent with REQUIRETLS, whose bounces carry no content (RFC 8689).\n\n"
            f"Return-Path: <{SENDER}>\n") in bounce
    assert "Subject: no policy\n" in bounce
    assert SECRET not in bounce and "second paragraph" not in bounce
    assert sink.connections == 0 and sink.transactions == []


def test_tls_required_no_is_ignored_on_a_requiretls_message(world: World) -> None:
    """RFC 8689 §4.1: with the REQUIRETLS parameter the TLS-Required header field is
    ignored: the message is bounced as without it."""
    _send(world, "v@nopolicy.example", "both", extra="TLS-Required: No\r\n")
    word, text = _result(world.relay, "v@nopolicy.example")
    assert word == "failure" and "(#5.7.10)" in text, text
    assert world.sinks["nopolicy.example"].transactions == []


def test_other_mail_to_the_same_peer_goes_as_before(world: World) -> None:
    sink = world.sinks["nopolicy.example"]
    _send(world, "w@nopolicy.example", "plain", requiretls=False)
    word, text = _result(world.relay, "w@nopolicy.example")
    assert word == "success", text
    (tr,) = [t for t in sink.transactions if t.rcpts == ["w@nopolicy.example"]]
    assert tr.tls and tr.mail.startswith(f"FROM:<{SENDER}> ")  # opportunistic TLS
    assert "REQUIRETLS" not in tr.mail.upper()


def test_a_pinned_peer_offering_requiretls_gets_it_on_mail_from(world: World) -> None:
    sink = world.sinks["pinned.example"]
    _send(world, "u@pinned.example", "pinned")
    word, text = _result(world.relay, "u@pinned.example")
    assert word == "success", text
    (tr,) = [t for t in sink.transactions if t.rcpts == ["u@pinned.example"]]
    assert tr.tls and tr.mail.endswith(" REQUIRETLS"), tr.mail
    assert tr.mail.startswith(f"FROM:<{SENDER}>")
    assert SECRET.encode() in tr.data


def test_a_pinned_peer_not_offering_it_is_not_used(world: World) -> None:
    sink = world.sinks["unoffered.example"]
    _send(world, "u@unoffered.example", "unoffered")
    word, text = _result(world.relay, "u@unoffered.example")
    assert word == "failure", text
    assert text.startswith("Connected to 127.0.0.3 but it does not offer REQUIRETLS, which the "
                           "sender demanded. (#5.7.10)"), text
    assert not any(c.upper().startswith(b"MAIL") for c in sink.commands)
    bounce = _bounce_for(world.relay, "u@unoffered.example")
    assert "Subject: unoffered\n" in bounce and SECRET not in bounce


def test_an_eqmail_peer_takes_it_over_pinned_tls(world: World) -> None:
    """eqmail to eqmail: the second instance offers REQUIRETLS inside TLS, accepts
    the parameter and delivers."""
    _send(world, "testuser@eqmail.example", "to eqmail")
    word, text = _result(world.relay, "testuser@eqmail.example")
    assert word == "success", text
    data = world.peer.wait_for_mail(1)[0].read_bytes()
    assert b"Subject: to eqmail\n" in data and SECRET.encode() in data
    assert b"(127.0.0.1)\n  by mx.test.example with ESMTPS (" in data


def test_tls_required_no_does_not_lift_a_tlshosts_pin(world: World) -> None:
    """``TLS-Required: No`` (RFC 8689 §4.2.2) sets aside the *recipient domain's*
    policy (DANE, MTA-STS); a control/tlshosts/ pin is this server's admin's own rule
    and stays: a peer whose certificate does not verify against the pin gets nothing,
    not even in clear text.  (With DANE or MTA-STS enforce failing, the same header
    lets the message through: the remote delivery unit tests and the DANE/MTA-STS
    live tests cover that.)"""
    sink = world.sinks["badpin.example"]
    _send(world, "u@badpin.example", "opt out", requiretls=False, extra="TLS-Required: No\r\n")
    word, text = _result(world.relay, "u@badpin.example")
    assert word == "deferral", text
    assert text.startswith("TLS unable to verify server with control/tlshosts/127.0.0.6.pem: "), text
    assert sink.transactions == []
    assert not any(c.upper().startswith(b"MAIL") for c in sink.commands)


def test_a_forwarded_copy_keeps_the_demand(world: World) -> None:
    """RFC 8689 §4.1: a message redirected by a .qmail file keeps REQUIRETLS: its copy
    to the pinned peer carries it on MAIL FROM, its copy to a domain without validated
    TLS is bounced with 5.7.10 instead of going out."""
    dotqmail(world.relay, ".qmail-fwd", "&x@pinned.example\n&x@nopolicy.example\n")
    _send(world, f"testuser+fwd@{ME}", "forwarded")
    word, text = _result(world.relay, "x@pinned.example")
    assert word == "success", text
    (tr,) = [t for t in world.sinks["pinned.example"].transactions if t.rcpts == ["x@pinned.example"]]
    assert tr.mail.endswith(" REQUIRETLS") and b"Subject: forwarded" in tr.data
    word, text = _result(world.relay, "x@nopolicy.example")
    assert word == "failure" and "(#5.7.10)" in text, text
    assert not any(t.rcpts == ["x@nopolicy.example"] for t in world.sinks["nopolicy.example"].transactions)
