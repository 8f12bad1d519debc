"""Hypothesis properties of the remote side's reply parser (eqmail.smtp.client.ReplyParser),
which reads whatever a remote MTA sends: any bytes give replies or Dropped (never
another exception), reply texts are bounded and printable, and the result does not
depend on how TCP cut the bytes.
"""

from __future__ import annotations

from hypothesis import given, settings
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
