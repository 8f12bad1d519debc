"""The plumbing under the SMTP session: bytes in, actions out, one result awaited at a time.

Owns: the part of driving eqmail.smtp.session.Session that is the same whatever the
command — the input buffer and its bound while a result is due (more than
``MAX_PENDING`` bytes: 421 and close), command-line framing (a line longer than
``cfg.max_line`` is never buffered: it is skipped and reported to the session), the
list of actions the next call returns (pipelined replies merged into one Send),
waiting for one asynchronous result and resuming with it, end of input (``read
failed``), the loop that hands buffered input to the session by phase, and the
error accounting of Postfix's smtpd (every 4xx/5xx reply counts; once
``cfg.error_soft_limit`` have been sent each further reply is preceded by a
:class:`Delay` action, and at ``cfg.error_hard_limit`` the session ends with 421 —
Postfix's smtpd_soft_error_limit, smtpd_error_sleep_time, smtpd_hard_error_limit).
:class:`SessionPlumbing` is Session's base class, in the way Twisted's SMTP server
sits on its LineReceiver: what a line or DATA byte *means* — every reply, every
state change — is decided in eqmail.smtp.session through the methods marked below.

Privilege: none; no sockets, files, clock or process access (pure, like the session).
Failure modes: none raise; late or duplicate results are ignored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from eqmail.smtp import replies
from eqmail.smtp.actions import AbortMessage, Action, Close, Delay, Log, Send
from eqmail.smtp.replies import Reply
from eqmail.smtp.state import Phase, SessionConfig

# Bytes a client may send while the session waits for a queue/auth/hook/cert result.
# Legitimate pipelining after "." is a few commands (DATA is a sync point).
MAX_PENDING = 1024 * 1024
OVERFLOW = Reply(421, "too much pipelined input (#4.5.0)")


class SessionPlumbing(ABC):
    """Input, output and waiting for :class:`eqmail.smtp.session.Session`."""

    def __init__(self, cfg: SessionConfig, env: dict[str, str],
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.env = dict(env)
        self.clock = clock
        self.phase = Phase.COMMAND
        self._buf = bytearray()
        self._eof = False
        self._discarding = False             # inside an over-long command line
        self._out: list[Action] = []
        self._resume: Callable[..., None] | None = None
        self.errors = 0                      # 4xx/5xx replies since the last delivered message
        self.junk = 0                        # NOOP/RSET/VRFY/HELP since then (the session counts)
        self.lines = 0                       # command/AUTH lines completed (for partial_line)

    # ---- what the session decides ----------------------------------------------------

    @abstractmethod
    def _command(self, line: bytes) -> None:
        """One command line (Phase.COMMAND), without its CR LF."""

    @abstractmethod
    def _auth_line(self, line: bytes) -> None:
        """One AUTH continuation line (Phase.AUTH), without its CR LF."""

    @abstractmethod
    def _data_step(self) -> bool:
        """Consume buffered DATA input (Phase.DATA); False when more input is needed."""

    @abstractmethod
    def _line_too_long(self) -> None:
        """A line over cfg.max_line was skipped: answer it."""

    @abstractmethod
    def log_line(self, event: str) -> str:
        """The log line for ``event``."""

    # ---- the I/O layer's API ---------------------------------------------------------

    def feed(self, data: bytes) -> list[Action]:
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.WAIT_TLS:
            return []  # plain text sent before the handshake: never a command
        if self.phase is Phase.WAIT and len(self._buf) + len(data) > MAX_PENDING:
            self._send(OVERFLOW)
            self._close()
            return self._flush()
        self._buf += data
        self._pump()
        return self._flush()

    def eof(self) -> list[Action]:
        if self.phase is Phase.CLOSED:
            return []
        self._eof = True
        if self.phase is Phase.WAIT_TLS:
            self._close()
        self._pump()
        return self._flush()

    @property
    def wants_input(self) -> bool:
        """False while closed or while a result is pending and input piles up."""
        if self.phase is Phase.CLOSED:
            return False
        return not (self.phase is Phase.WAIT and len(self._buf) >= MAX_PENDING // 2)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def partial_line(self) -> bool:
        """A command (or AUTH) line has begun and is not complete yet: the I/O layer
        bounds how long it may take (timeoutsmtpd from its first byte)."""
        return (self.phase in (Phase.COMMAND, Phase.AUTH)
                and (bool(self._buf) or self._discarding))

    @property
    def in_data(self) -> bool:
        """Message data is being read (after 354): the I/O layer enforces the minimum
        data rate."""
        return self.phase is Phase.DATA

    # ---- actions out -----------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._send_raw(reply.wire())

    def _send_raw(self, data: bytes) -> None:
        if not data:
            return
        soft = self.cfg.error_soft_limit
        if soft and self.errors >= soft and self.cfg.error_sleep > 0:
            self._out.append(Delay(self.cfg.error_sleep))
        if data[:1] in (b"4", b"5"):
            self.errors += 1
        last = self._out[-1] if self._out else None
        if isinstance(last, Send):  # one write for pipelined replies
            self._out[-1] = Send(last.data + data)
        else:
            self._out.append(Send(data))

    def _log(self, event: str) -> None:
        self._out.append(Log(self.log_line(event)))

    def _close(self) -> None:
        if self.phase is Phase.DATA:
            self._out.append(AbortMessage())
        self._out.append(Close())
        self.phase = Phase.CLOSED
        self._buf.clear()

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # ---- waiting for a result --------------------------------------------------------

    def _wait(self, action: Action, resume: Callable[..., None]) -> None:
        self._out.append(action)
        self._resume = resume
        self.phase = Phase.WAIT

    def _resume_with(self, result: object) -> list[Action]:
        if self.phase is not Phase.WAIT or self._resume is None:
            return []  # not expected now (late or duplicate result): ignore
        resume, self._resume = self._resume, None
        self.phase = Phase.COMMAND
        resume(result)
        self._pump()
        return self._flush()

    # ---- input in --------------------------------------------------------------------

    def _pump(self) -> None:
        """Process buffered input until it runs out or a result must be awaited."""
        while self.phase in (Phase.COMMAND, Phase.AUTH, Phase.DATA):
            if self._too_many_errors():
                break
            if self.phase is Phase.DATA:
                if not self._data_step():
                    break
                continue
            line = self._take_line()
            if line is None:
                break
            if self.phase is Phase.AUTH:
                self._auth_line(line)
            else:
                self._command(line)
        self._too_many_errors()
        if self._eof and self.phase in (Phase.COMMAND, Phase.AUTH, Phase.DATA):
            self._log("read failed")
            self._close()

    def _too_many_errors(self) -> bool:
        """At the hard error limit (checked between commands, never inside DATA):
        421 and close.  True when the session was closed."""
        hard = self.cfg.error_hard_limit
        if not hard or self.errors < hard or self.phase not in (Phase.COMMAND, Phase.AUTH):
            return False
        self._log("too many errors")
        self._send(replies.TOO_MANY_ERRORS)
        self._close()
        return True

    def _take_line(self) -> bytes | None:
        """The next command line without LF and one trailing CR, or None for "need more".
        Lines over cfg.max_line are answered and skipped without being buffered."""
        buf, limit = self._buf, self.cfg.max_line
        while True:
            if self._discarding:
                lf = buf.find(b"\n")
                if lf < 0:
                    buf.clear()
                    return None
                del buf[:lf + 1]
                self._discarding = False
                self.lines += 1
            lf = buf.find(b"\n", 0, limit + 2)
            if lf < 0:
                if len(buf) <= limit + 1:
                    return None
                self._discarding = True
                self._line_too_long()
                continue
            line = bytes(buf[:lf])
            del buf[:lf + 1]
            self.lines += 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) <= limit:
                return line
            self._line_too_long()
