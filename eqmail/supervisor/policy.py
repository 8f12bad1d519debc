"""Spawn policy, pure: when to restart a worker that exited.

A worker that exits is restarted; one that keeps dying is restarted with growing
delays (0, 1, 2, 4 ... 60 s) so a crash loop cannot eat the machine, and a worker that
stayed up for STABLE_AFTER seconds is forgiven its past crashes.  Which kinds are
restarted at all, and as whom, is the table in kinds.py.
"""

from __future__ import annotations

from dataclasses import dataclass

STABLE_AFTER = 30.0
MAX_DELAY = 60.0


@dataclass
class RestartState:
    crashes: int = 0
    restarts: int = 0
    started_at: float = 0.0

    def on_exit(self, now: float) -> float:
        """Record an exit at ``now``; return how long to wait before restarting."""
        if now - self.started_at >= STABLE_AFTER:
            self.crashes = 0
        delay = 0.0 if self.crashes == 0 else min(MAX_DELAY, 2.0 ** (self.crashes - 1))
        self.crashes += 1
        return delay

    def on_start(self, now: float) -> None:
        if self.started_at:
            self.restarts += 1
        self.started_at = now
