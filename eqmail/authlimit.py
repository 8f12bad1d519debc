"""Brute-force protection for SMTP AUTH: per client address, slow down, then refuse.

eQmail has one defence, qmail-smtpd-auth's ``sleep(5)`` before every 535, and it is per
connection: a guesser opening many connections is not slowed at all.  eqmail keeps the
delay and adds a per-address count of failures in a sliding window:

* every failed AUTH (the checker said no) waits ``delay × n`` seconds before the 535,
  ``n`` being that address's failures in the window, at most 4 (5, 10, 15, 20, 20 ... s
  with the defaults): a guesser is slowed down, a typo costs the usual 5 s;
* the ``failures``-th failure within ``seconds`` locks the address out for ``seconds``:
  AUTH then gets ``454 too many authentication failures, try later (#4.7.0)`` at once and
  the checkpassword program is not run at all (no password is checked, no CPU spent);
* when the lock-out ends the address starts again from zero.  Success does not clear
  the count (one known account must not unlock guessing at the others).

An "address" is the IPv4 address or the IPv6 /64 (one host usually has a whole /64).
The table is bounded (least recently seen addresses are forgotten first).  It lives in
the plugin sandbox worker (eqmail.workers.sandbox), which runs every checkpassword for
every listener process: so the count is one for all of them (``processes=N``, smtp,
submission and smtps alike), and it survives a reload (listeners are re-forked, the
sandbox is not) and a listener killed with SIGKILL.  The sandbox checks an address's
lock-out, runs the checker and records its failure as one step per address (checks
from one address are serialised), so parallel sessions cannot all guess before the
count catches up.  It starts empty only when the sandbox itself restarts (a crash, or
a reload that changes spptimeout); the per-session cap still holds then.  Each
listener sends its own parsed control/authlimit with every check, so a changed file
applies from the reload on, to the counts gathered before it (a listener kept across
a reload gets it with its new configuration, eqmail.workers.listener.reconfigure).

Configuration: ``control/authlimit``, one line ``FAILURES SECONDS [DELAY]``, default
``10 600 5``.  ``FAILURES`` 0 turns the lock-out off (the delay stays: eQmail's
behaviour).  DELAY may be fractional (the tests use a short one).

The file is read once per load of the configuration, by eqmail.control
(``Controls.authlimit``, a problem in ``Controls.warnings``) through :func:`read_authlimit`;
the listener keeps the 535 delay (the sandbox answers how long);
eqmail.smtp.session closes a session at its MAX_AUTH_FAILURES-th failure.

Pure apart from the injected clock; never raises after construction.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOCKED_TEXT = "too many authentication failures, try later (#4.7.0)"
MAX_DELAY_STEPS = 4
MAX_ADDRESSES = 10000


@dataclass(frozen=True)
class AuthLimit:
    failures: int = 10      # failures within ``seconds`` that lock an address out; 0 = never
    seconds: float = 600.0  # the sliding window, and how long a lock-out lasts
    delay: float = 5.0      # qmail-smtpd-auth's sleep before 535, per failure in the window

    @classmethod
    def parse(cls, text: str) -> AuthLimit:
        """The first non-comment line of control/authlimit; ValueError naming the field."""
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 3:
                raise ValueError("expected FAILURES SECONDS [DELAY]")
            if not words[0].isdigit():
                raise ValueError(f"FAILURES is not a number: {words[0]!r}")
            values = [float(w) if _is_number(w) else None for w in words[1:]]
            if None in values or any(v is not None and not 0 <= v <= 86400 * 7 for v in values):
                raise ValueError("SECONDS and DELAY must be numbers from 0 to 604800")
            seconds = values[0] if values else cls.seconds
            delay = values[1] if len(values) > 1 else cls.delay
            return cls(int(words[0]), float(seconds or 0), float(delay or 0))
        return cls()


def _is_number(word: str) -> bool:
    """Plain decimal: no sign, exponent, inf or nan."""
    return word.replace(".", "", 1).isdigit()


def read_authlimit(control: Path) -> tuple[AuthLimit, str | None]:
    """control/authlimit, or the defaults with a warning text when it does not parse."""
    try:
        with open(control / "authlimit", encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except FileNotFoundError:
        return AuthLimit(), None
    except OSError as e:
        return AuthLimit(), f"control/authlimit: unreadable ({e.strerror}); using defaults"
    try:
        return AuthLimit.parse(text), None
    except ValueError as e:
        return AuthLimit(), f"control/authlimit:1: {e}; using defaults"


def client_key(ip: str) -> str:
    """The unit that is counted: an IPv4 address, or an IPv6 address's /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass
class _Client:
    failures: list[float] = field(default_factory=list)  # times, oldest first
    locked_until: float = 0.0


class AuthLimiter:
    """The failure table of one listener process."""

    def __init__(self, limit: AuthLimit, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.limit = limit
        self.clock = clock
        self.max_addresses = max_addresses
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def locked(self, ip: str) -> float:
        """Seconds left of this address's lock-out (0: AUTH may proceed)."""
        client = self._clients.get(client_key(ip))
        if client is None:
            return 0.0
        left = client.locked_until - self.clock()
        if left > 0:
            return left
        if client.locked_until:  # the lock-out is over: a fresh start
            client.locked_until = 0.0
            client.failures.clear()
        return 0.0

    def failed(self, ip: str, limit: AuthLimit | None = None) -> float:
        """Record a failed AUTH under ``limit`` (default: the limiter's own); returns
        the seconds to wait before the 535."""
        limit = limit or self.limit
        now = self.clock()
        key = client_key(ip)
        client = self._clients.pop(key, None) or _Client()
        self._clients[key] = client  # most recently seen last
        while len(self._clients) > self.max_addresses:
            self._clients.popitem(last=False)
        horizon = now - limit.seconds
        # Only the newest max(FAILURES, MAX_DELAY_STEPS) times can matter: bounded.
        keep = max(limit.failures, MAX_DELAY_STEPS) - 1
        client.failures = [t for t in client.failures[-keep:] if t > horizon]
        client.failures.append(now)
        count = len(client.failures)
        if limit.failures and count >= limit.failures:
            client.locked_until = now + limit.seconds
        return limit.delay * min(count, MAX_DELAY_STEPS)

    def __len__(self) -> int:
        return len(self._clients)
