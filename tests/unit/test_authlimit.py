"""eqmail.authlimit: the per-address AUTH failure table and control/authlimit."""

from __future__ import annotations

from pathlib import Path

import pytest

from eqmail.authlimit import AuthLimit, AuthLimiter, client_key, read_authlimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("text, expect", [
    ("", AuthLimit(10, 600.0, 5.0)),
    ("# only a comment\n", AuthLimit(10, 600.0, 5.0)),
    ("5 300\n", AuthLimit(5, 300.0, 5.0)),
    ("5 300 0.25\n", AuthLimit(5, 300.0, 0.25)),
    ("# tuned\n3 60 1 # short\n", AuthLimit(3, 60.0, 1.0)),
    ("0\n", AuthLimit(0, 600.0, 5.0)),
])
def test_parse(text: str, expect: AuthLimit) -> None:
    assert AuthLimit.parse(text) == expect


@pytest.mark.parametrize("text", ["x 300", "5 -1", "5 1e3", "5 300 0.5 9", "5 nan", "-5 30",
                                  "5 9999999"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        AuthLimit.parse(text)


def test_read_authlimit(tmp_path: Path) -> None:
    assert read_authlimit(tmp_path) == (AuthLimit(), None)
    (tmp_path / "authlimit").write_text("4 120 2\n")
    assert read_authlimit(tmp_path) == (AuthLimit(4, 120.0, 2.0), None)
    (tmp_path / "authlimit").write_text("lots\n")
    limit, warning = read_authlimit(tmp_path)
    assert limit == AuthLimit() and warning is not None and "control/authlimit:1:" in warning


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("not an address", "not an address"),
])
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_delay_grows_then_lockout_then_fresh_start() -> None:
    clock = Clock()
    lim = AuthLimiter(AuthLimit(failures=5, seconds=100, delay=2), clock)
    ip = "192.0.2.1"
    delays = []
    for _ in range(4):
        assert lim.locked(ip) == 0
        delays.append(lim.failed(ip))
        clock.now += 1
    assert delays == [2, 4, 6, 8]  # slowed down, one step per failure in the window
    assert lim.failed(ip) == 8      # capped at 4 steps; the 5th failure locks
    assert lim.locked(ip) == pytest.approx(100)
    clock.now += 60
    assert lim.locked(ip) == pytest.approx(40)
    assert lim.locked("192.0.2.2") == 0  # other addresses are not affected
    clock.now += 41
    assert lim.locked(ip) == 0
    assert lim.failed(ip) == 2  # the lock-out over, the count starts from zero


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    lim = AuthLimiter(AuthLimit(failures=3, seconds=10, delay=1), clock)
    for _ in range(10):
        lim.failed("192.0.2.1")
        clock.now += 6  # never more than two in any 10 s
        assert lim.locked("192.0.2.1") == 0


def test_one_ipv6_64_is_one_client() -> None:
    clock = Clock()
    lim = AuthLimiter(AuthLimit(failures=2, seconds=10, delay=0), clock)
    lim.failed("2001:db8::1")
    lim.failed("2001:db8::2:3")
    assert lim.locked("2001:db8::ffff") > 0
    assert lim.locked("2001:db8:0:1::1") == 0


def test_zero_failures_never_locks_but_keeps_the_delay() -> None:
    lim = AuthLimiter(AuthLimit(failures=0, seconds=600, delay=5), Clock())
    for _ in range(50):
        assert lim.failed("192.0.2.1") <= 20
    assert lim.locked("192.0.2.1") == 0


def test_table_is_bounded() -> None:
    clock = Clock()
    lim = AuthLimiter(AuthLimit(failures=1, seconds=600, delay=0), clock, max_addresses=100)
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim) == 100
    assert lim.locked("10.0.3.231") > 0   # the most recent ones are kept
    assert lim.locked("10.0.0.0") == 0    # the oldest were forgotten
