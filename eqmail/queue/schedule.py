"""qmail-send's retry schedule (qmail-core §1.7), pure.

``nextretry(birth, c) = birth + (isqrt(now - birth) + chanskip[c])**2`` with chanskip 10
for local and 20 for remote; the first attempt is immediate; the first pass that starts
after ``birth + queuelifetime`` is the last.
"""

from __future__ import annotations

import math

from eqmail.ipc.delivery import Channel  # the delivery channels, named once

__all__ = ["CHANSKIP", "Channel", "attempt_times", "is_dying", "next_retry"]


CHANSKIP = {Channel.LOCAL: 10, Channel.REMOTE: 20}


def next_retry(birth: float, now: float, channel: Channel) -> float:
    """When the pass after one that starts at ``now`` is due."""
    elapsed = now - birth
    root = math.isqrt(int(elapsed)) if elapsed > 0 else 0
    return birth + (root + CHANSKIP[channel]) ** 2


def is_dying(birth: float, now: float, lifetime: int) -> bool:
    """qmail's flagdying: this pass is the last one."""
    return now > birth + lifetime


def attempt_times(birth: float, channel: Channel, lifetime: int) -> list[float]:
    """The attempts made if every pass starts exactly on time (for tests and docs)."""
    times = [birth]
    now = birth
    while not is_dying(birth, now, lifetime):
        now = next_retry(birth, now, channel)
        times.append(now)
    return times
