"""An SMTP session on stdin/stdout: qmail-smtpd as ``sendmail -bs`` runs it.

Owns: the blocking I/O loop around the pure :class:`eqmail.smtp.session.Session` for
``eqmail-sendmail -bs`` (qmail's sendmail execs qmail-smtpd on the same fds); it lives
with the command, not in smtp/, which does no I/O of its own.  The
environment is the process's own; eqmail.cli.sendmail has already put qmail's -bs
variables into it (RELAYCLIENT="", DATABYTES=0, PROTO=TCP, TCPREMOTEIP=127.0.0.1,
TCPREMOTEINFO=sendmail-bs, ...) unless PROTO was set.  The SessionConfig is built
exactly as the listener builds it (eqmail.smtp.tcpenv), so replies are the same.

Privilege: the invoking user's.  The queue writer takes the uid from SO_PEERCRED, so the
queue's Received line says ``invoked by uid N`` as qmail-queue does for a user's
qmail-smtpd.  Message data is streamed to the writer in frames as it arrives.

Not offered here: STARTTLS (there is no socket to upgrade) and AUTH (no checkpassword
program); qmail's -bs session has nothing to authenticate either, RELAYCLIENT is set.

Inputs: fd 0, control/ of the instance.  Outputs: replies on fd 1, eQmail's
``qmail-smtpd: ...`` log lines on fd 2 (qmail-smtpd's stderr).  Exit status as
qmail-smtpd's: 0 after QUIT; 1 when the session ends any other way (end of input, read
error, ``451 timeout (#4.4.2)`` after timeoutsmtpd seconds without input, a bare LF in
DATA, unreadable control files with ``421 unable to read controls (#4.3.0)``).
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from eqmail.control import Controls, load_controls
from eqmail.errors import ControlErrors
from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.queue import BodyChunk, QQExit
from eqmail.log import log
from eqmail.netif import local_addresses
from eqmail.queue.client import CHUNK, QueueConnection, SubmitResult
from eqmail.smtp import actions as A
from eqmail.smtp import replies
from eqmail.smtp.policy import BadMailFrom
from eqmail.smtp.session import Session
from eqmail.smtp.tcpenv import rcpt_matcher, session_config

READ_SIZE = 64 * 1024
STDIN, STDOUT = 0, 1


class _Timeout(Exception):
    """No input (or no room for output) for timeoutsmtpd seconds."""


class _QueueStream:
    """One message on its way to the queue writer, written frame by frame.

    A writer that cannot be reached is remembered and reported at the end of the message
    (``451 unable to exec qq``), as qmail-smtpd reports what qmail_close() says."""

    def __init__(self, root: Path, prefix: bytes) -> None:
        self.conn: QueueConnection | None = None
        self.failure: QQExit | None = None
        try:
            # No role: the writer labels the message by our uid, as qmail-queue does.
            self.conn = QueueConnection(root)
        except OSError:
            self.failure = QQExit.CANNOT_EXEC
        self.write(prefix)

    def write(self, data: bytes) -> None:
        if self.conn is None or self.failure is not None:
            return
        try:
            for i in range(0, len(data), CHUNK):
                self.conn.sock.sendall(BodyChunk(data[i:i + CHUNK]).frame())
        except OSError:
            self.failure = QQExit.WRITE_ERROR

    def finish(self, sender: str, recipients: list[str]) -> SubmitResult:
        try:
            if self.conn is None or self.failure is not None:
                return SubmitResult.from_code(self.failure or QQExit.BUG)
            return self.conn.submit(sender, recipients, b"")
        except (OSError, ProtocolError):
            return SubmitResult.from_code(QQExit.BUG)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the connection; an unfinished message is then removed by the writer."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class StdioSession:
    """Moves bytes between fds 0/1 and a Session and performs its actions."""

    def __init__(self, root: Path, controls: Controls, env: dict[str, str]) -> None:
        self.root = root
        self.timeout = float(controls.timeoutsmtpd)
        cfg = session_config(controls, env, rcpthosts=rcpt_matcher(controls),
                             badmailfrom=BadMailFrom.from_lines(controls.badmailfrom),
                             local_ips=local_addresses(),
                             tls_available=False, auth_available=False)
        self.session = Session(cfg, env, time.time)
        self.quit_reply = replies.quit_(cfg.greeting).wire()
        self.message: _QueueStream | None = None
        self.envelope: A.BeginMessage | None = None  # of the message being received
        self.closed = False
        self.quit = False

    def run(self) -> int:
        try:
            self._perform(self.session.start())
            while not self.closed:
                try:
                    data = self._read()
                except _Timeout:
                    self._perform([A.Log(self.session.log_line("timeout")), A.AbortMessage(),
                                   A.Send(replies.TIMEOUT.wire()), A.Close()])
                    break
                except OSError:
                    self._perform([A.Log(self.session.log_line("read failed")),
                                   A.AbortMessage(), A.Close()])
                    break
                self._perform(self.session.feed(data) if data else self.session.eof())
                if not data:
                    break
        except (_Timeout, BrokenPipeError, OSError):
            pass  # output blocked or gone: qmail-smtpd exits silently on a write failure
        finally:
            if self.message is not None:
                self.message.abandon()
        return 0 if self.quit else 1

    # ---- I/O -------------------------------------------------------------------------

    def _read(self) -> bytes:
        ready, _, _ = select.select([STDIN], [], [], self.timeout)
        if not ready:
            raise _Timeout
        return os.read(STDIN, READ_SIZE)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [STDOUT], [], self.timeout)
            if not ready:
                raise _Timeout
            view = view[os.write(STDOUT, view):]

    # ---- actions ---------------------------------------------------------------------

    def _perform(self, actions: list[A.Action]) -> None:
        pending = list(actions)
        while pending and not self.closed:
            pending[:0] = self._do(pending.pop(0))

    def _do(self, action: A.Action) -> list[A.Action]:  # noqa: C901 - one branch per action
        if isinstance(action, A.Send):
            self._write(action.data)
            # The session closes right after the QUIT reply; nothing else ends with it.
            self.quit = action.data.endswith(self.quit_reply)
        elif isinstance(action, A.Close):
            self.closed = True
        elif isinstance(action, A.Log):
            log(action.line)
        elif isinstance(action, A.Delay):  # too many errors: one user's own session
            time.sleep(action.seconds)
        elif isinstance(action, A.BeginMessage):
            self.message = _QueueStream(self.root, action.header_prefix)
            self.envelope = action
        elif isinstance(action, A.MessageData):
            assert self.message is not None
            self.message.write(action.data)
        elif isinstance(action, A.AbortMessage):
            if self.message is not None:
                self.message.abandon()
                self.message = None
        elif isinstance(action, A.EndMessage):
            return self._end_message()
        elif isinstance(action, A.CheckPassword):  # not offered; answer as eQmail would
            return self.session.auth_result(False, replies.AUTH_NO_CHILD.text)
        elif isinstance(action, A.StartTLS):
            return self.session.tls_failed("no TLS on a pipe")
        elif isinstance(action, A.CheckClientCert):
            return self.session.cert_result(None, None)
        elif isinstance(action, A.RunHook):
            return self.session.hook_result(A.HookOutcome())
        return []

    def _end_message(self) -> list[A.Action]:
        assert self.message is not None and self.envelope is not None
        message, self.message = self.message, None
        result = message.finish(self.envelope.sender, list(self.envelope.recipients))
        return self.session.queue_result(A.QueueOutcome.of(result))


def run_stdio(root: Path) -> int:
    """Run one SMTP session on fds 0/1 for the instance at ``root``; the exit code."""
    try:
        controls = load_controls(root)
    except (ControlErrors, OSError):
        try:
            os.write(STDOUT, replies.UNABLE_TO_READ_CONTROLS.wire())
        except OSError:
            pass
        return 1
    return StdioSession(Path(root), controls, dict(os.environ)).run()
