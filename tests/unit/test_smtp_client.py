"""eqmail.smtp.client and .transport: the pure parts, then one SMTP session against
tests/smtpsink.py."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtpsink import Script, SmtpSink, mint

from eqmail.smtp import client as c
from eqmail.smtp import transport as t
from eqmail.smtp.client import Destination, Quit, RetryClear, SmtpSession, TryNext
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
    with pytest.raises(t.Dropped):
        c.ReplyParser().feed(b"2" * (c.MAX_LINE + 1))


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


def stuff_all(data: bytes, cuts: list[int]) -> bytes:
    out, start, prev = b"", True, 0
    for cut in sorted(set(cuts)) + [len(data)]:
        chunk, prev = data[prev:cut], cut
        piece, start = c.stuff(chunk, start)
        out += piece
    return out


def test_stuff_examples() -> None:
    assert stuff_all(b".a\n..b\nc.\n", []) == b"..a\r\n...b\r\nc.\r\n"
    assert stuff_all(b"x\n.y\n", [2]) == b"x\r\n..y\r\n"


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_stuff_is_independent_of_chunking(data: bytes, cuts: list[int]) -> None:
    data = data.replace(b"\r", b"")
    cuts = [x for x in cuts if x <= len(data)]
    whole = stuff_all(data, [])
    assert stuff_all(data, cuts) == whole
    lines = whole.replace(b"\r\n", b"\n").split(b"\n")  # undo: CRLF, then one leading dot
    assert b"\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines) == data


def test_peer_name_rules() -> None:
    assert t.peer_name_problem("mx.example.net", ["mx.example.net"], ["other"]) is None
    assert t.peer_name_problem("mx.example.net", ["*.example.net"], []) is None
    assert t.peer_name_problem("a.mx.example.net", ["*.example.net"], []) is not None
    # strict: a DNS SAN that does not match is a failure even when the CN matches
    assert t.peer_name_problem("mx.example.net", ["www.example.net"], ["mx.example.net"]) == (
        "received certificate for www.example.net")
    assert t.peer_name_problem("mx.example.net", [], ["MX.example.net"]) is None
    assert t.peer_name_problem("mx.example.net", [], []) == "certificate contains no valid commonName"


def test_rspawn_report_merge() -> None:
    k = "K1.2.3.4 accepted message.\nRemote host said: 250 ok\n"
    assert c.rspawn_report("r", k) == k
    h = "h1.2.3.4 does not like recipient.\nRemote host said: 550 no\n"
    assert c.rspawn_report(h, k) == "D1.2.3.4 does not like recipient.\nRemote host said: 550 no\n"
    giving_up = "DGiving up on 1.2.3.4.\n"
    assert c.rspawn_report(h, giving_up) == "D" + h[1:] + "Giving up on 1.2.3.4.\n"
    s = "s1.2.3.4 does not like recipient.\nRemote host said: 450 later\n"
    assert c.rspawn_report(s, giving_up) == "Z" + s[1:] + "Giving up on 1.2.3.4.\n"
    z = "Z1.2.3.4 failed after I sent the message.\nRemote host said: 451 x\n"
    assert c.rspawn_report("r", z) == z
    assert c.rspawn_report(None, "ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")[0] == "Z"


def test_tls_modes(tmp_path: Path) -> None:
    cfg = TlsConfig(tmp_path, tlshosts=frozenset({"mx.a"}), notls=frozenset({"mx.b"}))
    assert cfg.mode_for("MX.A") == (t.TlsMode.MANDATORY, "control/tlshosts/mx.a.pem")
    assert cfg.mode_for("mx.b")[0] is t.TlsMode.OFF
    assert cfg.mode_for("mx.c")[0] is t.TlsMode.OPPORTUNISTIC
    assert TlsConfig(tmp_path, exhaustive=True).mode_for("mx.c")[0] is t.TlsMode.OFF


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
    assert rcpts == ["r", "h127.0.0.1 does not like recipient.\nRemote host said: 550 no such user\n"]
    assert msg == "K127.0.0.1 accepted message.\nRemote host said: 250 ok 1234 qp 5\n"
    (tr,) = sink.transactions
    assert tr.helo == "client.test" and tr.mail == "FROM:<s@x.test>" and tr.rcpts == ["a@y.test"]
    assert tr.data == b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n" and not tr.tls
    assert s.usable and s.rset()  # reuse: a second transaction on the same connection
    _, msg2 = s.transaction("", ["a@y.test"], io.BytesIO(b"x\n"))
    assert msg2.startswith("K127.0.0.1 accepted") and sink.connections == 1
    assert sink.transactions[1].mail == "FROM:<>"
    s.close()


def test_all_recipients_rejected_and_data_failures(sink_factory) -> None:  # type: ignore[no-untyped-def]
    _, port = sink_factory(Script(rcpt=lambda a: "450 try later"))
    s = session(port)
    s.open()
    rcpts, msg = s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))
    assert rcpts == ["s127.0.0.1 does not like recipient.\nRemote host said: 450 try later\n"]
    assert msg == "DGiving up on 127.0.0.1.\n"
    _, port = sink_factory(Script(final="554 5.7.1 spam"))
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == (
        "D127.0.0.1 failed after I sent the message.\nRemote host said: 554 5.7.1 spam\n")
    _, port = sink_factory(Script(mail="451 greylisted"))
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE)) == (
        None, "ZConnected to 127.0.0.1 but sender was rejected.\nRemote host said: 451 greylisted\n")


def test_greetings(sink_factory) -> None:  # type: ignore[no-untyped-def]
    _, port = sink_factory(Script(banner="421 busy"))
    with pytest.raises(TryNext):
        session(port).open()
    _, port = sink_factory(Script(banner="554 go away"))
    with pytest.raises(Quit) as e:
        session(port).open()
    assert e.value.report == "DConnected to 127.0.0.1 but greeting failed.\nRemote host said: 554 go away\n"
    sink, port = sink_factory(Script(ehlo=False))
    s = session(port)
    s.open()  # HELO fallback
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].startswith("K")


def test_timeouts_and_possible_duplicate(sink_factory) -> None:  # type: ignore[no-untyped-def]
    _, port = sink_factory(Script(hang_at="mail"))
    s = session(port, timeout=0.5)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE)) == (
        None, "ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n")
    _, port = sink_factory(Script(hang_at="final"))
    s = session(port, timeout=0.5)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == (
        "ZConnected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)\n")


def test_starttls_opportunistic_and_mandatory(sink_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, ca = mint(tmp_path, ["mx.tls.test"])
    sink, port = sink_factory(Script(starttls=True), (cert, key))
    s = session(port, host="mx.tls.test")
    s.open()
    assert s.tls_active
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].startswith("K")
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
    assert e.value.report == ("ZTLS unable to verify server wrong.test: received certificate for "
                              "mx.tls.test; connected to 127.0.0.1.\n")
    other_cert, other_key, _ = mint(tmp_path, ["mx.tls.test"])  # another CA
    _, port2 = sink_factory(Script(starttls=True), (other_cert, other_key))
    with pytest.raises(Quit) as e:
        session(port2, host="mx.tls.test", tls=tls).open()
    assert e.value.report.startswith("ZTLS unable to verify server with control/tlshosts/mx.tls.test.pem: ")
    _, port3 = sink_factory(Script())
    with pytest.raises(Quit) as e:
        session(port3, host="mx.tls.test", tls=tls).open()
    assert e.value.report == ("ZNo TLS achieved while control/tlshosts/mx.tls.test.pem exists; "
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
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].startswith("K")
    assert sink.transactions[0].tls


def test_auth_login(sink_factory) -> None:  # type: ignore[no-untyped-def]
    sink, port = sink_factory(Script(auth=("joe", "s3cret pass")))
    s = session(port, user="joe", password="s3cret pass")
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].startswith("K")
    assert sink.transactions[0].auth_user == "joe"
    assert sink.transactions[0].mail == "FROM:<s@x.test> AUTH=<s@x.test>"
    with pytest.raises(Quit) as e:
        session(port, user="joe", password="wrong").open()
    assert e.value.report == ("ZConnected to 127.0.0.1 but authentication was rejected (password)."
                              "\nRemote host said: 535 authentication failed\n")
