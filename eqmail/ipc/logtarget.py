"""Supervisor -> logger: where the log goes now.

A SOCK_SEQPACKET socketpair; the supervisor sends one ``LogTarget`` per message (at
start-up the logger gets its first target in its context instead), with the output
fd attached by SCM_RIGHTS when the target is a file or stdout.  The logger switches
between two reads of the log pipe, so every line goes wholly to the old or the new
output.  Payload: ASCII ``<sink> <format>``, at most MAX_LOG_TARGET bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from eqmail.ipc.framing import ProtocolError
from eqmail.logformat import LogFormat


class LogSink(enum.StrEnum):
    FILE = "file"          # control/logfile names a file (or the background start's log)
    STDOUT = "stdout"      # the supervisor's stdout (a terminal, daemontools, a pipe)
    JOURNAL = "journal"    # stdout that is systemd's journal stream: no stamp of ours
    SYSLOG = "syslog"      # control/logfile says syslog: facility mail, tag eqmail


MAX_LOG_TARGET = 64


@dataclass(frozen=True)
class LogTarget:
    sink: LogSink
    fmt: LogFormat

    @property
    def has_fd(self) -> bool:
        return self.sink is not LogSink.SYSLOG

    def encode(self) -> bytes:
        if not isinstance(self.sink, LogSink) or not isinstance(self.fmt, LogFormat):
            raise ProtocolError("log target of unknown sink or format")
        return f"{self.sink} {self.fmt}".encode()  # at most "journal rfc3339"

    @classmethod
    def decode(cls, payload: bytes) -> LogTarget:
        if len(payload) > MAX_LOG_TARGET:
            raise ProtocolError("log target too long")
        try:
            sink, fmt = payload.decode("ascii").split(" ")
            return cls(LogSink(sink), LogFormat(fmt))
        except ValueError:
            raise ProtocolError("malformed log target") from None
