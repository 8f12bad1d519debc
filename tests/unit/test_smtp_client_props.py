"""Hypothesis properties of the remote side's reply parser (eqmail.smtp.client.ReplyParser),
which reads whatever a remote MTA sends: any bytes give replies or Dropped (never
another exception), reply texts are bounded and printable, and the result does not
depend on how TCP cut the bytes.
"""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from eqmail.smtp.client import MAX_LINE, MAX_TEXT, Reply, ReplyParser
from eqmail.smtp.transport import Dropped

Outcome = tuple[list[Reply], str | None]

reply_lines = st.lists(
    st.tuples(st.sampled_from([b"220", b"250", b"354", b"421", b"451", b"550", b"abc", b"2"]),
              st.sampled_from([b" ", b"-", b""]),
              st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))),
    max_size=12).map(lambda ls: b"".join(c + s + t + b"\r\n" for c, s, t in ls))


def parse(data: bytes, cuts: list[int]) -> Outcome:
    p = ReplyParser()
    out: list[Reply] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for start, end in zip(points, points[1:], strict=False):
            out += p.feed(data[start:end])
    except Dropped as e:
        return out, str(e)
    return out, None


@settings(max_examples=400)
@given(st.one_of(reply_lines, st.binary(max_size=300)), st.lists(st.integers(0, 400), max_size=8))
def test_any_bytes_give_replies_or_dropped(data: bytes, cuts: list[int]) -> None:
    replies, _ = parse(data, cuts)
    for r in replies:
        assert 0 <= r.code <= 999
        assert len(r.text) <= MAX_TEXT
        assert not any(c < " " and c not in "\n\t" for c in r.text)


@settings(max_examples=400)
@given(reply_lines, st.lists(st.integers(0, 400), max_size=8))
def test_chunking_does_not_matter_for_lines_within_the_bound(data: bytes, cuts: list[int]) -> None:
    """The same replies, or Dropped for both; replies parsed before a malformed line in
    the same feed() are not returned (the connection is dead anyway), so with Dropped
    the replies of one cutting are a prefix of the other's."""
    whole = parse(data, [])
    for other in (parse(data, cuts), parse(data, list(range(len(data))))):
        if whole[1] is None or other[1] is None:
            assert other == whole
        else:
            shorter, longer = sorted((whole[0], other[0]), key=len)
            assert longer[:len(shorter)] == shorter


def test_over_long_line_is_judged_the_same_however_it_arrives() -> None:
    data = b"220 " + b"x" * (MAX_LINE + 4000) + b"\r\n"
    assert parse(data, [MAX_LINE + 100]) == parse(data, [])


# ---------------------------------------------------------------- whole sessions

import io  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from eqmail.ipc.delivery import Verdict  # noqa: E402
from eqmail.smtp.client import ACCEPTED, Destination, Quit, RetryClear, SmtpSession, TryNext  # noqa: E402
from eqmail.smtp.transport import TlsConfig, Transport  # noqa: E402


class ScriptedPeer(Transport):
    """A server that does not listen: it sends its bytes whatever the client says, in
    the chunks given; a chunk marked early has already arrived when the client checks
    for unsolicited data, the others arrive when the client waits for a reply."""

    def __init__(self, chunks: list[tuple[bytes, bool]]) -> None:
        self.chunks = list(chunks)
        self.conn = None
        self.sent = bytearray()
        self.dot_sent = False
        self.after_dot = bytearray()  # what the client read after its end of data went out

    def _next(self) -> bytes:
        data = self.chunks.pop(0)[0]
        if self.dot_sent:
            self.after_dot += data
        return data

    def recv(self) -> bytes:
        return self._next() if self.chunks else b""

    def pending_input(self) -> bytes | None:
        return self._next() if self.chunks and self.chunks[0][1] else None

    def send(self, data: bytes) -> None:
        self.sent += data
        if b"\r\nDATA\r\n" in b"\r\n" + self.sent and data.endswith(b".\r\n"):
            self.dot_sent = True

    def start_tls(self, ctx: object, server_name: str) -> object:  # type: ignore[override]
        raise Dropped("no TLS here")

    def close(self) -> None:
        pass


WELL_FORMED_2XX = re.compile(rb"(?:(2\d\d)-[^\n]*\n)*(2\d\d)(?: [^\n]*)?\n")


def one_well_formed_2xx(data: bytes) -> bool:
    """The oracle, written apart from the parser: exactly one reply, every line 2xx
    with the same code, continuation lines with '-', the last with ' ' or nothing."""
    data = data.replace(b"\r", b"")
    if not WELL_FORMED_2XX.fullmatch(data):
        return False
    return len({ln[:3] for ln in data.split(b"\n")[:-1]}) == 1


STAGES = {
    "banner": [b"220 hi\r\n", b"220-a\r\n220 b\r\n", b"220 hi\r\n250 x\r\n", b"554 no\r\n",
               b"220-a\r\n250 b\r\n", b"421 busy\r\n"],
    "ehlo": [b"250-x\r\n250 SIZE 100000\r\n", b"250 x\r\n", b"500 no\r\n250 helo\r\n",
             b"250-x\r\n550 y\r\n", b"250-x\r\n250 SIZE 10\r\n"],
    "mail": [b"250 ok\r\n", b"354 x\r\n", b"451 no\r\n", b"250 ok\r\n250 ok\r\n"],
    "rcpt": [b"250 ok\r\n", b"550 no\r\n", b"354 x\r\n", b"250 ok\r\n"],
    "data": [b"354 go\r\n", b"250 ok\r\n", b"354 go\r\n250 ok\r\n", b"451 no\r\n", b"354-a\r\n250 b\r\n"],
    "final": [b"250 ok\r\n", b"354 x\r\n", b"250-a\r\n550 b\r\n", b"451 x\r\n",
              b"250 ok\r\n250 ok\r\n", b"", b"25", b"250-a\r\n250 b\r\n", b"250"],
}
def split(part: bytes, cut: int, early: bool, early_rest: bool) -> list[tuple[bytes, bool]]:
    cut %= len(part) + 1
    return [(part[:cut], early), (part[cut:], early_rest)]


# one stage's reply, maybe cut in two, each piece already there or not when checked
rarely = st.integers(0, 9).map(lambda n: n == 0)
scripted = st.tuples(
    *(st.tuples(st.sampled_from(v[:1] * 3 * len(v) + v), st.integers(0, 40), rarely, rarely)
      for v in STAGES.values()),  # the well-behaved reply (first) 3/4 of the time
    st.sampled_from([b"", b"250 extra\r\n", b"354 go\r\n", b"\r\n"]),
).map(lambda parts: [ch for part, cut, e1, e2 in parts[:-1] for ch in split(part, cut, e1, e2)]
      + [(parts[-1], False)])


def cut_up(data: bytes, cuts: list[tuple[int, bool]]) -> list[tuple[bytes, bool]]:
    points = sorted({c % (len(data) + 1) for c, _ in cuts} | {0, len(data)})
    flags = dict(cuts)
    return [(data[a:b], flags.get(a, False)) for a, b in zip(points, points[1:], strict=False)]


server_chunks = st.one_of(
    scripted,
    st.builds(cut_up, st.one_of(reply_lines, st.binary(max_size=200)),
              st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=10)))


@settings(max_examples=1000, deadline=None)
@given(server_chunks)
def test_delivered_only_after_a_well_formed_2xx_to_the_end_of_data(
        chunks: list[tuple[bytes, bool]]) -> None:
    """Whatever the server sends, however TCP cuts it and whenever it arrives: a
    success only when the bytes read after the final dot are exactly one well-formed
    2xx reply — the one the report quotes."""
    peer = ScriptedPeer([ch for ch in chunks if ch[0]])
    session = SmtpSession(peer, Destination("192.0.2.1"), "client.test", TlsConfig(Path("/nonexistent")))
    try:
        session.open()
    except (Quit, RetryClear, Dropped, TryNext):
        return
    rcpts, report = session.transaction("s@x.test", ["a@y.test"], io.BytesIO(b"Subject: x\n\nbody\n"))
    assert isinstance(report.verdict, Verdict)
    event(f"report {report.verdict.value}")
    if report.verdict is Verdict.SUCCESS:
        assert peer.dot_sent and rcpts == [ACCEPTED]
        assert one_well_formed_2xx(bytes(peer.after_dot)), (chunks, peer.after_dot)
        said = report.text.split("Remote host said: ", 1)[1]
        assert said.encode() == bytes(peer.after_dot).replace(b"\r", b"")
