"""eqmail.smtp.client and .transport: the pure parts, then one SMTP session against
tests/smtpsink.py."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtpsink import Script, SmtpSink, mint

from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.smtp import client as c
from eqmail.smtp import transport as t
from eqmail.smtp.client import Destination, Quit, RetryClear, SmtpSession, TryNext
from eqmail.smtp.dataout import LINE_END, DataEncoder, wire_size
from eqmail.smtp.transport import TlsConfig

# ------------------------------------------------------------------ pure parts


def test_reply_parser_joins_lines_and_cleans_text() -> None:
    p = c.ReplyParser()
    assert p.feed(b"250-first\r\n250-sec") == []
    (r,) = p.feed(b"ond\r\n250 last \x00x\r\n")
    assert r.code == 250
    assert r.text == "250-first\n250-second\n250 last ?x\n"
    assert r.lines == ("first", "second", "last ?x")


def test_reply_parser_bounds() -> None:
    (r,) = c.ReplyParser().feed(b"550 " + b"x" * 6000 + b"\r\n")
    assert len(r.text) == c.MAX_TEXT
    with pytest.raises(t.Dropped):
        c.ReplyParser().feed(b"hello\r\n")
    with pytest.raises(c.ProtocolViolation, match="too long"):
        c.ReplyParser().feed(b"2" * (c.MAX_LINE + 1))
    with pytest.raises(c.ProtocolViolation, match="reply too long"):
        c.ReplyParser().feed(b"250-x\r\n" * (c.MAX_LINES + 1))


# (server bytes, the replies as (code, text), or the violation)
REPLIES: list[tuple[bytes, list[tuple[int, str]] | str]] = [
    (b"250 ok\r\n", [(250, "250 ok\n")]),
    (b"250\r\n", [(250, "250\n")]),
    (b"250-a\r\n250-b\r\n250 c\r\n", [(250, "250-a\n250-b\n250 c\n")]),
    (b"250-a\n250 b\n", [(250, "250-a\n250 b\n")]),  # bare LF: qmail drops CRs anyway
    (b"354 go\r\n", [(354, "354 go\n")]),
    (b"221 bye\r\n250 ok\r\n", [(221, "221 bye\n"), (250, "250 ok\n")]),  # two replies
    (b"250-a\r\n", []),  # incomplete
    (b"250-a\r\n550 b\r\n", "multi-line reply with different codes"),
    (b"550-a\r\n250 b\r\n", "multi-line reply with different codes"),
    (b"250-a\r\n251-b\r\n250 c\r\n", "multi-line reply with different codes"),
    (b"hello\r\n", "malformed reply"),
    (b"25\r\n", "malformed reply"),
    (b"2a0 x\r\n", "malformed reply"),
    (b" 250 x\r\n", "malformed reply"),
    (b"250x\r\n", "malformed reply"),
    (b"250\tx\r\n", "malformed reply"),
    (b"150 x\r\n", "malformed reply"),
    (b"650 x\r\n", "malformed reply"),
    (b"000 x\r\n", "malformed reply"),
    (b"\r\n", "malformed reply"),
]


@pytest.mark.parametrize(("data", "expect"), REPLIES)
def test_reply_parsing_table(data: bytes, expect: list[tuple[int, str]] | str) -> None:
    for cuts in ([len(data)], range(1, len(data) + 1)):  # whole, and byte by byte
        p, got, prev = c.ReplyParser(), [], 0
        try:
            for cut in cuts:
                got += p.feed(data[prev:cut])
                prev = cut
        except c.ProtocolViolation as e:
            assert e.why == expect
            continue
        assert [(r.code, r.text) for r in got] == expect


@pytest.mark.parametrize(("lines", "expect"), [
    ([b"250 x"], 250),
    ([b"250-x", b"250 y"], 250),
    ([], "empty reply"),
    ([b"250 x", b"250 y"], "malformed reply"),  # a final line that is not last
    ([b"250-x"], "malformed reply"),  # continued but nothing follows
    ([b"250-x", b"251 y"], "multi-line reply with different codes"),
])
def test_parse_reply_table(lines: list[bytes], expect: int | str) -> None:
    if isinstance(expect, int):
        assert c.parse_reply(lines).code == expect
    else:
        with pytest.raises(c.ProtocolViolation) as e:
            c.parse_reply(lines)
        assert e.value.why == expect


@pytest.mark.parametrize(("ehlo", "size"), [
    (b"250-x\r\n250 SIZE 1000\r\n", 1000),
    (b"250-x\r\n250-size 52428800\r\n250 HELP\r\n", 52428800),
    (b"250-x\r\n250 SIZE\r\n", 0),
    (b"250-x\r\n250 SIZE 0\r\n", 0),
    (b"250-x\r\n250 SIZE lots\r\n", 0),
    (b"250-x\r\n250 SIZES 10\r\n", None),
    (b"250 SIZE 10\r\n", None),  # the first line is the greeting, not a keyword
    (b"250-x\r\n250 PIPELINING\r\n", None),
])
def test_size_offered(ehlo: bytes, size: int | None) -> None:
    (r,) = c.ReplyParser().feed(ehlo)
    assert c.size_offered(r) == size
    assert c.size_offered(None) is None


def test_ehlo_keywords_and_auth_login() -> None:
    (r,) = c.ReplyParser().feed(b"250-x\r\n250-STARTTLS\r\n250-AUTH=LOGIN\r\n250 SIZE 5\r\n")
    assert c.ehlo_keywords(r) == {"STARTTLS", "AUTH", "SIZE"}
    assert c.auth_login_offered(r)
    (r,) = c.ReplyParser().feed(b"250-x\r\n250 AUTH CRAM-MD5 login\r\n")
    assert c.auth_login_offered(r)
    (r,) = c.ReplyParser().feed(b"250-x\r\n250 AUTH PLAIN\r\n")
    assert not c.auth_login_offered(r)


def test_quote_address() -> None:
    assert c.quote_address("a.b+c@example.net") == "a.b+c@example.net"
    assert c.quote_address("a b@example.net") == '"a b"@example.net'
    assert c.quote_address('x"y@example.net') == '"x\\"y"@example.net'
    assert c.quote_address(".a@example.net") == '".a"@example.net'
    assert c.quote_address("a..b@example.net") == '"a..b"@example.net'


def encode_all(data: bytes, cuts: list[int]) -> bytes:
    enc, out, prev = DataEncoder(), b"", 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += enc.feed(data[prev:cut])
        prev = cut
    return out + enc.end()


@pytest.mark.parametrize(("stored", "wire"), [
    (b".a\n..b\nc.\n", b"..a\r\n...b\r\nc.\r\n.\r\n"),
    (b"x\n.y\n", b"x\r\n..y\r\n.\r\n"),
    # a bare CR is a line end (notqmail), and the line it starts is dot-stuffed
    (b"a\rb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r.\r\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
    (b"a\r\rb\n", b"a\r\n\r\nb\r\n.\r\n"),
    # CRLF stays one line end (never CRCRLF)
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"x\n\r\n.\r\n", b"x\r\n\r\n..\r\n.\r\n"),
    (b"", b".\r\n"),
    (b"end\r", b"end\r\n.\r\n"),
    (b"no line end", b"no line end\r\n.\r\n"),
])
def test_data_stream_examples(stored: bytes, wire: bytes) -> None:
    assert encode_all(stored, []) == wire
    assert encode_all(stored, list(range(len(stored)))) == wire  # one byte at a time
    assert wire_size(io.BytesIO(stored)) == len(unstuff(wire))


def unstuff(wire: bytes) -> bytes:
    """What the receiver stores: the data without the final dot, one leading dot off."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


@given(st.binary(max_size=300).map(lambda b: b.replace(b"a", b"\r").replace(b"b", b"\n")
                                   .replace(b"c", b".")),
       st.lists(st.integers(0, 300), max_size=8))
def test_data_stream_has_only_crlf_and_is_independent_of_chunking(
        data: bytes, cuts: list[int]) -> None:
    cuts = [x for x in cuts if x <= len(data)]
    whole = encode_all(data, [])
    assert encode_all(data, cuts) == whole
    body = whole[:-3]
    # no bare CR, no bare LF, no line that is a lone dot before the end
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    assert b"\r\n.\r\n" not in b"\r\n" + body
    expect = LINE_END.sub(b"\r\n", data)
    if expect and not expect.endswith(b"\r\n"):
        expect += b"\r\n"
    assert unstuff(whole) == expect
    assert wire_size(io.BytesIO(data)) == len(expect)


def test_peer_name_rules_for_ip_relays() -> None:
    """A relay given as an IP address: its certificate must name that address."""
    assert t.peer_name_problem("127.0.0.1", [], ["x"], ["127.0.0.1"]) is None
    assert t.peer_name_problem("2001:db8::1", [], [], ["2001:db8::1"]) is None
    assert t.peer_name_problem("127.0.0.1", ["relay.test"], ["relay.test"], []) == (
        "received certificate for relay.test")
    assert t.peer_name_problem("127.0.0.1", [], [], ["127.0.0.2"]) == (
        "received certificate for 127.0.0.2")
    assert t.peer_name_problem("127.0.0.1", [], ["127.0.0.1"], []) is None  # no SANs: CN
    assert t.peer_name_problem("127.0.0.1", ["127.0.0.1"], ["127.0.0.1"], []) is not None
    assert t.peer_name_problem("127.0.0.1", [], [], []) == "certificate contains no valid commonName"


def test_peer_name_rules() -> None:
    assert t.peer_name_problem("mx.example.net", ["mx.example.net"], ["other"]) is None
    assert t.peer_name_problem("mx.example.net", ["*.example.net"], []) is None
    assert t.peer_name_problem("a.mx.example.net", ["*.example.net"], []) is not None
    # strict: a DNS SAN that does not match is a failure even when the CN matches
    assert t.peer_name_problem("mx.example.net", ["www.example.net"], ["mx.example.net"]) == (
        "received certificate for www.example.net")
    assert t.peer_name_problem("mx.example.net", [], ["MX.example.net"]) is None
    assert t.peer_name_problem("mx.example.net", [], []) == "certificate contains no valid commonName"


S, Z, F = Verdict.SUCCESS, Verdict.DEFERRAL, Verdict.FAILURE


def test_rspawn_outcome_merge() -> None:
    k = Outcome(S, "1.2.3.4 accepted message.\nRemote host said: 250 ok\n")
    assert c.rspawn_outcome(c.ACCEPTED, k) == k
    h = Outcome(F, "1.2.3.4 does not like recipient.\nRemote host said: 550 no\n")
    assert c.rspawn_outcome(h, k) == Outcome(F, "1.2.3.4 does not like recipient.\nRemote host said: 550 no\n")
    giving_up = Outcome(F, "Giving up on 1.2.3.4.\n")
    assert c.rspawn_outcome(h, giving_up) == Outcome(F, h.text + "Giving up on 1.2.3.4.\n")
    s = Outcome(Z, "1.2.3.4 does not like recipient.\nRemote host said: 450 later\n")
    assert c.rspawn_outcome(s, giving_up) == Outcome(Z, s.text + "Giving up on 1.2.3.4.\n")
    z = Outcome(Z, "1.2.3.4 failed after I sent the message.\nRemote host said: 451 x\n")
    assert c.rspawn_outcome(c.ACCEPTED, z) == z
    noconn = Outcome(Z, "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")
    assert c.rspawn_outcome(None, noconn) == noconn


def old_rspawn_report(rcpt: str | None, message: str) -> str:
    """The oracle: qmail-rspawn's merge as eqmail wrote it on letters (before the
    Verdict), one recipient's ``r``/``h``/``s`` report with the ``K``/``Z``/``D`` one."""
    result = {"K": 1, "Z": 0, "D": -1}.get(message[:1], 0)
    if rcpt is None:  # qmail-remote stopped before RCPT: the message report alone
        return ("KZD"[1 - result]) + message[1:]
    orr = {"s": 0, "h": -1}.get(rcpt[:1], result)
    return "KZD"[1 - orr] + rcpt[1:] + (message[1:] if result <= orr else "")


RCPT_CODES = {"r": S, "h": F, "s": Z}  # qmail-remote's per-recipient letters


@pytest.mark.parametrize("rcpt_code", [None, "r", "h", "s"])
@pytest.mark.parametrize("message_code", ["K", "Z", "D"])
def test_rspawn_outcome_table_is_the_letters_merge(rcpt_code: str | None, message_code: str) -> None:
    """Every combination of recipient code (none, accepted, hard, soft) and message code
    gives the verdict and text the letter-based merge gave (accepted recipients carry no
    text, as qmail-remote prints ``r`` alone)."""
    rcpt_text = "" if rcpt_code in (None, "r") else "10.0.0.1 does not like recipient.\nRemote host said: 5x0 no\n"
    message_text = "10.0.0.1 said something.\nRemote host said: x50 ok\n"
    old = old_rspawn_report(None if rcpt_code is None else rcpt_code + rcpt_text, message_code + message_text)
    rcpt = None if rcpt_code is None else Outcome(RCPT_CODES[rcpt_code], rcpt_text)
    new = c.rspawn_outcome(rcpt, Outcome(Verdict.from_letter(message_code), message_text))
    assert new == Outcome(Verdict.from_letter(old[0]), old[1:])


@given(st.sampled_from([None, "r", "h", "s"]), st.text(max_size=40), st.sampled_from("KZD"),
       st.text(max_size=40))
def test_rspawn_outcome_is_the_letters_merge(rcpt_code: str | None, rcpt_text: str,
                                             message_code: str, message_text: str) -> None:
    """The same for any texts (an accepted recipient with a text too)."""
    old = old_rspawn_report(None if rcpt_code is None else rcpt_code + rcpt_text, message_code + message_text)
    rcpt = None if rcpt_code is None else Outcome(RCPT_CODES[rcpt_code], rcpt_text)
    new = c.rspawn_outcome(rcpt, Outcome(Verdict.from_letter(message_code), message_text))
    assert new == Outcome(Verdict.from_letter(old[0]), old[1:])


def test_tls_modes(tmp_path: Path) -> None:
    cfg = TlsConfig(tmp_path, tlshosts=frozenset({"mx.a"}), notls=frozenset({"mx.b"}))
    assert cfg.mode_for("MX.A") == (t.TlsMode.MANDATORY, "control/tlshosts/mx.a.pem")
    assert cfg.mode_for("mx.b")[0] is t.TlsMode.OFF
    assert cfg.mode_for("mx.c")[0] is t.TlsMode.OPPORTUNISTIC
    assert TlsConfig(tmp_path, exhaustive=True).mode_for("mx.c")[0] is t.TlsMode.OFF
    # relays given as IP addresses: by the address as written, then its canonical form
    ips = TlsConfig(tmp_path, tlshosts=frozenset({"127.0.0.1", "2001:db8::1", "2001:0db8::2"}),
                    notls=frozenset({"10.0.0.1"}))
    assert ips.mode_for("127.0.0.1") == (t.TlsMode.MANDATORY, "control/tlshosts/127.0.0.1.pem")
    assert ips.mode_for("2001:0db8:0::1") == (t.TlsMode.MANDATORY, "control/tlshosts/2001:db8::1.pem")
    assert ips.mode_for("2001:0db8::2") == (t.TlsMode.MANDATORY, "control/tlshosts/2001:0db8::2.pem")
    assert ips.mode_for("10.0.0.1")[0] is t.TlsMode.OFF
    assert ips.mode_for("127.0.0.2")[0] is t.TlsMode.OPPORTUNISTIC


# ------------------------------------------------------------------ live sessions

MESSAGE = b"Subject: hi\n\n.leading dot\nbody\n"


@pytest.fixture
def sink_factory() -> Iterator:
    sinks: list[SmtpSink] = []

    def make(script: Script | None = None, cert: tuple[Path, Path] | None = None) -> tuple[SmtpSink, int]:
        sink = SmtpSink(script, *(cert or (None, None)))
        port = sink.listen("127.0.0.1")
        sinks.append(sink)
        return sink, port

    yield make
    for s in sinks:
        s.stop()


def session(port: int, host: str = "", tls: TlsConfig | None = None, user: str | None = None,
            password: str | None = None, timeout: float = 5, implicit: bool = False) -> SmtpSession:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    dest = Destination("127.0.0.1", port, host, user, password, implicit)
    return SmtpSession(t.Transport(sock, timeout), dest, "client.test",
                       tls or TlsConfig(Path("/nonexistent")))


def test_transaction_texts_and_wire_format(sink_factory) -> None:  # type: ignore[no-untyped-def]
    sink, port = sink_factory(Script(rcpt=lambda a: "550 no such user" if a.startswith("bad") else "250 ok"))
    s = session(port)
    s.open()
    rcpts, msg = s.transaction("s@x.test", ["a@y.test", "bad@y.test"], io.BytesIO(MESSAGE))
    assert rcpts == [c.ACCEPTED, Outcome(F, "127.0.0.1 does not like recipient.\nRemote host said: 550 no such user\n")]
    assert msg == Outcome(S, "127.0.0.1 accepted message.\nRemote host said: 250 ok 1234 qp 5\n")
    (tr,) = sink.transactions
    assert tr.helo == "client.test" and tr.rcpts == ["a@y.test"]
    assert tr.mail == "FROM:<s@x.test> SIZE=35"  # the CRLF size, without the doubled dot
    assert tr.data == b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n" and not tr.tls
    assert s.usable and s.rset()  # reuse: a second transaction on the same connection
    _, msg2 = s.transaction("", ["a@y.test"], io.BytesIO(b"x\n"))
    assert msg2.verdict is S and msg2.text.startswith("127.0.0.1 accepted") and sink.connections == 1
    assert sink.transactions[1].mail == "FROM:<> SIZE=3"
    s.close()


def test_all_recipients_rejected_and_data_failures(sink_factory) -> None:  # type: ignore[no-untyped-def]
    _, port = sink_factory(Script(rcpt=lambda a: "450 try later"))
    s = session(port)
    s.open()
    rcpts, msg = s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))
    assert rcpts == [Outcome(Z, "127.0.0.1 does not like recipient.\nRemote host said: 450 try later\n")]
    assert msg == Outcome(F, "Giving up on 127.0.0.1.\n")
    _, port = sink_factory(Script(final="554 5.7.1 spam"))
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == Outcome(
        F, "127.0.0.1 failed after I sent the message.\nRemote host said: 554 5.7.1 spam\n")
    _, port = sink_factory(Script(mail="451 greylisted"))
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE)) == (
        None, Outcome(Z, "Connected to 127.0.0.1 but sender was rejected.\nRemote host said: 451 greylisted\n"))


def test_greetings(sink_factory) -> None:  # type: ignore[no-untyped-def]
    _, port = sink_factory(Script(banner="421 busy"))
    with pytest.raises(TryNext):
        session(port).open()
    _, port = sink_factory(Script(banner="554 go away"))
    with pytest.raises(Quit) as e:
        session(port).open()
    assert e.value.outcome == Outcome(F, "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 554 go away\n")
    sink, port = sink_factory(Script(ehlo=False))
    s = session(port)
    s.open()  # HELO fallback
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].verdict is S


def test_timeouts_and_possible_duplicate(sink_factory) -> None:  # type: ignore[no-untyped-def]
    _, port = sink_factory(Script(hang_at="mail"))
    s = session(port, timeout=0.5)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE)) == (
        None, Outcome(Z, "Connected to 127.0.0.1 but connection died. (#4.4.2)\n"))
    _, port = sink_factory(Script(hang_at="final"))
    s = session(port, timeout=0.5)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == Outcome(
        Z, "Connected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)\n")


def test_starttls_opportunistic_and_mandatory(sink_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, ca = mint(tmp_path, ["mx.tls.test"])
    sink, port = sink_factory(Script(starttls=True), (cert, key))
    s = session(port, host="mx.tls.test")
    s.open()
    assert s.tls_active
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].verdict is S
    assert sink.transactions[0].tls
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "tlshosts" / "mx.tls.test.pem").write_bytes(ca.read_bytes())
    (control / "tlshosts" / "wrong.test.pem").write_bytes(ca.read_bytes())
    tls = TlsConfig(control, tlshosts=frozenset({"mx.tls.test", "wrong.test"}))
    good = session(port, host="mx.tls.test", tls=tls)
    good.open()
    assert good.tls_active
    with pytest.raises(Quit) as e:
        session(port, host="wrong.test", tls=tls).open()
    assert e.value.outcome == Outcome(Z, "TLS unable to verify server wrong.test: received certificate for "
                                         "mx.tls.test; connected to 127.0.0.1.\n")
    other_cert, other_key, _ = mint(tmp_path, ["mx.tls.test"])  # another CA
    _, port2 = sink_factory(Script(starttls=True), (other_cert, other_key))
    with pytest.raises(Quit) as e:
        session(port2, host="mx.tls.test", tls=tls).open()
    assert e.value.outcome.verdict is Z
    assert e.value.outcome.text.startswith("TLS unable to verify server with control/tlshosts/mx.tls.test.pem: ")
    _, port3 = sink_factory(Script())
    with pytest.raises(Quit) as e:
        session(port3, host="mx.tls.test", tls=tls).open()
    assert e.value.outcome == Outcome(Z, "No TLS achieved while control/tlshosts/mx.tls.test.pem exists; "
                                         "connected to 127.0.0.1.\n")


def test_broken_handshake_asks_for_clear_text_retry(sink_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, _ = mint(tmp_path, ["mx.tls.test"])
    sink, port = sink_factory(Script(starttls=True), (cert, key))
    sink.ssl_ctx.maximum_version = __import__("ssl").TLSVersion.TLSv1_2  # type: ignore[union-attr]
    tls = TlsConfig(tmp_path, ciphers="ECDHE-RSA-AES128-GCM-SHA256")  # no common cipher (EC key)
    with pytest.raises(RetryClear):
        session(port, host="mx.tls.test", tls=tls).open()
    s = session(port, host="mx.tls.test", tls=tls)
    s.open(allow_tls=False)
    assert not s.tls_active


def test_implicit_tls(sink_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, _ = mint(tmp_path, ["smtps.test"])
    sink, port = sink_factory(Script(implicit_tls=True), (cert, key))
    s = session(port, host="smtps.test", implicit=True)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].verdict is S
    assert sink.transactions[0].tls


def test_auth_login(sink_factory) -> None:  # type: ignore[no-untyped-def]
    sink, port = sink_factory(Script(auth=("joe", "s3cret pass")))
    s = session(port, user="joe", password="s3cret pass")
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].verdict is S
    assert sink.transactions[0].auth_user == "joe"
    assert sink.transactions[0].mail == "FROM:<s@x.test> AUTH=<s@x.test> SIZE=35"
    with pytest.raises(Quit) as e:
        session(port, user="joe", password="wrong").open()
    assert e.value.outcome == Outcome(Z, "Connected to 127.0.0.1 but authentication was rejected (password)."
                                         "\nRemote host said: 535 authentication failed\n")


# ------------------------------------------------------------------ a hostile server

DELIVERED = Outcome(S, "127.0.0.1 accepted message.\nRemote host said: 250 ok 1234 qp 5\n")


def violation(why: str, said: str = "", dup: bool = False) -> Outcome:
    return Outcome(Z, f"Connected to 127.0.0.1 but the server broke the SMTP protocol ({why}). "
                      f"{'Possible duplicate! ' if dup else ''}(#4.5.0)\n"
                      + (f"Remote host said: {said}\n" if said else ""))


@pytest.mark.parametrize(("raw", "report"), [
    # extra lines after a reply: today they shift every later reply by one, and DATA's
    # 354 ends up taken as the answer to the end of data
    ({"banner": b"220 sink.test\r\n250 extra\r\n"}, violation("unsolicited data after the greeting")),
    ({"ehlo": b"250-sink.test\r\n250 SIZE 100000\r\n250 extra\r\n"},
     violation("unsolicited data after the reply to EHLO")),
    ({"mail": b"250 ok\r\n250 ok\r\n"}, violation("unsolicited data after the reply to MAIL")),
    ({"rcpt": b"250 ok\r\n250"}, violation("unsolicited data after the reply to RCPT")),
    ({"data": b"354 go\r\n250 ok\r\n"}, violation("unsolicited data after the reply to DATA")),
    ({"final": b"250 ok\r\n250 ok\r\n"},
     violation("unsolicited data after the reply to the end of data", dup=True)),
    # a reply of the wrong class, or not one reply at all
    ({"mail": b"354 go on\r\n"}, violation("354 reply to MAIL", "354 go on")),
    ({"rcpt": b"354 go on\r\n"}, violation("354 reply to RCPT", "354 go on")),
    ({"data": b"250 ok\r\n"}, violation("250 reply to DATA", "250 ok")),
    ({"final": b"354 more please\r\n"},
     violation("354 reply to the end of data", "354 more please", dup=True)),
    ({"final": b"250-ok\r\n550 rejected\r\n"},
     violation("multi-line reply with different codes", dup=True)),
    ({"mail": b"250-ok\r\n451 later\r\n"}, violation("multi-line reply with different codes")),
    ({"final": b"250 queued\r\n"}, Outcome(S, "127.0.0.1 accepted message.\nRemote host said: 250 queued\n")),
])
def test_lockstep_and_reply_classes(sink_factory, raw: dict[str, bytes], report: Outcome) -> None:  # type: ignore[no-untyped-def]
    sink, port = sink_factory(Script(raw=raw, final="451 not really"))
    s = session(port)
    try:
        s.open()
    except Quit as q:  # a violation before MAIL ends the attempt there
        assert q.outcome == report
        assert b"MAIL" not in b"".join(sink.commands)
        return
    rcpts, msg = s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))
    assert msg == report
    if report.verdict is S:
        assert rcpts == [c.ACCEPTED]
        return
    assert not s.usable
    assert sink.transactions == []  # nothing the sink answered with its own reply
    if "Possible duplicate" not in report.text:
        assert sink.unanswered == []  # the message never reached it


def test_bytes_with_the_starttls_220_are_never_read_as_a_tls_reply(sink_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CVE-2021-38371's class: plain text behind the 220 would be the first reply
    read under TLS; the attempt is given up instead (mandatory TLS here too)."""
    cert, key, ca = mint(tmp_path, ["mx.tls.test"])
    injected = b"220 ready\r\n250-mx.tls.test\r\n250 AUTH LOGIN\r\n"
    sink, port = sink_factory(Script(starttls=True, raw={"starttls": injected}), (cert, key))
    with pytest.raises(Quit) as e:
        session(port, host="mx.tls.test").open()
    assert e.value.outcome == violation("unsolicited data after the reply to STARTTLS")
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "tlshosts" / "mx.tls.test.pem").write_bytes(ca.read_bytes())
    tls = TlsConfig(control, tlshosts=frozenset({"mx.tls.test"}))
    with pytest.raises(Quit) as e:
        session(port, host="mx.tls.test", tls=tls).open()
    assert e.value.outcome == violation("unsolicited data after the reply to STARTTLS")
    assert [ln.split()[0] for ln in sink.commands] == [b"EHLO", b"STARTTLS"] * 2
    assert sink.transactions == []


def test_size_limit_of_the_server(sink_factory) -> None:  # type: ignore[no-untyped-def]
    wire = len(b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")  # 35: without stuffing
    sink, port = sink_factory(Script(size=wire - 1))
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test", "b@y.test"], io.BytesIO(MESSAGE)) == (
        None, Outcome(F, f"Connected to 127.0.0.1 but the message ({wire} bytes) is larger than the server "
                         f"accepts ({wire - 1} bytes): message size exceeds fixed limit. (#5.3.4)\n"))
    assert b"MAIL" not in b"".join(sink.commands)
    assert s.usable  # nothing was started: the connection can take the next message
    assert s.rset()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(b"x" * (wire - 3) + b"\n"))[1] == DELIVERED
    assert sink.transactions[0].mail == f"FROM:<s@x.test> SIZE={wire - 1}"
    for size, mail in ((wire, f"FROM:<s@x.test> SIZE={wire}"), (0, f"FROM:<s@x.test> SIZE={wire}"),
                       (None, "FROM:<s@x.test>")):
        sink, port = sink_factory(Script(size=size))  # exactly the limit, no limit, no SIZE
        s = session(port)
        s.open()
        assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == DELIVERED
        assert sink.transactions[0].mail == mail


def test_tls_pin_for_a_relay_given_as_an_ip_address(sink_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from certs import CA

    ca, other = CA.create(), CA.create("another CA")
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "tlshosts" / "127.0.0.1.pem").write_bytes(ca.pem)
    tls = TlsConfig(control, tlshosts=frozenset({"127.0.0.1"}))
    good = ca.server("127.0.0.1").write(tmp_path, "good")
    sink, port = sink_factory(Script(starttls=True), good)
    s = session(port, host="127.0.0.1", tls=tls)
    s.open()
    assert s.tls_active
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == DELIVERED
    assert sink.transactions[0].tls
    for issued, problem in (
            (other.server("127.0.0.1"), "TLS unable to verify server with control/tlshosts/127.0.0.1.pem: "),
            (ca.server("relay.test"), "TLS unable to verify server 127.0.0.1: received certificate for "
                                      "relay.test; connected to 127.0.0.1.\n")):
        wrong = issued.write(tmp_path, f"wrong{len(problem)}")
        sink, port = sink_factory(Script(starttls=True), wrong)
        with pytest.raises(Quit) as e:
            session(port, host="127.0.0.1", tls=tls).open()
        assert e.value.outcome.verdict is Z and e.value.outcome.text.startswith(problem)
        assert sink.transactions == [] and b"MAIL" not in b"".join(sink.commands)


def test_plain_text_arriving_after_the_starttls_220_is_never_a_reply(tmp_path: Path) -> None:
    """The injected lines come in their own segment, after the 220: whether they are
    found waiting (violation) or land in the handshake (it fails), they are never read
    as the answer to the EHLO under TLS.  Opportunistic TLS then retries in clear text
    (RetryClear); a pinned host gives up."""
    _, _, ca = mint(tmp_path, ["mx.tls.test"])
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def peer() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                f = conn.makefile("rb")
                conn.sendall(b"220 hostile ESMTP\r\n")
                seen.append(f.readline())
                conn.sendall(b"250-hostile\r\n250 STARTTLS\r\n")
                seen.append(f.readline())
                conn.sendall(b"220 go ahead\r\n")
                time.sleep(0.3)
                conn.sendall(b"250-hostile\r\n250 AUTH LOGIN\r\n")
                conn.settimeout(5)
                try:
                    while conn.recv(4096):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()

    def attempt(tls: TlsConfig) -> SmtpSession:
        sock = socket.create_connection(("::1", port), timeout=5)
        return SmtpSession(t.Transport(sock, 5), Destination("::1", port, "mx.tls.test"),
                           "client.test", tls)

    with pytest.raises(RetryClear):
        attempt(TlsConfig(tmp_path)).open()
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "tlshosts" / "mx.tls.test.pem").write_bytes(ca.read_bytes())
    with pytest.raises(Quit) as e:
        attempt(TlsConfig(control, tlshosts=frozenset({"mx.tls.test"}))).open()
    assert e.value.outcome.verdict is Z and e.value.outcome.text.startswith("TLS connect failed: ")
    thread.join(10)
    listener.close()
    assert [ln.split()[0] for ln in seen] == [b"EHLO", b"STARTTLS"] * 2
