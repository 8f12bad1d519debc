"""The SMTP server session: eQmail 1.09's qmail-smtpd as a pure state machine.

Owns: every protocol decision of one SMTP connection — greeting, HELO/EHLO, MAIL, RCPT,
DATA, RSET, NOOP, VRFY, HELP, QUIT, STARTTLS, AUTH, the submission-port rule, the
qmail-spp hook points — with eQmail's reply texts (eqmail.smtp.replies) and eqmail's
stricter rules (DESIGN.md): 12,288-byte command lines, AUTH= believed only after AUTH,
no PLAIN/LOGIN advertised before TLS with TLSREQUIRED=1, the CRAM-MD5 exemption from
TLSREQUIRED compared case-insensitively, no open relay without rcpthosts, [rcpt]
plugins that really run, unknown local recipients refused at RCPT (``CheckMailbox``,
control/rcptchecklocal), and REQUIRETLS (RFC 8689, issue 17; below).  Buffering, line framing, the action list and waiting for
results are the base class's (eqmail.smtp.plumbing.SessionPlumbing).

Privilege: none needed; no sockets, files, clock or process access.  Time comes from
the injected ``clock``; everything else from :class:`SessionConfig` and ``env`` (the
tcpserver-style environment; the session keeps its own copy and changes it the way
qmail-smtpd changes its environment: AUTH sets TCPREMOTEINFO (relaying after AUTH is the
session's own flag, as in eQmail's AUTH patch, not RELAYCLIENT), plugins
set SMTPHELOHOST/SMTPMAILFROM/...; the I/O layer passes ``session.env`` on to
checkpassword, plugins and the queue writer).

Driving it (the I/O layer): ``start()`` once (for SMTPS call ``tls_started`` first);
then ``feed(bytes)`` with whatever arrives and ``eof()`` at end of input; perform the
returned actions in order (eqmail.smtp.actions lists them and which result method each
asynchronous one expects).  Stop reading while ``wants_input`` is False.  Timeouts are
the I/O layer's: send ``replies.TIMEOUT``, log ``session.log_line("timeout")``, close.

Failure modes: none raise.  Input that breaks the protocol gets qmail's reply; an
over-long command line gets ``500 line too long (#5.5.2)`` and is skipped; more than
``MAX_PENDING`` bytes buffered while waiting for a result ends the session with 421.
What one client may take (Postfix's limits, cfg.max_rcpt / error_* / junk_limit): a
HELO/EHLO without a name gets 501, RCPT TO:<> 553, a recipient over max_rcpt 452;
more than junk_limit NOOP/RSET/VRFY/HELP without a delivered message, or
error_hard_limit error replies (the plumbing counts them), end the session with 421.

REQUIRETLS (RFC 8689): the EHLO keyword is offered only on a TLS-protected session
(after STARTTLS, or SMTPS: ``tls_started`` before ``start``), as the RFC's extension
is meaningful only there; a session in clear text never shows it, so qmail's
transcripts are unchanged there.  ``MAIL FROM:<a> REQUIRETLS`` (the keyword in any
case, no value) is accepted only under TLS and tags the transaction: the message's
``BeginMessage.requiretls`` is True and the queue records it (``Xrequiretls=1``,
docs/queue-format.md) for remote delivery to honour (RFC 8689 §4.1: "MUST tag that
message").  In clear text it is refused with ``530 ... (#5.7.10)``;
``REQUIRETLS=<anything>`` with ``501 ... (#5.5.4)`` (the parameter has no value).
Other unknown MAIL parameters are still ignored, as qmail-smtpd ignores them.  The
``TLS-Required:`` header field (RFC 8689 §3, §4.1) needs nothing at reception: when
REQUIRETLS was given it is to be ignored, otherwise it travels in the message and
remote delivery reads it there; the session never looks at message headers for it.

CHUNKING (RFC 3030, issue 18; BINARYMIME is not offered): ``BDAT <size> [LAST]`` reads
exactly <size> octets after the command line and never scans them for an end mark, so
no SMTP smuggling is possible; eqmail.smtp.bdat stores them as DATA lines are stored
(CRLF -> LF also across chunks, bare CR kept, bare LF 451 and close, no dot-unstuffing).
The first chunk runs the [data] plugins and begins the message (same Received line,
same BeginMessage/MessageData/EndMessage as DATA, so the queue writer and the inbound
checks see no difference); each chunk without LAST is answered ``250 <n> octets
received``, LAST as DATA's end.  The sum of the chunks is bounded by databytes: a chunk
over it is read and answered 552 and the transaction is dead (503 to BDAT, DATA too)
until RSET, MAIL, HELO or EHLO; BDAT without MAIL/RCPT gets 503 after its chunk is
read; DATA in a BDAT transaction 503; a chunk that must be skipped but is over
DISCARD_LIMIT is answered and the connection closed unread; a size that is not 1 to 15
digits gets 501 and the connection is closed (its end cannot be found).  A chunk that
stalls is the I/O layer's DATA timeout (``in_data`` is True while a chunk is read).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from eqmail import srs
from eqmail.smtp import replies
from eqmail.smtp.actions import (
    AbortMessage,
    Action,
    BeginMessage,
    CheckClientCert,
    CheckMailbox,
    CheckPassword,
    EndMessage,
    HookOutcome,
    HookStage,
    HookVerdict,
    MessageData,
    QueueOutcome,
    QueueStatus,
    RunHook,
    StartTLS,
)
from eqmail.smtp.address import parse_address, parse_mail_params
from eqmail.smtp.auth import (
    MECHANISMS,
    AuthExchange,
    AuthStep,
    Credentials,
    Failed,
    cram_challenge,
)
from eqmail.smtp.bdat import ChunkReader
from eqmail.smtp.data import DataReader, DataStatus
from eqmail.smtp.plumbing import MAX_PENDING, OVERFLOW, SessionPlumbing
from eqmail.smtp.received import received_line
from eqmail.smtp.replies import Reply
from eqmail.smtp.state import Phase, SessionConfig, SppState, digits, submission_port
from eqmail.textio import decode, encode

__all__ = ["MAX_AUTH_FAILURES", "MAX_PENDING", "OVERFLOW", "Phase", "Session", "SessionConfig",
           "SppState"]

# Failed AUTHs (535s) one session may have; the last one is answered 421 and the
# connection closed.  3: a client with a stored password gains nothing by retrying it
# in the same session, and one that falls back through CRAM-MD5, PLAIN and LOGIN with
# one wrong password still sees every failure; more in one session is guessing.  The
# per-address lock-out across sessions is control/authlimit's (eqmail.authlimit).
MAX_AUTH_FAILURES = 3

# BDAT (RFC 3030): ``BDAT <size> [LAST]``.  A size of more than 15 digits (about a
# petabyte) is "huge": refused like a malformed one, 501 and close, as the number of
# bytes to skip is not believed.
_BDAT = re.compile(rb" *([0-9]{1,15})(?: +(last))? *", re.IGNORECASE)
# The most chunk bytes the session reads and throws away to answer a refused BDAT
# (503, 552) in step with the client; a larger chunk is answered and the connection
# closed without reading it (RFC 3030 lets the server close instead).
DISCARD_LIMIT = 64 * 1024 * 1024


@dataclass
class _Chunk:
    """The BDAT chunk being read: ``left`` bytes still to come.  ``reply`` (and
    ``close``) are sent when it ends, for a refused chunk whose bytes are skipped."""

    size: int
    left: int
    last: bool
    store: bool
    reply: Reply | None = None


class Session(SessionPlumbing):
    """One SMTP connection.  See the module docstring for how to drive it."""

    def __init__(self, cfg: SessionConfig, env: dict[str, str],
                 clock: Callable[[], float]) -> None:
        super().__init__(cfg, env, clock)
        self.in_tls = False
        self.authenticated = False
        self.auth_failures = 0
        self.protocol = "SMTP"
        self.helo: str | None = None
        self.databytes = (digits(self.env["DATABYTES"]) if "DATABYTES" in self.env
                          else cfg.databytes)
        self.spp = SppState(enabled=cfg.plugins_enabled and "NOSPP" not in self.env)
        # The mail transaction: sender None means no MAIL yet (qmail's seenmail == 0).
        self.sender: str | None = None
        self.recipients: list[str] = []
        self._barf = False
        self._requiretls = False             # MAIL had REQUIRETLS (RFC 8689)
        self._mailfrom: str | None = None    # last accepted MAIL, for log lines
        self._last_addr: str | None = None   # last parsed address, for log lines
        self._reader: DataReader | None = None
        # BDAT: the open transaction's converter (a message is being written, None
        # between transactions), the chunk being read, and whether a refused BDAT
        # killed the transaction (503 to every BDAT until RSET/MAIL/HELO/EHLO).
        self._bdat: ChunkReader | None = None
        self._bdat_bytes = 0
        self._bdat_dead = False
        self._chunk: _Chunk | None = None
        self._auth: AuthExchange | None = None
        self._cert_tried = False
        self._cert_reason: str | None = None

    # ---- the I/O layer's API (feed, eof, wants_input, closed: SessionPlumbing) -------

    def start(self) -> list[Action]:
        """The greeting (after the [connection] plugins, if any)."""
        self._hook(HookStage.CONNECTION, "",
                   lambda _o: self._send(replies.greeting(self.cfg.greeting)))
        return self._flush()

    def queue_result(self, result: QueueOutcome) -> list[Action]:
        return self._resume_with(result)

    def auth_result(self, ok: bool, temporary_text: str | None = None) -> list[Action]:
        """``temporary_text``: the checker could not be run or crashed; the reply is
        ``454 <temporary_text>`` (use e.g. ``replies.AUTH_CHILD_CRASHED.text``)."""
        return self._resume_with((ok, temporary_text))

    def hook_result(self, outcome: HookOutcome) -> list[Action]:
        return self._resume_with(outcome)

    def cert_result(self, email: str | None, reason: str | None = None) -> list[Action]:
        """``email``: the verified client certificate's address listed in tlsclients;
        None with ``reason`` (shown in the 553) when not."""
        return self._resume_with((email, reason))

    def mailbox_result(self, found: bool) -> list[Action]:
        """``found``: False only when local delivery certainly has no mailbox."""
        return self._resume_with(found)

    def tls_started(self, cipher: str) -> list[Action]:
        """Handshake done (also for SMTPS, before ``start``): the HELO name is forgotten,
        the transaction and AUTH state are kept (eQmail)."""
        self.in_tls = True
        self.protocol = f"ESMTPS ({cipher} encrypted)"
        self.helo = None
        if self.phase is Phase.WAIT_TLS:
            self.phase = Phase.COMMAND
            if self._eof:
                self._close()
        self._pump()
        return self._flush()

    def tls_failed(self, error: str) -> list[Action]:
        self._send(replies.tls_failed(error))
        self._close()
        return self._flush()

    def log_line(self, event: str) -> str:
        """eQmail's log format; the I/O layer uses it for ``timeout`` / ``read failed``."""
        def show(value: str | None) -> str:
            return "(null)" if value is None else value
        return (f"qmail-smtpd: {event}: {show(self._mailfrom)} from "
                f"{self.env.get('TCPREMOTEIP', 'unknown')} to {show(self._last_addr)} "
                f"helo {show(self.helo)}")

    # ---- hooks -----------------------------------------------------------------------

    def _hook(self, stage: HookStage, arg: str, then: Callable[[HookOutcome], None],
              rejected: Callable[[], None] | None = None) -> None:
        """Run ``then`` now (no plugins) or after the plugins of ``stage`` accepted;
        ``rejected`` after a plugin's reply refused the command."""
        if not self.spp.enabled:
            then(HookOutcome())
            return
        self._wait(RunHook(stage, arg),
                   lambda outcome: self._hook_done(outcome, then, rejected))

    def _hook_done(self, outcome: HookOutcome, then: Callable[[HookOutcome], None],
                   rejected: Callable[[], None] | None = None) -> None:
        if outcome.verdict in (HookVerdict.NORMAL, HookVerdict.OK_SKIP):
            # Unfinished P lines: the command's one reply is the session's own (below).
            self.spp.open_reply = outcome.output
        else:
            self._send_raw(outcome.output)  # the plugin's reply, or the 451
        for name, value in outcome.env:
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.spp.headers.extend(outcome.headers)
        for stage, text in outcome.later:
            # One reply per command: the first text queued for it wins.
            self.spp.later.setdefault(stage, [text])
        if outcome.disable:
            self.spp.enabled = False
        if outcome.verdict is HookVerdict.TERMINATE:
            self._close()
        elif outcome.verdict is not HookVerdict.REJECT:
            then(outcome)
        elif rejected is not None:
            rejected()

    def _later(self, stage: HookStage) -> bool:
        """Show queued LM/LR/LD texts; True means the command is rejected by them."""
        texts = self.spp.later.pop(stage, None) if self.spp.enabled else None
        for text in texts or ():
            self._send_raw(text)
        return bool(texts)

    def _send(self, reply: Reply) -> None:
        """Every reply: plugin continuation lines left open for it go first when they
        carry its code (one multi-line reply); with another code they are dropped."""
        if self.spp.open_reply:  # only after a plugin left P lines open
            prefix, self.spp.open_reply = self.spp.open_reply, b""
            if prefix[:3] == b"%d" % reply.code:
                self._send_raw(prefix)
        super()._send(reply)

    # ---- commands --------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.replace(b"\0", b"\n").partition(b" ")
        handler = _VERBS.get(verb.lower())
        if handler is None:
            self._send(replies.UNRECOGNISED)
        else:
            handler(self, arg)

    def _line_too_long(self) -> None:
        self._send(replies.LINE_TOO_LONG)
        if self.phase is Phase.AUTH:
            self._auth = None
            self.phase = Phase.COMMAND

    def _reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self._requiretls = False

    def _cmd_helo(self, arg: bytes) -> None:
        self._helo(arg, replies.helo(self.cfg.greeting))

    def _cmd_ehlo(self, arg: bytes) -> None:
        keywords = []
        if self.cfg.tls_available and not self.in_tls:
            keywords.append("STARTTLS")
        keywords += ["PIPELINING", "8BITMIME", "CHUNKING", f"SIZE {self.databytes}"]
        if self.cfg.auth_available:
            if self.env.get("TLSREQUIRED") == "1" and not self.in_tls:
                keywords.append("AUTH CRAM-MD5")
            else:
                keywords.append("AUTH LOGIN PLAIN CRAM-MD5")
        if self.in_tls:  # RFC 8689: only a TLS-protected session offers REQUIRETLS
            keywords.append("REQUIRETLS")
        self._helo(arg, replies.ehlo(self.cfg.greeting, keywords))

    def _helo(self, arg: bytes, reply: Reply) -> None:
        if not arg.strip(b" \t"):  # eqmail: qmail-smtpd took a HELO without a name
            self._send(replies.HELO_SYNTAX)
            return
        name = decode(arg)
        if self.spp.enabled:
            self.env["SMTPHELOHOST"] = name

        def accept(_outcome: HookOutcome) -> None:
            self.helo = name
            self._reset_transaction()
            self._bdat_reset()
            self._send(reply)
        self._hook(HookStage.HELO, name, accept)

    def _junk(self) -> bool:
        """NOOP/RSET/VRFY/HELP: over cfg.junk_limit of them without a delivered
        message (Postfix's smtpd_junk_command_limit) the session ends with 421."""
        self.junk += 1
        if not self.cfg.junk_limit or self.junk <= self.cfg.junk_limit:
            return False
        self._log("too many junk commands")
        self._send(replies.TOO_MANY_JUNK)
        self._close()
        return True

    def _cmd_rset(self, arg: bytes) -> None:
        if self._junk():
            return
        self._reset_transaction()
        self._bdat_reset()
        self.spp.reset()
        self.spp.rcpt_count = self.spp.rcpt_count_all = 0
        self._send(replies.FLUSHED)

    def _cmd_noop(self, arg: bytes) -> None:
        if not self._junk():
            self._send(replies.OK)

    def _cmd_vrfy(self, arg: bytes) -> None:
        if not self._junk():
            self._send(replies.VRFY)

    def _cmd_help(self, arg: bytes) -> None:
        if not self._junk():
            self._send(replies.HELP)

    def _cmd_quit(self, arg: bytes) -> None:
        self._send(replies.quit_(self.cfg.greeting))
        self._close()

    def _cmd_starttls(self, arg: bytes) -> None:
        if self.in_tls:
            self._send(replies.UNIMPLEMENTED)
        elif arg:
            self._send(replies.STARTTLS_SYNTAX)
        elif not self.cfg.tls_available:
            self._send(replies.TLS_NO_CERT)
        else:
            self._send(replies.TLS_READY)
            self._bdat_reset()  # clear-text chunks never join a message sent under TLS
            self._out.append(StartTLS())
            self._buf.clear()  # CVE-2011-0411: nothing sent in clear may follow
            self.phase = Phase.WAIT_TLS

    def _parse(self, arg: bytes) -> str | None:
        addr = parse_address(arg, self.cfg.local_ips, self.cfg.localiphost)
        if addr is None:
            self._send(replies.SYNTAX_ERROR)
        else:
            self._last_addr = addr
        return addr

    def _cmd_mail(self, arg: bytes) -> None:
        if (self.cfg.submission or submission_port(self.env)) and not self.authenticated:
            self._send(replies.AUTH_REQUIRED)
            return
        addr = self._parse(arg)
        if addr is None:
            return
        params = parse_mail_params(arg)
        if params.requiretls_value:
            self._send(replies.REQUIRETLS_SYNTAX)
            return
        if params.requiretls and not self.in_tls:
            self._send(replies.REQUIRETLS_NEEDS_TLS)
            return
        if params.size is not None and self.databytes and params.size > self.databytes:
            self._send(replies.TOO_BIG)
            return
        # eqmail: AUTH= is believed only from a client that authenticated itself.
        if params.auth is not None and self.authenticated and "TCPREMOTEINFO" not in self.env:
            self.env["TCPREMOTEINFO"] = params.auth
        if self._later(HookStage.MAIL):
            return
        if self.spp.enabled:
            self.env["SMTPMAILFROM"] = addr
        self._hook(HookStage.MAIL, addr,
                   lambda outcome: self._mail_accept(outcome, addr, params.requiretls))

    def _mail_accept(self, outcome: HookOutcome, addr: str, requiretls: bool = False) -> None:
        if outcome.address is not None:
            addr = self.env["SMTPMAILFROM"] = outcome.address
        normal = outcome.verdict is HookVerdict.NORMAL
        # eqmail: "O" skips badmailfrom; eQmail kept the previous transaction's flag.
        self._barf = normal and self.cfg.badmailfrom.matches(addr)
        self.spp.mail_verdict = outcome.verdict
        self.spp.rcpt_count = self.spp.rcpt_count_all = 0
        self._bdat_reset()  # qmail: MAIL in a transaction starts a new one
        self.sender = self._mailfrom = addr
        self.recipients = []
        self._requiretls = requiretls
        self._send(replies.OK)

    def _relay_allowed(self, addr: str) -> bool:
        if self.cfg.rcpthosts is None:
            return "@" not in addr
        return self.cfg.rcpthosts.allows(addr)

    def _cmd_rcpt(self, arg: bytes) -> None:
        if self.sender is None:
            self._send(replies.MAIL_FIRST)
            return
        if self.cfg.max_rcpt and len(self.recipients) >= self.cfg.max_rcpt:
            self._send(replies.TOO_MANY_RCPTS)  # bounds the session's memory, too
            return
        addr = self._parse(arg)
        if addr is None:
            return
        if not addr:  # RCPT TO:<>: nobody could ever receive it
            self._send(replies.NULL_RCPT)
            return
        if self._barf:
            self._send(replies.BADMAILFROM)
            return
        if self._later(HookStage.RCPT):
            return
        if self.spp.enabled:
            # eqmail runs [rcpt] plugins (eQmail 1.09 never does), upstream qmail-spp order.
            self.spp.rcpt_count_all += 1
            allowed = ("RELAYCLIENT" in self.env or self.authenticated
                       or self._relay_allowed(addr))
            self.env.update(SMTPRCPTTO=addr, SMTPRCPTCOUNT=str(self.spp.rcpt_count),
                            SMTPRCPTCOUNTALL=str(self.spp.rcpt_count_all),
                            SMTPRCPTHOSTSOK="1" if allowed else "0")
        self._hook(HookStage.RCPT, addr, lambda outcome: self._rcpt_accept(outcome, addr))

    def _rcpt_accept(self, outcome: HookOutcome, addr: str) -> None:
        if outcome.address is not None:
            addr = outcome.address
        relayclient = self.env.get("RELAYCLIENT")
        if relayclient is None and self.authenticated:
            relayclient = ""  # eQmail's AUTH patch: its internal relay flag, not the variable
        check = (outcome.verdict is HookVerdict.NORMAL
                 and self.spp.mail_verdict is HookVerdict.NORMAL)
        if relayclient is not None:
            addr += relayclient
        elif check and not self._relay_allowed(addr):
            if self.in_tls and self.cfg.tls_client_relay and not self._cert_tried:
                self._cert_tried = True
                self._wait(CheckClientCert(), lambda result: self._cert_done(result, addr))
                return
            self._refuse_relay()
            return
        self._check_mailbox(addr, check)

    def _check_mailbox(self, addr: str, check: bool) -> None:
        """eqmail: a local recipient without a mailbox is refused now instead of being
        bounced later (backscatter), whether relaying is allowed or not; a plugin's O
        verdict skips it like qmail's other checks."""
        if self._srs_recipient(addr):
            return
        if not (check and self.cfg.check_mailbox):
            self._add_recipient(addr)
            return
        self._wait(CheckMailbox(addr), lambda found: self._mailbox_done(found, addr))

    def _srs_recipient(self, addr: str) -> bool:
        """eqmail (issue 16): an SRS address at our SRS domain — a bounce to mail we
        forwarded — is taken when it reverses (the scanner rewrites it to the original
        sender; no mailbox has its name, so the mailbox check is skipped) and refused
        when it is forged, altered or expired, so that nobody can use it to relay.
        Before a plugin's O verdict too: that is about the client, this about the
        address.  True when the recipient was answered here."""
        keys = self.cfg.srs
        if keys is None or not keys.ours(addr):
            return False
        refusal = srs.check(addr, keys, self.clock())
        if refusal is None:
            self._add_recipient(addr)
        else:
            self._log(f"SRS recipient refused ({refusal.value})")
            self._send(replies.srs_refused(refusal))
        return True

    def _mailbox_done(self, found: bool, addr: str) -> None:
        if found:
            self._add_recipient(addr)
        else:
            self._log("no mailbox")
            self._send(replies.NO_MAILBOX)

    def _refuse_relay(self) -> None:
        if self.in_tls:
            self._send(replies.no_rcpthosts_tls(self._cert_reason))
        else:
            self._send(replies.NO_RCPTHOSTS)

    def _cert_done(self, result: tuple[str | None, str | None], addr: str) -> None:
        email, reason = result
        if email is None:
            self._cert_reason = reason
            self._refuse_relay()
            return
        self.env["RELAYCLIENT"] = ""
        self.protocol += f"\n  (cert {email})"
        self._check_mailbox(addr, True)

    def _add_recipient(self, addr: str) -> None:
        self.recipients.append(addr)
        self.spp.rcpt_count += 1
        self._send(replies.OK)

    # ---- DATA ------------------------------------------------------------------------

    def _cmd_data(self, arg: bytes) -> None:
        if self._bdat is not None or self._bdat_dead:
            self._send(replies.BDAT_MIXED)  # RFC 3030 §2: DATA after BDAT: 503
            return
        if self.sender is None:
            self._send(replies.MAIL_FIRST)
            return
        if not self.recipients:
            self._send(replies.RCPT_FIRST)
            return
        if self._later(HookStage.DATA):
            return
        self._hook(HookStage.DATA, "", lambda _outcome: self._data_begin())

    def _data_begin(self) -> None:
        self._begin_message()
        self._send(replies.GO_AHEAD)
        self._reader = DataReader(self.databytes)
        self.phase = Phase.DATA

    def _begin_message(self) -> None:
        """The transaction becomes a message (DATA's 354, the first BDAT chunk): the
        Received line and plugin headers go first, as qmail-smtpd writes them."""
        sender, recipients = self.sender or "", tuple(self.recipients)
        requiretls = self._requiretls
        self._reset_transaction()
        header = received_line(
            protocol=self.protocol, local=self.cfg.local_host,
            remoteip=self.env.get("TCPREMOTEIP", "unknown"),
            remotehost=self.env.get("TCPREMOTEHOST", "unknown"),
            remoteinfo=self.env.get("TCPREMOTEINFO"), helo=self.helo,
            when=self.clock(), utcoffset=self.cfg.utcoffset)
        header += "".join(h + "\n" for h in self.spp.headers)
        self.spp.reset()
        self._out.append(BeginMessage(sender, recipients, encode(header), requiretls))

    def _data_step(self) -> bool:
        """Feed buffered input to the DATA reader; False when more input is needed."""
        if self._chunk is not None:
            return self._chunk_step()
        reader = self._reader
        assert reader is not None
        step = reader.step(bytes(self._buf))
        del self._buf[:step.consumed]
        if step.stored:
            self._out.append(MessageData(step.stored))
        if step.status is DataStatus.MORE:
            return False
        self._reader = None
        if step.status is DataStatus.BARE_LF:
            self._log("bad newlines")
            self._send(replies.BARE_LF)
            self._close()  # phase is still DATA: emits AbortMessage first
        elif reader.looping:
            self._finish_refused(replies.TOO_MANY_HOPS, "message looping")
        elif reader.too_big:
            self._finish_refused(replies.TOO_BIG, "message too big")
        else:
            self.phase = Phase.COMMAND
            self._wait(EndMessage(), self._queued)
        return True

    def _finish_refused(self, reply: Reply, event: str) -> None:
        self._out.append(AbortMessage())
        self.phase = Phase.COMMAND
        self._log(event)
        self._send(reply)

    def _queued(self, result: QueueOutcome) -> None:
        if result.status is QueueStatus.ACCEPTED:
            self.errors = self.junk = 0  # Postfix: the limits count "without delivering mail"
            self._log("message accepted")
            self._send(replies.accepted(int(self.clock()), result.qp))
        elif result.status is QueueStatus.REJECTED:
            self._log(f"message rejected ({result.text})")
            self._send(replies.queue_permanent(result.text))
        elif result.status is QueueStatus.REFUSED:  # issue 16: nothing was queued
            self._log(f"message refused ({result.text})")
            self._send(replies.refused(result.text))
        else:
            self._log(f"message delayed ({result.text})")
            self._send(replies.queue_temporary(result.text))

    # ---- BDAT (RFC 3030) -------------------------------------------------------------

    def _cmd_bdat(self, arg: bytes) -> None:
        match = _BDAT.fullmatch(arg)
        if match is None:
            # The chunk's length is unknown: nothing after this line can be framed.
            self._log("bad BDAT size")
            self._send(replies.BDAT_SYNTAX)
            self._close()
            return
        size, last = int(match[1]), match[2] is not None
        if self._bdat_dead:
            self._refuse_chunk(size, replies.BDAT_FAILED)
        elif self._bdat is None and self.sender is None:
            self._refuse_chunk(size, replies.MAIL_FIRST)
        elif self._bdat is None and not self.recipients:
            self._refuse_chunk(size, replies.RCPT_FIRST)
        elif self.databytes and self._bdat_bytes + size > self.databytes:
            # RFC 1870/3030: 552 once the chunk is read; the transaction is dead.
            self._log("message too big")
            self._bdat_fail()
            self._refuse_chunk(size, replies.TOO_BIG)
        elif self._bdat is not None:
            self._read_chunk(size, last)
        elif self._later(HookStage.DATA):
            self._bdat_fail()
            self._refuse_chunk(size, None)
        else:
            def begin(_outcome: HookOutcome) -> None:
                self._begin_message()
                self._bdat = ChunkReader()
                self._read_chunk(size, last)

            def rejected() -> None:  # the plugin's reply was the answer
                self._bdat_fail()
                self._refuse_chunk(size, None)
            self._hook(HookStage.DATA, "", begin, rejected)

    def _read_chunk(self, size: int, last: bool) -> None:
        self._bdat_bytes += size
        self._chunk = _Chunk(size, size, last, store=True)
        self.phase = Phase.DATA

    def _refuse_chunk(self, size: int, reply: Reply | None) -> None:
        """Skip the chunk's bytes, then answer ``reply`` (None: already answered); a
        chunk over DISCARD_LIMIT is answered at once and the connection closed."""
        if size > DISCARD_LIMIT:
            if reply is not None:
                self._send(reply)
            self._close()
            return
        self._chunk = _Chunk(size, size, False, store=False, reply=reply)
        self.phase = Phase.DATA

    def _chunk_step(self) -> bool:
        """Consume the chunk's bytes from the buffer (counted, never scanned)."""
        chunk = self._chunk
        assert chunk is not None
        take = min(len(self._buf), chunk.left)
        if take:
            piece = bytes(self._buf[:take])
            del self._buf[:take]
            chunk.left -= take
            if chunk.store and not self._store_piece(piece):
                return True
        if chunk.left:
            return False
        self._chunk = None
        self.phase = Phase.COMMAND
        if not chunk.store:
            if chunk.reply is not None:
                self._send(chunk.reply)
        elif not chunk.last:
            self._send(replies.bdat_received(chunk.size))
        else:
            self._bdat_last()
        return True

    def _store_piece(self, piece: bytes) -> bool:
        """Pass a piece of chunk data on; False when it closed the session (bare LF)."""
        assert self._bdat is not None
        stored = self._bdat.feed(piece)
        if stored is None:
            self._bdat = None
            self._chunk = None
            self._log("bad newlines")
            self._send(replies.BARE_LF)
            self._close()  # phase is still DATA: emits AbortMessage first
            return False
        if stored:
            self._out.append(MessageData(stored))
        return True

    def _bdat_last(self) -> None:
        reader, self._bdat, self._bdat_bytes = self._bdat, None, 0
        assert reader is not None
        tail = reader.end()
        if tail:
            self._out.append(MessageData(tail))
        if reader.looping:
            self._finish_refused(replies.TOO_MANY_HOPS, "message looping")
        else:
            self._wait(EndMessage(), self._queued)

    def _bdat_fail(self) -> None:
        """A refused chunk: the message (if begun) is dropped, the transaction dead."""
        if self._bdat is not None:
            self._out.append(AbortMessage())
        self._reset_transaction()
        self._bdat = None
        self._bdat_bytes = 0
        self._bdat_dead = True

    def _bdat_reset(self) -> None:
        """RSET, MAIL, HELO/EHLO, STARTTLS: an unfinished BDAT message is dropped."""
        if self._bdat is not None:
            self._out.append(AbortMessage())
        self._bdat = None
        self._bdat_bytes = 0
        self._bdat_dead = False

    def _close(self) -> None:
        if self._chunk is not None:
            # Inside a chunk the message is open only when the chunk is stored (a
            # skipped chunk has none): decided here, not by the DATA phase.
            self.phase = Phase.COMMAND
        if self._bdat is not None:
            self._out.append(AbortMessage())
        self._bdat = None
        self._chunk = None
        super()._close()

    # ---- AUTH ------------------------------------------------------------------------

    def _cmd_auth(self, arg: bytes) -> None:
        mech, _, initial = arg.partition(b" ")
        method = mech.lower().decode("latin-1")
        # eqmail: the CRAM-MD5 exemption is case-insensitive (eQmail: exact "cram-md5").
        if self.env.get("TLSREQUIRED") == "1" and not self.in_tls and method != "cram-md5":
            self._send(replies.AUTH_TLS_REQUIRED)
        elif not self.cfg.auth_available:
            self._send(replies.AUTH_NOT_AVAILABLE)
        elif self.authenticated:
            self._send(replies.AUTH_ALREADY)
        elif self.sender is not None or self._bdat is not None:
            self._send(replies.AUTH_IN_TRANSACTION)
        elif method not in MECHANISMS:
            self._send(replies.AUTH_UNIMPLEMENTED)
        else:
            challenge = (cram_challenge(self.cfg.local_host, self.cfg.randbits)
                         if method == "cram-md5" else b"")
            self._auth = AuthExchange(method, challenge)
            self._auth_step(self._auth.start(initial.lstrip(b" ")))

    def _auth_line(self, line: bytes) -> None:
        assert self._auth is not None
        self._auth_step(self._auth.line(line))

    def _auth_step(self, step: AuthStep) -> None:
        if isinstance(step, Credentials):
            self._auth = None
            self.phase = Phase.COMMAND
            self._wait(CheckPassword(step.method, step.user, step.password, step.challenge),
                       lambda result: self._auth_checked(result, step))
        elif isinstance(step, Failed):
            self._auth = None
            self.phase = Phase.COMMAND
            self._send(step.reply)
        else:
            self.phase = Phase.AUTH
            self._send(step.reply)

    def _auth_checked(self, result: tuple[bool, str | None], creds: Credentials) -> None:
        ok, temporary = result
        if temporary is not None:
            self._send(Reply(454, temporary))
        elif not ok:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self._log("too many auth failures")
                self._send(replies.AUTH_TOO_MANY)
                self._close()
            else:
                self._send(replies.AUTH_FAILED)
        else:
            user = decode(creds.user)
            if self.spp.enabled:
                self.env.update(SMTPAUTHUSER=user, SMTPAUTHMETHOD=creds.method)
            self._hook(HookStage.AUTH, user, lambda _outcome: self._auth_ok(user))

    def _auth_ok(self, user: str) -> None:
        self.authenticated = True
        self.protocol = "ESMTPA"
        # Relaying is allowed by the session's own flag (see _rcpt_accept): plugins must
        # not see RELAYCLIENT, or every plugin that skips relay clients would skip every
        # authenticated user; they see SMTPAUTHUSER and SMTPRCPTHOSTSOK=1 instead.
        self.env["TCPREMOTEINFO"] = user
        self._send(replies.auth_ok(user))


_VERBS: dict[bytes, Callable[[Session, bytes], None]] = {
    b"helo": Session._cmd_helo, b"ehlo": Session._cmd_ehlo, b"mail": Session._cmd_mail,
    b"rcpt": Session._cmd_rcpt, b"data": Session._cmd_data, b"rset": Session._cmd_rset,
    b"noop": Session._cmd_noop, b"vrfy": Session._cmd_vrfy, b"help": Session._cmd_help,
    b"quit": Session._cmd_quit, b"starttls": Session._cmd_starttls,
    b"auth": Session._cmd_auth, b"bdat": Session._cmd_bdat,
}
