"""What workers tell the supervisor over the pipes it gives them at spawn.

  every worker -> supervisor   :class:`Ready` on the readiness pipe, once, when it serves
  watcher -> supervisor        :class:`ControlChanged` on the watch pipe: "reload now"
                               (a wake-up: the supervisor drains the pipe, the bytes
                               carry nothing more)
  listener -> supervisor       :class:`SessionCount` and :class:`Closed` on the status
                               pipe, as lines (``<n>\\n``, ``closed\\n``), read with a
                               :class:`ListenerReportReader`

Every write is far below PIPE_BUF, so it arrives whole; a read may still stop inside
a line when several are pending, which the reader keeps for the next read.  A line that
is neither form is a :class:`ProtocolError`; the supervisor logs it and goes on (a
listener is unprivileged and must not be able to stop it).
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.ipc.framing import ProtocolError

MAX_SESSIONS = 10**9  # far above any concurrency a listen line accepts
MAX_LINE = 16         # bytes of one report line, line end included


@dataclass(frozen=True)
class Ready:
    """The worker serves (sockets open, state recovered)."""

    WIRE = b"R"

    def encode(self) -> bytes:
        return self.WIRE

    @classmethod
    def decode(cls, payload: bytes) -> Ready:
        if payload != cls.WIRE:
            raise ProtocolError("not a readiness byte")
        return cls()


@dataclass(frozen=True)
class ControlChanged:
    """control/ or users/ changed (the watcher, debounced)."""

    def encode(self) -> bytes:
        return b"C"


@dataclass(frozen=True)
class SessionCount:
    """The sessions this listener process serves now."""

    sessions: int

    def __post_init__(self) -> None:
        if not 0 <= self.sessions <= MAX_SESSIONS:
            raise ProtocolError(f"session count {self.sessions} out of range")

    def encode(self) -> bytes:
        return b"%d\n" % self.sessions


@dataclass(frozen=True)
class Closed:
    """This listener process closed its socket: it accepts no more connections."""

    def encode(self) -> bytes:
        return b"closed\n"


ListenerReport = SessionCount | Closed


def decode_report(line: bytes) -> ListenerReport:
    """One line without its line end."""
    if line == b"closed":
        return Closed()
    if 0 < len(line) <= len(str(MAX_SESSIONS)) and line.isdigit():
        return SessionCount(int(line))
    raise ProtocolError(f"bad listener report {line[:MAX_LINE]!r}")


class ListenerReportReader:
    """Lines from one listener's status pipe, in order; a partial line waits."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[ListenerReport]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) >= MAX_LINE:
            self._partial = b""
            raise ProtocolError("listener report line too long")
        return [decode_report(line) for line in lines]
