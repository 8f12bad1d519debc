"""The logger worker (splogger/multilog), running as eqmaill.

Reads the log pipe that every process's fd 2 points at and writes each line, stamped
as control/logformat says (eqmail.logformat), to stdout (systemd, daemontools, a
terminal) or to the log file the supervisor opened for it (control/logfile), or — when
control/logfile says ``syslog`` — to syslog with facility mail and tag ``eqmail``
(syslog adds its own time).  Lines are at most 4000 bytes; a longer one is cut.

Rotation: the logger never opens a file (it could not: the log directory is root's).
The supervisor opens the new file as root and sends it over the control socket
(``ipc.logtarget.LogTarget`` with the fd by SCM_RIGHTS) on SIGUSR1 and on reload; the logger
switches between two reads of the pipe, so every line lands whole in the old file or
in the new one and nothing is lost.  It then writes ``status: log reopened`` as the
first line of the new output.

Workers' own lines are already made safe by eqmail.log.sanitize(); but fd 2 is also
where plugins, checkpassword and delivery programs write their stderr, so every line is
scrubbed again here: a control byte (CR, ESC, NUL, DEL, ...) becomes ``_`` and cannot
rewrite the terminal or a log viewer's line (a CR before the newline is dropped).
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import syslog
import time

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.logtarget import MAX_LOG_TARGET, LogSink, LogTarget
from eqmail.logformat import format_lines
from eqmail.workers.base import LoggerSettings, WorkerContext

MAX_LINE = 4000
_CONTROLS = bytes(range(32)) + b"\x7f"
_SCRUB = bytes.maketrans(_CONTROLS, b"_" * len(_CONTROLS))


def scrub(line: bytes) -> bytes:
    """One raw log line made safe (at most MAX_LINE bytes, no control bytes)."""
    line = line[:MAX_LINE]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line.translate(_SCRUB)


def recv_target(sock: socket.socket) -> tuple[LogTarget, int] | None:
    """One message from the supervisor: the new target and its fd (-1 for syslog).
    None when the supervisor has gone; a malformed message raises ProtocolError,
    nothing waiting raises BlockingIOError."""
    fds = array.array("i")
    msg, anc, _flags, _ = sock.recvmsg(MAX_LOG_TARGET, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not msg:
        for fd in fds:
            os.close(fd)
        return None
    try:
        target = LogTarget.decode(msg)
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    if target.has_fd != bool(fds):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("log target without its fd")
    return target, (fds[0] if fds else -1)


class Output:
    """Where lines go now: an fd (file, stdout, journal) or syslog."""

    def __init__(self, target: LogTarget, fd: int) -> None:
        self.target = target
        self.fd = fd
        if target.sink is LogSink.SYSLOG:
            syslog.openlog("eqmail", syslog.LOG_PID, syslog.LOG_MAIL)

    def write(self, lines: list[bytes]) -> None:
        if self.target.sink is LogSink.SYSLOG:
            for ln in lines:
                priority = syslog.LOG_WARNING if ln.startswith((b"alert:", b"warning:")) else syslog.LOG_INFO
                syslog.syslog(priority, scrub(ln).decode("utf-8", "replace"))
            return
        data = format_lines([scrub(ln) for ln in lines], self.target.fmt, time.time(),
                            journal=self.target.sink is LogSink.JOURNAL)
        try:
            os.write(self.fd, data)
        except OSError:
            pass

    def replace(self, target: LogTarget, fd: int) -> Output:
        if self.fd >= 0:
            os.close(self.fd)
        if self.target.sink is LogSink.SYSLOG:
            syslog.closelog()
        new = Output(target, fd)
        new.write([b"status: log reopened"])
        return new


def run(ctx: WorkerContext[LoggerSettings]) -> int:
    rfd = ctx.settings.log_read_fd
    out = Output(ctx.settings.target, ctx.settings.out_fd)
    control = socket.socket(fileno=ctx.settings.control_fd)
    control.setblocking(False)
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    os.set_blocking(rfd, False)
    ctx.ready()
    pending = b""
    watched = [rfd, control.fileno()]
    while True:
        ready, _, _ = select.select(watched, [], [], 0.2)
        if control.fileno() in ready:
            # before the pipe: lines read after the switch go to the new output
            try:
                got = recv_target(control)
            except (BlockingIOError, InterruptedError):
                pass
            except (OSError, ProtocolError) as e:
                out.write([f"alert: logger: bad message from the supervisor: {e}".encode()])
            else:
                if got is None:  # the supervisor has gone: keep draining the pipe
                    watched.remove(control.fileno())
                else:
                    out = out.replace(*got)
        if rfd not in ready:
            if stopping:
                break
            continue
        try:
            data = os.read(rfd, 65536)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            break
        pending += data
        lines = pending.split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LINE:
            lines.append(pending[:MAX_LINE])
            pending = b""
        out.write(lines)
    if pending:
        out.write([pending])
    return 0

