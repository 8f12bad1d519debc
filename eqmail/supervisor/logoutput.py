"""Where the logger writes: the supervisor's side of log output and rotation.

Owns: opening the log output as root — the file control/logfile names (or, for a
background start without control/logfile, log/eqmail.log, the file ``eqmailctl start``
pointed stdout at), the supervisor's own stdout, systemd's journal stream, or syslog —
and handing it to the running logger over a SOCK_SEQPACKET socketpair (``ipc.logtarget.LogTarget``
with the fd by SCM_RIGHTS).  The supervisor calls ``reopen`` on SIGUSR1 (logrotate's
postrotate) and on every accepted reload, so a rotated file or a changed
control/logfile or control/logformat takes effect without restarting anything.

The journal: systemd sets JOURNAL_STREAM to the ``device:inode`` of the stream it gave
the service as stdout/stderr; when stdout is that very stream (sd_journal_stream_fd(3)'s
rule), the logger adds no stamp of its own — journald has one.

The file is opened without following a symbolic link and must be a plain file with one
link: log/ belongs to the log user, who must not make root open or chown another file.

Failure modes: a file that cannot be opened raises ``ControlFileError`` naming
control/logfile:1 and the old output stays (start-up fails; a reload is refused; a
SIGUSR1 logs an alert).  Sending to a logger that is restarting queues the message in
the socketpair; its successor also starts with the current target.
"""

from __future__ import annotations

import array
import os
import socket
import stat
from pathlib import Path

from eqmail.control import Controls
from eqmail.errors import ControlFileError
from eqmail.instance import Instance
from eqmail.ipc.logtarget import LogSink, LogTarget
from eqmail.logformat import LogFormat, format_lines

# An opened output: what the logger is told, the fd it writes to, the file (if one).
Opened = tuple[LogTarget, int, Path | None]


def journal_stream(fd: int, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Is ``fd`` the journal stream systemd gave this service (JOURNAL_STREAM)?"""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class LogOutput:
    """The current output (target and an fd the supervisor owns) and the socketpair."""

    def __init__(self, instance: Instance, foreground: bool, owner: tuple[int, int] | None) -> None:
        self.instance = instance
        self.foreground = foreground
        self.owner = owner  # (uid, gid) of the log user when privileged
        try:
            self.stdout_fd = os.dup(1)
        except OSError:  # started with stdout closed
            self.stdout_fd = os.open(os.devnull, os.O_WRONLY)
        self.journal = journal_stream(1)
        self.sup_end, self.logger_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sup_end.setblocking(False)
        self.logger_end.set_inheritable(True)
        self.target = LogTarget(LogSink.STDOUT, LogFormat.LOCAL)
        self.fd = -1
        self.path: Path | None = None
        self.reopens = 0  # how many reopen requests were handled (eqmailctl reopen-logs waits)
        self.error = ""  # why the last one failed, or ""

    def path_for(self, controls: Controls) -> Path | None:
        if controls.logfile == "syslog":
            return None
        if controls.logfile:
            return self.instance.root / controls.logfile
        if not self.foreground:  # eqmailctl start pointed our stdout at this file
            return self.instance.log / "eqmail.log"
        return None

    def open(self, controls: Controls) -> Opened:
        """The output ``controls`` ask for, opened (as root); raises ControlFileError."""
        path = self.path_for(controls)
        if controls.logfile == "syslog":
            return LogTarget(LogSink.SYSLOG, controls.logformat), os.dup(self.stdout_fd), None
        if path is None:
            sink = LogSink.JOURNAL if self.journal else LogSink.STDOUT
            return LogTarget(sink, controls.logformat), os.dup(self.stdout_fd), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # log/ belongs to the log user: never follow a link it may have planted
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY | os.O_NOFOLLOW
                         | os.O_NONBLOCK, 0o640)
        except OSError as e:
            raise ControlFileError("control/logfile", 1, f"cannot open {path}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise ControlFileError("control/logfile", 1, f"{path} is not a plain file")
        os.set_blocking(fd, True)
        if self.owner is not None and (st.st_uid, st.st_gid) != self.owner:
            os.fchown(fd, *self.owner)
        return LogTarget(LogSink.FILE, controls.logformat), fd, path

    def install(self, target: LogTarget, fd: int, path: Path | None) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.target, self.fd, self.path = target, fd, path
        if path is not None and not self.foreground and path == self.instance.log / "eqmail.log":
            # a traceback on the supervisor's stdout lands in the new file too, and no
            # descriptor keeps the rotated file open
            os.dup2(fd, 1)
            os.dup2(fd, self.stdout_fd)

    def send(self) -> None:
        """Tell the logger to switch to the installed output."""
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.fd]))] if self.target.has_fd else []
        try:
            self.sup_end.sendmsg([self.target.encode()], fds)
        except OSError:
            pass  # the socketpair is full only if the logger is wedged; its successor starts right

    def shape(self, lines: list[bytes]) -> bytes:
        """The supervisor's own lines once the logger has gone (eqmail.log.write_directly)."""
        import time

        return format_lines(lines, self.target.fmt, time.time(), journal=self.target.sink is LogSink.JOURNAL)
