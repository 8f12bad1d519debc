"""How long the SMTP listener may wait for a client's next bytes: the slow-client limits.

Owns: the time limits of one session besides the idle timeout (issue 12) — a command
(or AUTH) line must be complete within ``timeout`` seconds of its first byte, and
message data must keep ``min_rate`` bytes per second on average: after n bytes of data
the client may have taken ``timeout + n / min_rate`` seconds since the 354 (Postfix's
smtpd_min_data_rate measured the same way, plus the timeout as a head start).  Only
time spent waiting for the client is counted — the listener reports how long each read
waited — so a slow queue writer or plugin never counts against the client.

Pure: no clock of its own, no I/O.  The listener asks :meth:`Pace.next_read` before
each read (how long it may wait and which 451 to send when it runs out) and reports
each read with :meth:`Pace.after_read`, passing what the session says
(``partial_line``, ``in_data``, whether a line completed).  No failure modes.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.smtp import replies
from eqmail.smtp.replies import Reply


@dataclass(frozen=True)
class Deadline:
    seconds: float  # how long the next read may wait (>= 0)
    reply: Reply    # what the client is told when it runs out (then: close)
    event: str      # the log line's event (qmail-smtpd: <event>: ...)


class Pace:
    """The slow-client limits of one session; see the module docstring."""

    def __init__(self, timeout: float, min_rate: int) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self._line_wait: float | None = None  # waited since an unfinished line began
        self._data_wait: float | None = None  # waited since the 354
        self._data_bytes = 0

    def next_read(self) -> Deadline:
        best = Deadline(self.timeout, replies.TIMEOUT, "timeout")
        if self._line_wait is not None and self.timeout - self._line_wait < best.seconds:
            best = Deadline(self.timeout - self._line_wait, replies.SLOW_LINE,
                            "timeout (command line too slow)")
        if self._data_wait is not None and self.min_rate > 0:
            left = self.timeout + self._data_bytes / self.min_rate - self._data_wait
            if left < best.seconds:
                best = Deadline(left, replies.SLOW_DATA, "timeout (data too slow)")
        return Deadline(max(best.seconds, 0.0), best.reply, best.event)

    def after_read(self, waited: float, size: int, *, partial_line: bool, line_done: bool,
                   in_data: bool) -> None:
        """A read returned ``size`` bytes after ``waited`` seconds and the session has
        consumed them: ``partial_line`` / ``in_data`` are its state now, ``line_done``
        whether a command line was completed by these bytes."""
        if not partial_line:
            self._line_wait = None
        elif self._line_wait is None or line_done:
            self._line_wait = 0.0  # the unfinished line began within this read
        else:
            self._line_wait += waited
        if not in_data:
            self._data_wait = None
        elif self._data_wait is None:
            self._data_wait, self._data_bytes = 0.0, 0  # the 354 went out after this read
        else:
            self._data_wait += waited
            self._data_bytes += size
