"""Remote delivery against hostile SMTP servers, end to end.

A real eqmail instance (supervisor, scanner, remote worker as eqmailr when root) sends
through control/smtproutes to scripted peers (tests/smtpsink.py) on 127.0.0.1, 127.0.0.2
and ::1 that send lines nobody asked for, plain text behind the 220 to STARTTLS,
multi-line replies with mixed codes, a 3xx to the end of data, a small SIZE, or present
the wrong certificate to a pinned IP relay.  What is checked is what a user sees: the
qmail-format delivery log line (``deferral:`` with the reason), the message still in
the queue, the bounce, and what the peer received (commands, bytes of the data, whether
it ever answered a message with its own 250).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CA
from harness import Instance, poll
from smtpsink import Script, SmtpSink, mint

SENDER = "testuser@mx.test.example"


@dataclass
class Peer:
    domain: str
    sink: SmtpSink
    route: str  # the smtproutes value


def start_peer(domain: str, addr: str, script: Script, cert: tuple[Path, Path] | None = None,
               route: str = "[{addr}]:{port}") -> Peer:
    sink = SmtpSink(script, *(cert or (None, None)))
    port = sink.listen(addr)
    return Peer(domain, sink, route.format(addr=addr, port=port))


def sender_instance(peers: list[Peer], files: dict[str, bytes] | None = None) -> Instance:
    routes = "".join(f"{p.domain}:{p.route}\n" for p in peers)
    inst = Instance.create(extra_controls={"smtproutes": routes, "timeoutremote": "10"})
    for name, data in (files or {}).items():
        path = inst.root / "control" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    inst.start()
    return inst


def send(inst: Instance, rcpts: list[str], subject: str, body: bytes = b"body\n") -> None:
    msg = (f"From: {SENDER}\nTo: {', '.join(rcpts)}\nSubject: {subject}\n\n").encode() + body
    proc = inst.sendmail(["-f", SENDER, *rcpts], msg)
    assert proc.returncode == 0, proc.stderr


def result(inst: Instance, rcpt: str, timeout: float = 40) -> tuple[str, str]:
    """The scanner's log line for the delivery to ``rcpt``: (success|deferral|failure, text)."""
    def find() -> tuple[str, str] | None:
        log = inst.log()
        start = re.search(rf"starting delivery (\d+): msg \d+ to remote {re.escape(rcpt)}\n", log)
        if start is None:
            return None
        done = re.search(rf"delivery {start.group(1)}: (success|deferral|failure): (.*)\n", log)
        return (done.group(1), done.group(2)) if done else None

    return poll(find, timeout, f"the delivery to {rcpt}", inst)  # type: ignore[return-value]


def queued(inst: Instance, rcpt: str) -> bool:
    return f"\tremote\t{rcpt}" in inst.ctl("queue", "list").stdout


def violation(ip: str, why: str, dup: bool = False) -> str:
    return (f"Connected to {ip} but the server broke the SMTP protocol ({why}). "
            f"{'Possible duplicate! ' if dup else ''}(#4.5.0)/")


# ---------------------------------------------------------------- lockstep, reply classes, SIZE

HOSTILE = {  # domain: (address, script, the deferral text's reason, possible duplicate)
    "greeting.example": ("127.0.0.1", Script(raw={"banner": b"220 sink.test\r\n250 extra\r\n"},
                                             final="451 not accepted"),
                         "unsolicited data after the greeting", False),
    "ehlo.example": ("::1", Script(raw={"ehlo": b"250-sink.test\r\n250 SIZE 1000000\r\n"
                                                b"250 extra\r\n"}, final="451 not accepted"),
                     "unsolicited data after the reply to EHLO", False),
    "data.example": ("::1", Script(raw={"data": b"354 go ahead\r\n250 ok fake\r\n"},
                                   final="451 not accepted"),
                     "unsolicited data after the reply to DATA", False),
    "mixed.example": ("127.0.0.1", Script(raw={"final": b"250-ok\r\n550 5.7.1 rejected\r\n"}),
                      "multi-line reply with different codes", True),
    "threexx.example": ("::1", Script(raw={"final": b"354 more please\r\n"}),
                        "354 reply to the end of data", True),  # + the remote text
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, dict[str, Peer]]]:
    cert, key, _ = mint(tmp_path_factory.mktemp("certs"), ["localhost"])
    peers = {d: start_peer(d, addr, script) for d, (addr, script, _, _) in HOSTILE.items()}
    inject = b"220 ready for TLS\r\n250-sink.test\r\n250 AUTH LOGIN\r\n"
    peers["tls.example"] = start_peer("tls.example", "127.0.0.1",
                                      Script(starttls=True, raw={"starttls": inject}), (cert, key))
    peers["size.example"] = start_peer("size.example", "::1", Script(size=200))
    peers["clean.example"] = start_peer("clean.example", "127.0.0.1", Script())
    inst = sender_instance(list(peers.values()))
    try:
        yield inst, peers
    finally:
        inst.destroy()
        for p in peers.values():
            p.sink.stop()


@pytest.mark.parametrize("domain", list(HOSTILE))
def test_server_out_of_step_defers(hostile, domain: str) -> None:  # type: ignore[no-untyped-def]
    inst, peers = hostile
    ip, _, why, dup = HOSTILE[domain]
    rcpt = f"user@{domain}"
    send(inst, [rcpt], f"to {domain}")
    said = "Remote host said: 354 more please/" if why.startswith("354") else ""
    assert result(inst, rcpt) == ("deferral", violation(ip, why, dup) + said)
    assert queued(inst, rcpt)
    sink = peers[domain].sink
    assert sink.transactions == []  # never answered a message with its own reply
    if not dup:  # the message never reached the peer at all
        assert sink.unanswered == []


def test_plain_text_behind_the_starttls_220_defers(hostile) -> None:  # type: ignore[no-untyped-def]
    inst, peers = hostile
    send(inst, ["user@tls.example"], "starttls injection")
    assert result(inst, "user@tls.example") == (
        "deferral", violation("127.0.0.1", "unsolicited data after the reply to STARTTLS"))
    assert queued(inst, "user@tls.example")
    sink = peers["tls.example"].sink
    assert [c.split()[0] for c in sink.commands] == [b"EHLO", b"STARTTLS"]
    assert sink.transactions == [] and sink.unanswered == []


def test_message_over_the_advertised_size_fails_permanently(hostile) -> None:  # type: ignore[no-untyped-def]
    inst, peers = hostile
    before = len(inst.maildir_files())
    send(inst, ["one@size.example", "two@size.example"], "too big", b"x" * 300 + b"\n")
    for rcpt in ("one@size.example", "two@size.example"):
        word, text = result(inst, rcpt)
        assert word == "failure"
        assert re.fullmatch(r"Connected to ::1 but the message \(\d+ bytes\) is larger than the "
                            r"server accepts \(200 bytes\): message size exceeds fixed limit\. "
                            r"\(#5\.3\.4\)/", text), text
    assert b"MAIL" not in b"".join(peers["size.example"].sink.commands)
    bounce = inst.wait_for_mail(before + 1)[-1].read_text()
    assert "<one@size.example>:\n" in bounce and "<two@size.example>:\n" in bounce
    assert "message size exceeds fixed limit. (#5.3.4)" in bounce


def test_clean_line_ends_and_size_on_mail(hostile) -> None:  # type: ignore[no-untyped-def]
    """Bare CRs (and qmail's LFs) in the queued message leave as CRLF, dot-stuffed."""
    inst, peers = hostile
    body = b"one\rtwo\r.\rthree\r\n..four\nfive\r\r\nend\n"
    send(inst, ["user@clean.example"], "line ends", body)
    word, text = result(inst, "user@clean.example")
    assert word == "success" and text.startswith("127.0.0.1 accepted message./"), text
    (tr,) = peers["clean.example"].sink.transactions
    data = tr.data
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")  # CRLF only
    assert data.endswith(b"\r\n\r\none\r\ntwo\r\n..\r\nthree\r\n...four\r\nfive\r\n\r\nend\r\n")
    size = len(data) - data.count(b"\r\n.")  # RFC 1870: without the doubled dots
    assert tr.mail == f"FROM:<{SENDER}> SIZE={size}"


# ---------------------------------------------------------------- TLS pins for IP relays


def test_tls_pins_apply_to_relays_given_as_ip_addresses(tmp_path: Path) -> None:
    """control/tlshosts/<address>.pem pins a relay named by its address in smtproutes
    (bracketed, bare, IPv6): verified against that CA, never opportunistic, never clear."""
    ca, other = CA.create(), CA.create("another CA")
    good = ca.server("127.0.0.2").write(tmp_path, "good")
    wrong6 = other.server("::1").write(tmp_path, "wrong6")  # another CA at the pinned ::1
    peers = [
        start_peer("pinned.example", "127.0.0.2", Script(starttls=True), good),
        start_peer("bare.example", "127.0.0.2", Script(), route="{addr}:{port}"),  # no STARTTLS
        start_peer("wrong6.example", "::1", Script(starttls=True), wrong6),
    ]
    inst = sender_instance(peers, {"tlshosts/127.0.0.2.pem": ca.pem, "tlshosts/::1.pem": ca.pem})
    try:
        pinned, bare, wrong = peers
        send(inst, ["u@pinned.example"], "pinned")
        word, text = result(inst, "u@pinned.example")
        assert word == "success", text
        assert pinned.sink.transactions[0].tls
        send(inst, ["u@bare.example"], "bare")
        assert result(inst, "u@bare.example") == (
            "deferral", "No TLS achieved while control/tlshosts/127.0.0.2.pem exists; "
                        "connected to 127.0.0.2./")
        send(inst, ["u@wrong6.example"], "wrong")
        word, text = result(inst, "u@wrong6.example")
        assert word == "deferral"
        assert text.startswith("TLS unable to verify server with control/tlshosts/::1.pem: "), text
        for peer in (bare, wrong):  # no fall-back to clear text, no message
            assert b"MAIL" not in b"".join(peer.sink.commands)
            assert peer.sink.transactions == [] and peer.sink.connections == 1
        assert queued(inst, "u@bare.example") and queued(inst, "u@wrong6.example")
    finally:
        inst.destroy()
        for p in peers:
            p.sink.stop()
