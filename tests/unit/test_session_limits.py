"""What one SMTP client may take, at the pure session (issue 12, items 7-9): the
Delay action after smtperrorsoftlimit errors, the counters' resets, the recipient bound,
and what the session tells the listener for its time limits (partial_line, in_data)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from eqmail.smtp import actions as a
from eqmail.smtp import replies
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import Session, SessionConfig

CFG = SessionConfig(greeting="mx.example.org", local_host="mx.example.org", databytes=0,
                    rcpthosts=RcptHosts.from_lines(["example.org"]))
ENV = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "192.0.2.25", "TCPLOCALPORT": "25"}


def started(cfg: SessionConfig = CFG) -> Session:
    s = Session(cfg, ENV, lambda: 1700000000.0)
    s.start()
    return s


def delays(actions: list[a.Action]) -> list[float]:
    return [x.seconds for x in actions if isinstance(x, a.Delay)]


def sent(actions: list[a.Action]) -> bytes:
    return b"".join(x.data for x in actions if isinstance(x, a.Send))


def deliver(s: Session) -> None:
    s.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<joe@example.org>\r\nDATA\r\n")
    out = s.feed(b"x\r\n.\r\n")
    assert any(isinstance(x, a.EndMessage) for x in out)
    assert sent(s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=1))).startswith(b"250 ok")


def test_each_reply_after_the_soft_limit_is_delayed() -> None:
    s = started()
    for _ in range(10):
        out = s.feed(b"BOGUS\r\n")
        assert delays(out) == [] and sent(out) == replies.UNRECOGNISED.wire()
    # the 11th error reply, and every reply after it (errors or not), waits 1 s first
    out = s.feed(b"BOGUS\r\n")
    assert out[0] == a.Delay(1.0) and sent(out) == replies.UNRECOGNISED.wire()
    out = s.feed(b"NOOP\r\nHELO x.example\r\n")
    assert delays(out) == [1.0, 1.0]
    assert [type(x) for x in out] == [a.Delay, a.Send, a.Delay, a.Send]  # each before its reply
    assert not s.closed


def test_hard_limit_closes_after_the_20th_error_in_the_same_batch() -> None:
    s = started(replace(CFG, error_sleep=0))
    out = s.feed(b"BOGUS\r\n" * 19 + b"NOOP\r\n" + b"BOGUS\r\n" + b"NOOP\r\n" * 3)
    text = sent(out)
    assert text == (replies.UNRECOGNISED.wire() * 19 + replies.OK.wire()
                    + replies.UNRECOGNISED.wire() + replies.TOO_MANY_ERRORS.wire())
    assert isinstance(out[-1], a.Close) and s.closed


def test_delivered_message_resets_the_error_count() -> None:
    s = started()
    s.feed(b"BOGUS\r\n" * 12)
    assert delays(s.feed(b"NOOP\r\n")) == [1.0]
    deliver(s)
    assert delays(s.feed(b"BOGUS\r\n")) == []


def test_limits_zero_turn_them_off() -> None:
    s = started(replace(CFG, error_soft_limit=0, error_hard_limit=0, junk_limit=0))
    out = s.feed(b"BOGUS\r\n" * 200 + b"NOOP\r\n" * 500)
    assert delays(out) == [] and not s.closed
    assert sent(out).endswith(replies.OK.wire())


def test_deferred_message_does_not_reset_the_counts() -> None:
    s = started(replace(CFG, junk_limit=2))
    s.feed(b"NOOP\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<joe@example.org>\r\nDATA\r\n")
    s.feed(b"x\r\n.\r\n")
    s.queue_result(a.QueueOutcome(a.QueueStatus.DEFERRED, text="qqt failure (#4.3.0)"))
    assert sent(s.feed(b"RSET\r\n")) == replies.TOO_MANY_JUNK.wire() and s.closed


def test_recipients_are_bounded() -> None:
    s = started()  # maxrcpt default 1000
    s.feed(b"MAIL FROM:<a@b.example>\r\n")
    out = sent(s.feed(b"RCPT TO:<joe@example.org>\r\n" * 1005))
    assert out.count(b"250 ok\r\n") == 1000
    assert out.count(replies.TOO_MANY_RCPTS.wire()) == 5
    assert len(s.recipients) == 1000


def test_partial_line_and_in_data_for_the_listener() -> None:
    s = started()
    assert not s.partial_line and not s.in_data
    s.feed(b"HEL")
    assert s.partial_line and s.lines == 0
    s.feed(b"O x.example\r\nMA")
    assert s.partial_line and s.lines == 1
    s.feed(b"IL FROM:<a@b.example>\r\n")
    assert not s.partial_line and s.lines == 2
    s.feed(b"RCPT TO:<joe@example.org>\r\nDATA\r\n")
    assert s.in_data and not s.partial_line
    s.feed(b"partial data line")
    assert s.in_data and not s.partial_line  # DATA has its own limit (the rate)
    s.feed(b"\r\n.\r\n")
    assert not s.in_data
    s.feed(b"NOOP")
    assert not s.partial_line  # waiting for the queue: no line is being read
    s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=1))
    assert s.partial_line
    s.feed(b"\r\n")
    s.feed(b"x" * (CFG.max_line + 10))  # an over-long line being skipped is still unfinished
    assert s.partial_line


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO", b"helo", b"HELO ", b"EHLO \t "])
def test_helo_without_a_name(verb: bytes) -> None:
    s = started()
    assert sent(s.feed(verb + b"\r\n")) == replies.HELO_SYNTAX.wire()
    assert s.helo is None
