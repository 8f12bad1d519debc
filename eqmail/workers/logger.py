"""The logger worker (splogger/multilog), running as eqmaill.

Reads the log pipe that every process's fd 2 points at and writes each line with a
timestamp to stdout (systemd, daemontools, a terminal) or to the log file the supervisor
opened for it (control/logfile), or — when control/logfile says ``syslog`` — to syslog
with facility mail and tag ``eqmail`` (syslog adds its own time).  Lines are at most
4000 bytes; a longer one is cut.

Workers' own lines are already made safe by eqmail.log.sanitize(); but fd 2 is also
where plugins, checkpassword and delivery programs write their stderr, so every line is
scrubbed again here: a control byte (CR, ESC, NUL, DEL, ...) becomes ``_`` and cannot
rewrite the terminal or a log viewer's line (a CR before the newline is dropped).
"""

from __future__ import annotations

import os
import signal
import time

from eqmail.workers.base import WorkerContext

MAX_LINE = 4000
_CONTROLS = bytes(range(32)) + b"\x7f"
_SCRUB = bytes.maketrans(_CONTROLS, b"_" * len(_CONTROLS))


def scrub(line: bytes) -> bytes:
    """One raw log line made safe (at most MAX_LINE bytes, no control bytes)."""
    line = line[:MAX_LINE]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line.translate(_SCRUB)


def _stamp() -> bytes:
    t = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)).encode() + b".%06d " % int((t % 1) * 1e6)


def run(ctx: WorkerContext) -> int:
    rfd: int = ctx.extra["log_read_fd"]
    out: int = ctx.extra["out_fd"]
    to_syslog = ctx.controls.logfile == "syslog"
    if to_syslog:
        import syslog

        syslog.openlog("eqmail", syslog.LOG_PID, syslog.LOG_MAIL)
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    os.set_blocking(rfd, False)
    ctx.ready()
    pending = b""
    import select

    while True:
        ready, _, _ = select.select([rfd], [], [], 0.2)
        if not ready:
            if stopping:
                break
            continue
        try:
            data = os.read(rfd, 65536)
        except BlockingIOError:
            continue
        except InterruptedError:
            continue
        if not data:
            break
        pending += data
        lines = pending.split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LINE:
            lines.append(pending[:MAX_LINE])
            pending = b""
        if to_syslog:
            for ln in lines:
                priority = syslog.LOG_WARNING if ln.startswith((b"alert:", b"warning:")) else syslog.LOG_INFO
                syslog.syslog(priority, scrub(ln).decode("utf-8", "replace"))
            continue
        stamp = _stamp()
        out_data = b"".join(stamp + scrub(ln) + b"\n" for ln in lines)
        try:
            os.write(out, out_data)
        except OSError:
            pass
    if pending:
        os.write(out, _stamp() + scrub(pending) + b"\n")
    return 0
