"""Bounces in QSBMF (qmail-core §2): notes, who gets the bounce, the exact bytes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from eqmail.delivery.bounce import (
    DOUBLE_BOUNCE_SENDER,
    BounceTarget,
    bounce_note,
    bounce_target,
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
