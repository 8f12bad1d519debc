"""Property tests of the pure Session: arbitrary input never breaks it.

- no exception escapes, whatever the bytes and however they are split;
- everything sent is well-formed SMTP reply lines (``ddd[ -]text CRLF``);
- the input buffer stays bounded (command lines by max_line, DATA by PARTIAL_FLUSH);
- the replies and stored messages do not depend on how the input was chunked (with
  STARTTLS off: its discard of pipelined input is chunking-dependent by design).
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.smtp import actions as a
from eqmail.smtp.data import PARTIAL_FLUSH
from eqmail.smtp.policy import BadMailFrom, RcptHosts
from eqmail.smtp.session import Session, SessionConfig

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
MAX_LINE = 64

TOKENS = [
    b"HELO x\r\n", b"EHLO y\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<c@example.org>\r\n", b"RCPT TO:<c@remote.example>\r\n", b"DATA\r\n",
    b".\r\n", b"\r\n.\r\n", b"..\r\n", b"\n", b"\r", b".", b"\r\n", b"x", b" ",
    b"AUTH LOGIN\r\n", b"AUTH PLAIN\r\n", b"AUTH CRAM-MD5\r\n", b"*\r\n", b"am9l\r\n",
    b"AGpvZQBzZWNyZXQ=\r\n", b"STARTTLS\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"Received: x\r\n", b"MAIL FROM:<a@b> SIZE=99999\r\n", b"\x00", b"\xff",
    b"A" * 70, b"VRFY\r\n",
    # CHUNKING (RFC 3030): counted chunks, refused sizes, LAST, mixing with DATA
    b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 300\r\n",
    b"BDAT x\r\n", b"BDAT -1\r\n", b"bdat 2 last\r\n", b"BDAT 9999999999999999\r\n",
]
inputs = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=24)),
                  max_size=40).map(b"".join)


def make_session(tls: bool = False, plugins: bool = False) -> Session:
    cfg = SessionConfig(
        greeting="mx.example", local_host="mx.example", databytes=200,
        rcpthosts=RcptHosts.from_lines(["example.org"]),
        badmailfrom=BadMailFrom.from_lines(["@bad.example"]),
        tls_available=tls, auth_available=True, plugins_enabled=plugins,
        max_line=MAX_LINE, utcoffset=0, randbits=lambda _bits: 7)  # same challenge each run
    return Session(cfg, {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALPORT": "25"}, lambda: 1e9)


class Driver:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.sent = bytearray()
        self.messages: list[bytes] = []
        self.current: list[bytes] | None = None
        self.closed = False
        self.auth_ok = False

    def run(self, actions: list[a.Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            assert not self.closed, f"{action!r} after Close"
            pending[:0] = self.perform(action)
            # Bounded buffer after every step.
            assert len(self.s._buf) <= max(MAX_LINE + 1, PARTIAL_FLUSH) or self.s.phase.value == "wait"

    def perform(self, action: a.Action) -> list[a.Action]:
        s = self.s
        if isinstance(action, a.Send):
            self.sent += action.data
        elif isinstance(action, a.Close):
            self.closed = True
        elif isinstance(action, a.BeginMessage):
            assert self.current is None
            self.current = []
        elif isinstance(action, a.MessageData):
            assert self.current is not None
            self.current.append(action.data)
        elif isinstance(action, a.AbortMessage):
            assert self.current is not None
            self.current = None
        elif isinstance(action, a.EndMessage):
            assert self.current is not None
            self.messages.append(b"".join(self.current))
            self.current = None
            return s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=1))
        elif isinstance(action, a.CheckPassword):
            self.auth_ok = not self.auth_ok
            return s.auth_result(self.auth_ok)
        elif isinstance(action, a.StartTLS):
            return s.tls_started("TEST")
        elif isinstance(action, a.RunHook):
            return s.hook_result(a.HookOutcome())
        elif isinstance(action, a.CheckClientCert):
            return s.cert_result(None, "no")
        return []


def drive(data: bytes, cuts: list[int], tls: bool = False, plugins: bool = False) -> Driver:
    d = Driver(make_session(tls, plugins))
    d.run(d.s.start())
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:], strict=False):
        if d.closed:
            break
        d.run(d.s.feed(data[start:end]))
    if not d.closed:
        d.run(d.s.eof())
    assert d.closed
    assert d.current is None, "a message was left open"
    return d


def assert_well_formed(sent: bytes) -> None:
    pos = 0
    while pos < len(sent):
        match = REPLY_LINE.match(sent, pos)
        assert match, f"malformed output at {pos}: {sent[pos:pos + 80]!r}"
        pos = match.end()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(inputs, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       st.booleans(), st.booleans())
def test_never_breaks(data: bytes, cuts: list[int], tls: bool, plugins: bool) -> None:
    d = drive(data, cuts, tls, plugins)
    assert_well_formed(bytes(d.sent))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(inputs, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_chunking_invariant(data: bytes, cuts: list[int]) -> None:
    whole = drive(data, [])
    chunked = drive(data, cuts)
    bytewise = drive(data, list(range(len(data))))
    assert chunked.sent == whole.sent == bytewise.sent
    assert chunked.messages == whole.messages == bytewise.messages


@given(st.integers(min_value=1, max_value=200_000), st.sampled_from([b"\r\n", b"x\r\n"]))
@settings(max_examples=15, deadline=None)
def test_long_data_line_streams(size: int, tail: bytes) -> None:
    """A DATA line without LF longer than PARTIAL_FLUSH is passed on in pieces and the
    result is the same whatever the chunking; the input buffer stays bounded."""
    prefix = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
    line = b"." + b"y" * size + b"\r" * (size % 3)
    data = prefix + line + tail + b".\r\nQUIT\r\n"

    def run(cuts: list[int]) -> Driver:
        d = Driver(make_session())
        d.s = Session(d.s.cfg.__class__(**{**d.s.cfg.__dict__, "databytes": 0}),
                      dict(d.s.env), lambda: 1e9)
        d.run(d.s.start())
        points = sorted(set(cuts) | {0, len(data)})
        for start, end in zip(points, points[1:], strict=False):
            d.run(d.s.feed(data[start:end]))
        return d

    one = run([])
    many = run(list(range(0, len(data), 65_000)))
    assert one.sent == many.sent
    assert one.messages == many.messages
    stored = b"y" * size + b"\r" * (size % 3) + (b"\n" if tail == b"\r\n" else b"x\n")
    assert one.messages == [stored]
