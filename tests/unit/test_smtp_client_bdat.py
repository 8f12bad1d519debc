"""CHUNKING on the sending side (RFC 3030, issue 18): eqmail.smtp.client sends a stored
message as one ``BDAT <size> LAST`` chunk when the peer offers CHUNKING — line ends made
CRLF, nothing dot-stuffed, no end mark, the chunk's size the SIZE= value — and reports
the outcomes with qmail-remote's texts; a peer without CHUNKING still gets DATA.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtpsink import Script, SmtpSink

from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.smtp import transport as t
from eqmail.smtp.bdatout import BdatEncoder
from eqmail.smtp.client import Destination, SmtpSession
from eqmail.smtp.dataout import LINE_END, wire_size
from eqmail.smtp.transport import TlsConfig

MESSAGE = b"Subject: hi\n\n.leading dot\n.\nbody\n"


def encode(data: bytes, cuts: list[int]) -> bytes:
    enc = BdatEncoder()
    points = sorted({x for x in cuts if x <= len(data)} | {0, len(data)})
    out = b"".join(enc.feed(data[lo:hi]) for lo, hi in zip(points, points[1:], strict=False))
    return out + enc.end()


@pytest.mark.parametrize(("stored", "wire"), [
    (b"a\n.\n..b\n", b"a\r\n.\r\n..b\r\n"),   # no dot-stuffing, a "." line is data
    (b"a\rb\r\n", b"a\r\nb\r\n"),
    (b"no end", b"no end\r\n"),
    (b"end\r", b"end\r\n"),
    (b"", b""),
])
def test_chunk_examples(stored: bytes, wire: bytes) -> None:
    assert encode(stored, []) == encode(stored, list(range(len(stored)))) == wire
    assert wire_size(io.BytesIO(stored)) == len(wire)


@given(st.binary(max_size=300).map(lambda b: b.replace(b"a", b"\r").replace(b"b", b"\n")
                                   .replace(b"c", b".")),
       st.lists(st.integers(0, 300), max_size=8))
def test_chunk_is_crlf_only_and_its_size_is_wire_size(data: bytes, cuts: list[int]) -> None:
    whole = encode(data, [])
    assert encode(data, cuts) == whole
    assert whole.count(b"\r") == whole.count(b"\n") == whole.count(b"\r\n")
    expect = LINE_END.sub(b"\r\n", data)
    if expect and not expect.endswith(b"\r\n"):
        expect += b"\r\n"
    assert whole == expect
    assert wire_size(io.BytesIO(data)) == len(whole)


@pytest.fixture
def sink_factory() -> Iterator:  # type: ignore[type-arg]
    sinks: list[SmtpSink] = []

    def make(script: Script) -> tuple[SmtpSink, int]:
        sink = SmtpSink(script, None, None)
        port = sink.listen("127.0.0.1")
        sinks.append(sink)
        return sink, port

    yield make
    for s in sinks:
        s.stop()


def session(port: int) -> SmtpSession:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return SmtpSession(t.Transport(sock, 5), Destination("127.0.0.1", port, "", None, None, False),
                       "client.test", TlsConfig(Path("/nonexistent")))


def test_bdat_when_offered_data_otherwise(sink_factory) -> None:  # type: ignore[no-untyped-def]
    sink, port = sink_factory(Script(chunking=True))
    s = session(port)
    s.open()
    rcpts, msg = s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))
    assert msg == Outcome(Verdict.SUCCESS,
                          "127.0.0.1 accepted message.\nRemote host said: 250 ok 1234 qp 5\n")
    (tr,) = sink.transactions
    assert tr.data == MESSAGE.replace(b"\n", b"\r\n")  # not stuffed, no end mark
    assert tr.mail == f"FROM:<s@x.test> SIZE={len(tr.data)}"
    assert any(line == b"BDAT %d LAST\r\n" % len(tr.data) for line in sink.commands)
    assert not any(line.upper().startswith(b"DATA") for line in sink.commands)
    assert s.usable and s.rset()
    _, msg2 = s.transaction("", ["a@y.test"], io.BytesIO(b"x\n"))
    assert msg2.verdict is Verdict.SUCCESS and sink.transactions[1].data == b"x\r\n"
    s.close()
    plain, port = sink_factory(Script())
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1].verdict is Verdict.SUCCESS
    assert plain.transactions[0].data == b"Subject: hi\r\n\r\n..leading dot\r\n..\r\nbody\r\n"


@pytest.mark.parametrize(("final", "verdict"), [("554 5.7.1 spam", Verdict.FAILURE),
                                                 ("452 4.3.1 full", Verdict.DEFERRAL)])
def test_bdat_refusals_have_qmail_remotes_texts(sink_factory, final: str,  # type: ignore[no-untyped-def]
                                                 verdict: Verdict) -> None:
    _, port = sink_factory(Script(chunking=True, final=final))
    s = session(port)
    s.open()
    assert s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE))[1] == Outcome(
        verdict, f"127.0.0.1 failed after I sent the message.\nRemote host said: {final}\n")
