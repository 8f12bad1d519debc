"""CHUNKING (RFC 3030) in the pure SMTP session: BDAT's state machine, exact replies.

- ``BDAT <size> [LAST]`` reads exactly <size> octets after the command line, never
  scanning them (a ``\\r\\n.\\r\\n`` inside a chunk is data: no smuggling), stores them with
  CRLF -> LF (also when split between chunks), no dot-unstuffing, a bare CR as data, a
  bare LF refused as DATA refuses it (451 and close);
- non-LAST chunks get ``250 <n> octets received``, LAST gets qmail's ``250 ok <time> qp``;
- the refusals: 503 without MAIL/RCPT (the chunk still read), DATA in a BDAT
  transaction 503, BDAT after a refused BDAT 503 until RSET, a size over databytes 552
  after the chunk (the transaction dead), a malformed/negative/huge size 501 and close;
- Hypothesis: any chunking of a message stores the same bytes as DATA of that message;
  random BDAT command lines never break the session.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.smtp import actions as a
from eqmail.smtp import replies
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import DISCARD_LIMIT, Session, SessionConfig

ENV = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALPORT": "25"}
TXN = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.org>\r\n"
TXN_REPLIES = (b"250-mx.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
               b"250 SIZE %d\r\n250 ok\r\n250 ok\r\n")
QUEUED = b"250 ok 1000000000 qp 7\r\n"


class Driver:
    def __init__(self, databytes: int = 0, plugins: bool = False,
                 verdict: a.HookVerdict = a.HookVerdict.NORMAL) -> None:
        cfg = SessionConfig(greeting="mx.example", local_host="mx.example",
                            databytes=databytes, rcpthosts=RcptHosts.from_lines(["example.org"]),
                            plugins_enabled=plugins, utcoffset=0)
        self.s = Session(cfg, ENV, lambda: 1e9)
        self.verdict = verdict
        self.sent = bytearray()
        self.messages: list[bytes] = []
        self.current: list[bytes] | None = None
        self.events: list[str] = []
        self.closed = False
        self.run(self.s.start())
        self.sent.clear()

    def run(self, actions: list[a.Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            assert not self.closed, f"{action!r} after Close"
            pending[:0] = self.perform(action)

    def perform(self, action: a.Action) -> list[a.Action]:
        if isinstance(action, a.Send):
            self.sent += action.data
        elif isinstance(action, a.Close):
            self.closed = True
            self.events.append("close")
        elif isinstance(action, a.BeginMessage):
            assert self.current is None
            self.current = []
            self.events.append("begin")
        elif isinstance(action, a.MessageData):
            assert self.current is not None
            self.current.append(action.data)
        elif isinstance(action, a.AbortMessage):
            if self.current is not None:
                self.events.append("abort")
            self.current = None
        elif isinstance(action, a.EndMessage):
            assert self.current is not None
            self.messages.append(b"".join(self.current))
            self.current = None
            self.events.append("end")
            return self.s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=7))
        elif isinstance(action, a.RunHook):
            if action.stage is not a.HookStage.DATA:
                return self.s.hook_result(a.HookOutcome())
            self.events.append("hook")
            out = b"554 no thanks\r\n" if self.verdict is a.HookVerdict.REJECT else b""
            return self.s.hook_result(a.HookOutcome(self.verdict, out))
        return []

    def feed(self, data: bytes, cuts: list[int] | None = None) -> bytes:
        """Feed ``data`` (split at ``cuts``); the replies sent meanwhile."""
        start = len(self.sent)
        points = sorted({c % (len(data) + 1) for c in cuts or []} | {0, len(data)})
        for lo, hi in zip(points, points[1:], strict=False):
            if self.closed:
                break
            self.run(self.s.feed(data[lo:hi]))
        return bytes(self.sent[start:])

    def body(self) -> bytes:
        """The one stored message (its Received line is BeginMessage's prefix)."""
        assert len(self.messages) == 1, self.messages
        return self.messages[0]


def txn(databytes: int = 0) -> Driver:
    d = Driver(databytes)
    assert d.feed(TXN) == TXN_REPLIES % databytes
    return d


def test_chunks_then_last_queue_the_bytes_as_they_came() -> None:
    d = txn()
    got = d.feed(b"BDAT 12\r\nSubject: x\r\n"
                 b"BDAT 18\r\n\r\n.\r\nbody\r\n.\r\n..\r\n"
                 b"BDAT 0 LAST\r\nQUIT\r\n")
    assert got == b"250 12 octets received\r\n250 18 octets received\r\n" + QUEUED + \
        b"221 mx.example\r\n"
    # no end-of-data scanning, no dot-unstuffing: ".\r\n" inside a chunk is data
    assert d.body() == b"Subject: x\n\n.\nbody\n.\n..\n"
    assert d.events == ["begin", "end", "close"]


def test_bdat_last_alone_and_lowercase() -> None:
    d = txn()
    assert d.feed(b"bdat 4 last\r\nab\r\n") == QUEUED
    assert d.body() == b"ab\n"
    assert d.feed(b"BDAT 0 LAST\r\n") == replies.MAIL_FIRST.wire()  # after LAST: new MAIL


def test_bdat_zero_last_queues_an_empty_message() -> None:
    d = txn()
    assert d.feed(b"BDAT 0 LAST\r\n") == QUEUED
    assert d.body() == b""


def test_crlf_split_between_chunks_and_bare_cr() -> None:
    d = txn()
    assert d.feed(b"BDAT 3\r\na\r\rBDAT 3\r\n\nb\rBDAT 1 LAST\r\n\r") == (
        b"250 3 octets received\r\n250 3 octets received\r\n" + QUEUED)
    assert d.body() == b"a\r\nb\r\r"  # CR CR LF -> CR LF; bare CRs are data


def test_bare_lf_in_a_chunk_is_refused_like_data() -> None:
    d = txn()
    assert d.feed(b"BDAT 4\r\na\nb\r") == replies.BARE_LF.wire()
    assert d.closed and d.events == ["begin", "abort", "close"]


def test_bdat_without_mail_or_rcpt_reads_the_chunk_then_503() -> None:
    d = Driver()
    assert d.feed(b"BDAT 6\r\nNOOP\r\nNOOP\r\n") == replies.MAIL_FIRST.wire() + b"250 ok\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example>\r\nBDAT 6 LAST\r\nRSET\r\nRSET\r\n") == (
        b"250 ok\r\n" + replies.RCPT_FIRST.wire() + b"250 flushed\r\n")
    assert d.events == []


def test_data_after_bdat_is_503_and_the_chunked_message_goes_on() -> None:
    d = txn()
    assert d.feed(b"BDAT 3\r\nx\r\nDATA\r\nBDAT 3 LAST\r\ny\r\n") == (
        b"250 3 octets received\r\n" + replies.BDAT_MIXED.wire() + QUEUED)
    assert d.body() == b"x\ny\n"


def test_size_over_databytes_552_after_the_chunk_then_dead_until_rset() -> None:
    d = txn(databytes=10)
    assert d.feed(b"BDAT 6\r\n123456BDAT 5\r\n12345") == (
        b"250 6 octets received\r\n" + replies.TOO_BIG.wire())
    assert d.events == ["begin", "abort"]
    assert d.feed(b"BDAT 1 LAST\r\nzDATA\r\n") == (
        replies.BDAT_FAILED.wire() + replies.BDAT_MIXED.wire())
    assert d.feed(b"RSET\r\nBDAT 1 LAST\r\nz") == b"250 flushed\r\n" + replies.MAIL_FIRST.wire()
    d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.org>\r\nBDAT 10 LAST\r\n0123456789")
    assert d.messages and d.sent.endswith(QUEUED)


def test_first_chunk_over_databytes_never_begins_a_message() -> None:
    d = txn(databytes=3)
    assert d.feed(b"BDAT 4 LAST\r\nabcdNOOP\r\n") == replies.TOO_BIG.wire() + b"250 ok\r\n"
    assert d.events == [] and not d.closed


def test_huge_refused_chunk_is_answered_and_closed_unread() -> None:
    d = Driver()
    assert d.feed(b"BDAT %d\r\n" % (DISCARD_LIMIT + 1)) == replies.MAIL_FIRST.wire()
    assert d.closed


def test_malformed_sizes_501_and_close() -> None:
    for arg in (b"", b" x", b" -1", b" 1.5", b" 12 MORE", b" 1234567890123456", b" +3"):
        d = txn()
        assert d.feed(b"BDAT" + arg + b"\r\nNOOP\r\n") == replies.BDAT_SYNTAX.wire(), arg
        assert d.closed


def test_eof_in_a_chunk_or_between_chunks_drops_the_message() -> None:
    for tail in (b"BDAT 10\r\nshort", b"BDAT 2\r\nok"):
        d = txn()
        d.feed(tail)
        d.run(d.s.eof())
        assert d.events == ["begin", "abort", "close"], tail
        assert d.messages == []


def test_rset_and_mail_between_chunks_drop_the_message() -> None:
    d = txn()
    d.feed(b"BDAT 2\r\nokRSET\r\n")
    assert d.events == ["begin", "abort"]
    d = txn()
    d.feed(b"BDAT 2\r\nokMAIL FROM:<x@y.example>\r\n")
    assert d.events == ["begin", "abort"]


def test_auth_between_chunks_is_refused() -> None:
    d = txn()
    assert d.feed(b"BDAT 1\r\nxAUTH PLAIN\r\n").endswith(b"\r\n503 auth not available (#5.3.3)\r\n")


def test_data_hook_runs_once_and_its_rejection_kills_the_transaction() -> None:
    d = Driver(plugins=True, verdict=a.HookVerdict.REJECT)
    d.feed(TXN)
    assert d.feed(b"BDAT 3\r\nabcBDAT 1 LAST\r\nz") == (
        b"554 no thanks\r\n" + replies.BDAT_FAILED.wire())
    assert d.events == ["hook"]


def test_with_plugins_the_message_is_queued_the_same() -> None:
    d = Driver(plugins=True)
    d.feed(TXN)
    assert d.feed(b"BDAT 3\r\nab\nBDAT 0 LAST\r\n") == replies.BARE_LF.wire()
    d = Driver(plugins=True)
    d.feed(TXN)
    assert d.feed(b"BDAT 3\r\nab\rBDAT 1 LAST\r\n\n") == b"250 3 octets received\r\n" + QUEUED
    assert d.body() == b"ab\n"
    assert d.events == ["hook", "begin", "end"]  # the [data] plugins run at the first chunk


def test_looping_message_is_refused_at_last() -> None:
    d = txn()
    header = b"Received: x\r\n" * 100
    assert d.feed(b"BDAT %d LAST\r\n" % len(header) + header) == replies.TOO_MANY_HOPS.wire()
    assert d.events == ["begin", "abort"]
    d = txn()
    assert d.feed(b"BDAT 12 LAST\r\n" + b"Received: x\r\n"[:12]) == QUEUED


# ---------------------------------------------------------------- properties

lines = st.lists(st.sampled_from([b"Subject: hi", b"Received: r", b"", b".", b"..x",
                                  b"body", b"a\rb", b"x" * 70, b"delivered-to: q"]),
                 max_size=12)


def stored_via_data(body_lines: list[bytes]) -> bytes:
    d = txn()
    wire = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in body_lines)
    d.feed(b"DATA\r\n" + wire + b".\r\n")
    return d.messages[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines, st.lists(st.integers(0, 2000), max_size=6), st.lists(st.integers(0, 3000), max_size=8),
       st.booleans())
def test_any_chunking_stores_what_data_stores(body_lines: list[bytes], splits: list[int],
                                              cuts: list[int], empty_last: bool) -> None:
    message = b"".join(ln + b"\r\n" for ln in body_lines)
    points = sorted({s % (len(message) + 1) for s in splits} | {0, len(message)})
    chunks = [message[lo:hi] for lo, hi in zip(points, points[1:], strict=False)] or [b""]
    wire = bytearray()
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1 and not empty_last
        wire += b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk
    if empty_last:
        wire += b"BDAT 0 LAST\r\n"
    d = txn()
    got = d.feed(bytes(wire) + b"NOOP\r\n", cuts)
    assert got.endswith(QUEUED + b"250 ok\r\n")
    assert d.messages == [stored_via_data(body_lines)]


words = st.sampled_from([b"BDAT", b"bdat", b" ", b"LAST", b"last", b"0", b"1", b"7",
                         b"99999999999999999", b"-", b"x", b"\t", b"\r", b"\x00"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(words, max_size=6).map(b"".join), max_size=6),
       st.binary(max_size=40), st.booleans())
def test_random_bdat_lines_never_break_the_session(cmds: list[bytes], data: bytes,
                                                   in_txn: bool) -> None:
    d = txn(databytes=20) if in_txn else Driver(databytes=20)
    d.feed(b"".join(b"BDAT " + c + b"\r\n" + data[:5] for c in cmds) + data)
    d.run(d.s.eof())
    assert d.closed and d.current is None
    for line in bytes(d.sent).split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), d.sent
