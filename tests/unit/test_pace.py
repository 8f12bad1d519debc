"""eqmail.smtp.pace: the slow-client limits as arithmetic on reported reads."""

from __future__ import annotations

from eqmail.smtp import replies
from eqmail.smtp.pace import Pace


def read(p: Pace, waited: float, size: int = 1, *, partial: bool = False, done: bool = False,
         data: bool = False) -> None:
    p.after_read(waited, size, partial_line=partial, line_done=done, in_data=data)


def test_idle_timeout_when_nothing_is_pending() -> None:
    p = Pace(30, 500)
    d = p.next_read()
    assert (d.seconds, d.reply, d.event) == (30, replies.TIMEOUT, "timeout")
    read(p, 29.0, 6, done=True)  # a whole line after 29 s idle: fine, and nothing pending
    assert p.next_read().seconds == 30


def test_a_line_must_be_complete_timeout_after_its_first_byte() -> None:
    p = Pace(30, 500)
    read(p, 25.0, partial=True)  # the first byte came after 25 s idle: not counted
    assert p.next_read().seconds == 30
    for _ in range(3):
        read(p, 9.0, partial=True)  # a byte every 9 s never trips the idle timeout...
    d = p.next_read()
    assert (d.seconds, d.reply) == (3.0, replies.SLOW_LINE)  # ...but the line's limit
    read(p, 2.0, partial=True, done=True)  # a line completed; a new one began in this read
    assert p.next_read().seconds == 30
    read(p, 40.0, partial=True)
    assert p.next_read().seconds == 0.0  # clamped, never negative


def test_data_rate_allows_timeout_plus_bytes_over_rate() -> None:
    p = Pace(10, 100)
    read(p, 0.1, 6, data=True)  # "DATA\r\n": the 354 went out
    assert p.next_read().seconds == 10
    read(p, 4.0, 200, data=True)  # 200 bytes in 4 s: allowed 10 + 2 = 12, used 4
    d = p.next_read()
    assert (d.seconds, d.reply, d.event) == (8.0, replies.SLOW_DATA, "timeout (data too slow)")
    for _ in range(5):
        read(p, 1.0, 1, data=True)  # a byte a second: falls behind
    assert p.next_read().seconds == 10 + 205 / 100 - 9
    read(p, 0.5, 5, data=False)  # the end of data: back to the idle timeout
    assert p.next_read().reply is replies.TIMEOUT


def test_fast_data_may_take_longer_than_the_timeout() -> None:
    p = Pace(10, 100)
    read(p, 0.0, data=True)
    for _ in range(60):
        read(p, 1.0, 1000, data=True)  # 1000 bytes/s for a minute
    assert p.next_read().seconds == 10  # the idle timeout is the nearer limit


def test_min_rate_zero_disables_the_data_limit() -> None:
    p = Pace(10, 0)
    read(p, 0.0, data=True)
    for _ in range(30):
        read(p, 9.0, 1, data=True)
    assert p.next_read().reply is replies.TIMEOUT
