"""Bounces in QSBMF (qmail-core §2): notes, who gets the bounce, the exact bytes."""

from __future__ import annotations

import email
import io
import time
from collections.abc import Iterator

import pytest

from eqmail.queue.bounce import (
    DOUBLE_BOUNCE_SENDER,
    BounceRate,
    BounceTarget,
    Excerpt,
    bounce_note,
    bounce_target,
    bounded_copy,
    compose_bounce,
    quote_address,
)

NOW = 1_700_000_000.0  # 14 Nov 2023 22:13:20 UTC


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ------------------------------------------------------------------ notes


def test_note_adds_missing_newline_and_closing_blank_line() -> None:
    assert bounce_note("joe@x.org", "Sorry. (#5.1.1)") == "<joe@x.org>:\nSorry. (#5.1.1)\n\n"
    assert bounce_note("joe@x.org", "Sorry. (#5.1.1)\n") == "<joe@x.org>:\nSorry. (#5.1.1)\n\n"


def test_note_blank_lines_inside_become_slash() -> None:
    assert bounce_note("a@b", "one\n\ntwo\n") == "<a@b>:\none\n/two\n\n"
    # qmail walks backwards: every \n preceded by \n becomes /, so runs give //
    assert bounce_note("a@b", "one\n\n\ntwo\n") == "<a@b>:\none\n//two\n\n"
    # the last character is never changed: a text ending in a blank line keeps it
    assert bounce_note("a@b", "one\n\n") == "<a@b>:\none\n\n\n"


def test_note_with_empty_report() -> None:
    # qmail-local exit 100 with no output: the paragraph is the address line alone
    assert bounce_note("a@b", "") == "<a@b>:\n\n"


def test_note_newlines_in_address_become_underscore() -> None:
    assert bounce_note("a\nb@c", "x\n") == "<a_b@c>:\nx\n\n"


def test_note_paragraph_is_contiguous() -> None:
    note = bounce_note("a@b", "l1\n\n\nl2\n\nl3")
    body = note[:-1]  # without the closing blank line
    assert "\n\n" not in body and note.endswith("\n\n")


# ------------------------------------------------------------------ targets


def test_single_double_triple_targets() -> None:
    assert bounce_target("joe@x.org", "postmaster", "mx.example") == BounceTarget("", "joe@x.org", False)
    assert bounce_target("", "postmaster", "mx.example") == BounceTarget(
        DOUBLE_BOUNCE_SENDER, "postmaster@mx.example", True)
    assert bounce_target("#@[]", "postmaster", "mx.example") is None


def test_verp_sender_is_reduced_before_bouncing() -> None:
    assert bounce_target("owner-@list.example-@[]", "pm", "h") == BounceTarget("", "owner-@list.example", False)


def test_doublebounceto_and_host_are_used() -> None:
    t = bounce_target("", "admin", "other.example")
    assert t is not None and t.recipient == "admin@other.example" and t.envelope_sender == "#@[]"


# ------------------------------------------------------------------ message


def test_single_bounce_exact_bytes(utc: None) -> None:
    notes = bounce_note("nosuchuser@mx.test.example", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    head = compose_bounce(target=BounceTarget("", "joe@x.org", False), original_sender="joe@x.org",
                          notes=notes.encode(), bouncefrom="MAILER-DAEMON", bouncehost="mx.test.example",
                          now=NOW)
    assert head == (
        b"Date: 14 Nov 2023 22:13:20 +0000\n"
        b"From: MAILER-DAEMON@mx.test.example\n"
        b"To: joe@x.org\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at mx.test.example.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        b"\n"
        b"<nosuchuser@mx.test.example>:\n"
        b"Sorry, no mailbox here by that name. (#5.1.1)\n"
        b"\n"
        b"--- Below this line is a copy of the message.\n"
        b"\n"
        b"Return-Path: <joe@x.org>\n"
    )


def test_double_bounce_exact_bytes(utc: None) -> None:
    notes = b"<joe@x.org>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
    head = compose_bounce(target=BounceTarget("#@[]", "postmaster@mx.test.example", True), original_sender="",
                          notes=notes, bouncefrom="MAILER-DAEMON", bouncehost="mx.test.example", now=NOW)
    assert head == (
        b"Date: 14 Nov 2023 22:13:20 +0000\n"
        b"From: MAILER-DAEMON@mx.test.example\n"
        b"To: postmaster@mx.test.example\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at mx.test.example.\n"
        b"I tried to deliver a bounce message to this address, but the bounce bounced!\n"
        b"\n"
        b"<joe@x.org>:\n"
        b"Sorry, no mailbox here by that name. (#5.1.1)\n"
        b"\n"
        b"--- Below this line is the original bounce.\n"
        b"\n"
        b"Return-Path: <>\n"
    )


def test_date_uses_local_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "CET-1")
    time.tzset()
    try:
        head = compose_bounce(target=BounceTarget("", "a@b", False), original_sender="a@b", notes=b"",
                              bouncefrom="MAILER-DAEMON", bouncehost="h", now=NOW)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert head.startswith(b"Date: 14 Nov 2023 23:13:20 +0100\n")


def test_addresses_are_quoted_like_qmail(utc: None) -> None:
    head = compose_bounce(target=BounceTarget("", "a b@x.org", False), original_sender="a b@x.org",
                          notes=b"", bouncefrom="mailer daemon", bouncehost="h.example", now=NOW)
    assert b'From: "mailer daemon"@h.example\n' in head
    assert b'To: "a b"@x.org\n' in head
    assert head.endswith(b'Return-Path: <"a b"@x.org>\n')


@pytest.mark.parametrize(("addr", "quoted"), [
    ("joe@x.org", "joe@x.org"),
    ("j.o.e@x.org", "j.o.e@x.org"),
    ("a+b=c@x", "a+b=c@x"),
    (".joe@x", '".joe"@x'),
    ("joe.@x", '"joe."@x'),
    ("j..oe@x", '"j..oe"@x'),
    ('a"b@x', '"a\\"b"@x'),
    ("a\\b@x", '"a\\\\b"@x'),
    ("a(b)@x", '"a(b)"@x'),
    ("@x", '""@x'),
    ("", ""),
    ("nohost", "nohost"),
    ("a@b@c", '"a@b"@c'),
])
def test_quote_address(addr: str, quoted: str) -> None:
    assert quote_address(addr) == quoted


# ------------------------------------------------------------------ size limit (bouncemaxbytes)


def test_truncated_bounce_says_so_in_its_break_paragraph(utc: None) -> None:
    notes = b"<joe@x.org>:\nSorry. (#5.1.1)\n\n"
    target = BounceTarget("", "joe@x.org", False)
    whole = compose_bounce(target=target, original_sender="joe@x.org", notes=notes,
                           bouncefrom="MAILER-DAEMON", bouncehost="mx", now=NOW,
                           excerpt=Excerpt(50_000, 50_000))
    assert b"\n--- Below this line is a copy of the message.\n\nReturn-Path:" in whole
    cut = compose_bounce(target=target, original_sender="joe@x.org", notes=notes,
                         bouncefrom="MAILER-DAEMON", bouncehost="mx", now=NOW,
                         excerpt=Excerpt(1_048_576, 50_000))
    assert cut.endswith(
        b"Sorry. (#5.1.1)\n\n"
        b"--- Below this line is the beginning of a copy of the message, cut to at most "
        b"50000 of its 1048576 bytes.\n"
        b"--- The rest of the message is not included.\n"
        b"\n"
        b"Return-Path: <joe@x.org>\n")
    double = compose_bounce(target=BounceTarget("#@[]", "pm@mx", True), original_sender="",
                            notes=notes, bouncefrom="MAILER-DAEMON", bouncehost="mx", now=NOW,
                            excerpt=Excerpt(60_000, 50_000))
    assert b"\n--- Below this line is the beginning of the original bounce, cut to" in double
    assert not Excerpt(10**9, 0).truncated  # 0: the whole message, as qmail


@pytest.mark.parametrize("limit", [1, 7, 100, 65_535, 65_536, 65_537, 200_000])
def test_bounded_copy_is_at_most_the_limit_and_ends_at_a_line_end(limit: int) -> None:
    lines = b"".join(b"line %06d " % i + b"x" * (i % 90) + b"\n" for i in range(5000))
    copy = b"".join(bounded_copy(io.BytesIO(lines), limit))
    if len(lines) <= limit:
        assert copy == lines
        return
    assert len(copy) <= limit + 1 and copy.endswith(b"\n")
    if b"\n" in lines[:limit]:
        assert lines.startswith(copy) and len(copy) > limit - 65_536 - 100
    else:
        assert copy == lines[:limit] + b"\n"


def test_bounded_copy_of_a_short_or_exact_message_is_the_message() -> None:
    assert b"".join(bounded_copy(io.BytesIO(b"a\nb"), 3)) == b"a\nb"
    assert b"".join(bounded_copy(io.BytesIO(b"a\nb"), 10)) == b"a\nb"
    assert b"".join(bounded_copy(io.BytesIO(b""), 10)) == b""
    assert b"".join(bounded_copy(io.BytesIO(b"no line end at all"), 5)) == b"no li\n"


def test_a_truncated_bounce_parses_with_pythons_email(utc: None) -> None:
    original = b"Received: x\nSubject: big\nMIME-Version: 1.0\n\n" + b"y" * 77 + b"\n" * 1000
    head = compose_bounce(target=BounceTarget("", "joe@x.org", False), original_sender="a@b",
                          notes=b"<joe@x.org>:\nSorry.\n\n", bouncefrom="MAILER-DAEMON",
                          bouncehost="mx", now=NOW, excerpt=Excerpt(len(original), 200))
    msg = email.message_from_bytes(head + b"".join(bounded_copy(io.BytesIO(original), 200)))
    assert msg["Subject"] == "failure notice" and msg["To"] == "joe@x.org"
    assert not msg.defects
    body = msg.get_payload()
    assert isinstance(body, str) and "Subject: big" in body and len(body) < 1000


# ------------------------------------------------------------------ rate limit (bouncelimit)


def test_bounce_rate_per_address_per_window() -> None:
    rate = BounceRate(3, window=3600)
    assert [rate.allow("Joe@X.org", NOW + i) for i in range(5)] == [True, True, True, False, False]
    assert rate.allow("other@x.org", NOW + 5)               # another address: its own count
    assert not rate.allow("joe@x.org", NOW + 3599)           # case-insensitive, same window
    assert rate.allow("joe@x.org", NOW + 3600)               # the next hour
    assert all(BounceRate(0).allow("joe@x.org", NOW) for _ in range(100))  # 0: no limit


def test_bounce_rate_table_is_bounded() -> None:
    rate = BounceRate(1, window=10, max_addresses=100)
    for i in range(1000):
        assert rate.allow(f"a{i}@x", NOW)
    assert len(rate._seen) <= 100
    assert not rate.allow("a999@x", NOW)   # recent entries are kept
