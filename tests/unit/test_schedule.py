"""qmail-send's retry schedule (qmail-core §1.7): nextretry, flagdying, attempt times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eqmail.queue.schedule import Channel, attempt_times, is_dying, next_retry

BIRTH = 1_700_000_000.0
WEEK = 604800


def test_local_attempts_on_time_are_squares_of_multiples_of_ten() -> None:
    times = attempt_times(BIRTH, Channel.LOCAL, WEEK)
    offsets = [t - BIRTH for t in times[:6]]
    assert offsets == [0, 100, 400, 900, 1600, 2500]


def test_remote_attempts_on_time_are_squares_of_multiples_of_twenty() -> None:
    times = attempt_times(BIRTH, Channel.REMOTE, WEEK)
    offsets = [t - BIRTH for t in times[:7]]
    assert offsets == [0, 400, 1600, 3600, 6400, 10000, 14400]


def test_next_retry_uses_floor_square_root_of_elapsed_time() -> None:
    # a pass that starts late (150 s after birth): isqrt(150) = 12 -> (12 + 10)^2 = 484
    assert next_retry(BIRTH, BIRTH + 150, Channel.LOCAL) == BIRTH + 484
    assert next_retry(BIRTH, BIRTH + 150, Channel.REMOTE) == BIRTH + (12 + 20) ** 2
    # the first pass, right at birth
    assert next_retry(BIRTH, BIRTH, Channel.LOCAL) == BIRTH + 100
    assert next_retry(BIRTH, BIRTH, Channel.REMOTE) == BIRTH + 400


def test_birth_in_the_future_takes_the_root_as_zero() -> None:
    assert next_retry(BIRTH, BIRTH - 5000, Channel.LOCAL) == BIRTH + 100
    assert next_retry(BIRTH, BIRTH - 5000, Channel.REMOTE) == BIRTH + 400


def test_dying_only_strictly_after_lifetime() -> None:
    assert not is_dying(BIRTH, BIRTH + WEEK, WEEK)
    assert is_dying(BIRTH, BIRTH + WEEK + 1, WEEK)
    assert not is_dying(BIRTH, BIRTH, 0)
    assert is_dying(BIRTH, BIRTH + 0.5, 0)


def test_last_attempt_is_the_first_pass_after_the_lifetime() -> None:
    for channel, k_last in ((Channel.REMOTE, 39), (Channel.LOCAL, 78)):
        times = attempt_times(BIRTH, channel, WEEK)
        step = 10 if channel is Channel.LOCAL else 20
        assert times[-1] - BIRTH == (step * k_last) ** 2 == 608400
        assert times[-2] - BIRTH <= WEEK < times[-1] - BIRTH
        assert len(times) == k_last + 1


def test_short_lifetime_gives_few_attempts() -> None:
    assert [t - BIRTH for t in attempt_times(BIRTH, Channel.LOCAL, 150)] == [0, 100, 400]
    # lifetime 0: the pass at birth is not yet "after" the lifetime, the next one is
    assert [t - BIRTH for t in attempt_times(BIRTH, Channel.REMOTE, 0)] == [0, 400]


@given(st.integers(min_value=0, max_value=10 * WEEK), st.sampled_from(list(Channel)))
def test_next_retry_is_always_in_the_future_and_on_the_formula(elapsed: int, channel: Channel) -> None:
    now = BIRTH + elapsed
    nxt = next_retry(BIRTH, now, channel)
    assert nxt > now
    skip = 10 if channel is Channel.LOCAL else 20
    root = int(elapsed ** 0.5)
    while root * root > elapsed:
        root -= 1
    while (root + 1) ** 2 <= elapsed:
        root += 1
    assert nxt == BIRTH + (root + skip) ** 2
