"""The SMTP client side of remote delivery (qmail-remote's dialogue, eQmail's TLS/AUTH).

Owns: one SMTP conversation on one connected socket — greeting, EHLO/HELO, STARTTLS or
implicit TLS, AUTH LOGIN to a smarthost, MAIL/RCPT/DATA, RSET for reuse — and every
text qmail-remote reports about it.  The pure parts (reply parsing, EHLO keywords,
address quoting, dot-stuffing, qmail-rspawn's report merge) are module functions with
no I/O; :class:`SmtpSession` does the I/O through a :class:`Transport`.  The connection
itself, the TLS policy and contexts and the certificate name rules are
eqmail.smtp.transport's.  Runs in the remote delivery worker (eqmailr).

Inputs: a connected socket, the destination (:class:`Destination`), helohost, the TLS
configuration (:class:`TlsConfig`), ``timeoutremote`` for every read and write.

Outputs: an :class:`~eqmail.ipc.delivery.Outcome` per recipient (qmail-remote's
``r`` / ``h`` / ``s``: :data:`ACCEPTED`, or a failure or deferral with its text) and one
for the message (qmail-remote's ``K`` / ``Z`` / ``D``), the texts exactly as
qmail-remote prints them (``\\n`` where qmail has newlines, ``Remote host said: ...``
from the last reply, ``Possible duplicate!`` when the connection died after the final
dot); :func:`rspawn_outcome` merges the two as qmail-rspawn does.

Lockstep: the client reads exactly the replies it asked for.  Every reply must be
well formed (:func:`parse_reply`: three digits, one code on every line) and of the
class its stage allows (a 3xx where a final answer is due, a 2xx to DATA, is a
protocol error), and nothing may follow it — neither in the bytes read with it nor
waiting on the socket when the next command is due (:meth:`SmtpSession.reply`,
:meth:`SmtpSession.expect_silence`).  So stray or injected lines (after the greeting,
with the 220 to STARTTLS — Exim's CVE-2021-38371 —, anywhere) can never be taken as the
answer to a later command, and only a well-formed 2xx to the end of data reports the
message accepted.  A server that breaks this gets a deferral (retry later).

Failures: terminal message outcomes travel as :class:`Quit`; :class:`TryNext` = a 4xx
greeting (try the next address silently, eQmail); :class:`RetryClear` = an opportunistic
STARTTLS handshake failed (the caller reconnects to the same address in clear text
once: DESIGN, Postfix's behaviour); a dead, silent or garbled peer is
:class:`Dropped` (eqmail.smtp.transport's), one that breaks the lockstep or the reply
syntax :class:`ProtocolViolation` (a Dropped with its own text).  Hosts with
``tlshosts/<host>.pem`` (relays given as an IP address: ``tlshosts/<address>.pem``)
never fall back and are verified strictly (subjectAltName DNS names, else CN; no eQmail
CN fallback; an IP relay's certificate must carry that address as an iPAddress
subjectAltName).  A message larger than the server's advertised ``SIZE`` is not sent
(a failure, #5.3.4).

A host under its domain's published TLS policy (issue 17: :class:`TlsDemand`, decided by
eqmail.delivery.remote) is opened by :meth:`SmtpSession._open_demanded`: STARTTLS and a
certificate that passes the policy's check (MTA-STS: the CA store and the host name;
DANE: the TLSA records, through the check handed in) are mandatory when the policy is
enforced — a failure is :class:`PolicyFailure`, and nothing is sent in clear text —
and only recorded in :attr:`SmtpSession.tls_result` when it is not.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography import x509
from OpenSSL import SSL

from eqmail.dns import Tlsa
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.smtp.bdatout import BdatEncoder
from eqmail.smtp.dataout import DataEncoder, wire_size
from eqmail.smtp.transport import (
    CHUNK,
    Dropped,
    TlsConfig,
    TlsMode,
    Transport,
    certificate_names,
    ip_literal,
    peer_name_problem,
    ssl_error_text,
)

MAX_TEXT = 5000  # qmail-remote's HUGESMTPTEXT
MAX_LINE = 16384  # one reply line; longer = broken peer
MAX_LINES = 512


#: qmail-remote's ``r``: the server accepted the recipient (no text of its own).
ACCEPTED = Outcome(Verdict.SUCCESS, "")


class Quit(Exception):
    """A terminal message outcome (qmail-remote's quit()/temp_*/perm_*)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


class TryNext(Exception):
    """A 4xx greeting: close silently and try the next address."""


class RetryClear(Exception):
    """Opportunistic TLS failed its handshake: retry this address without TLS."""


class PolicyFailure(Exception):
    """A host failed the TLS policy its domain publishes (issue 17: DANE, MTA-STS
    enforce): the connection is closed and the caller tries the next host.
    ``result``: RFC 8460's result type (eqmail.delivery.tlspolicy.ResultType's value:
    smtp/ does not import delivery/), ``detail``: why, for logs and the deferral."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(f"{result}: {detail}")
        self.result = result
        self.detail = detail


class ProtocolViolation(Dropped):
    """The server broke SMTP's lockstep or reply syntax: a malformed reply, one of the
    wrong class for its stage, or data nobody asked for.  ``reply`` = the offending
    reply when there is one (its text goes into the report)."""

    def __init__(self, why: str, reply: Reply | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.reply = reply


# ------------------------------------------------------------------ pure parts


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # qmail's smtptext: every line, CR removed, "\n"-terminated, <= 5000 chars
    lines: tuple[str, ...] = ()  # the lines without their "250-" prefix


def clean_text(data: bytes) -> str:
    """Remote text as echoed in reports: NUL and other controls become ``?``."""
    text = data.decode("utf-8", "surrogateescape")
    return "".join("?" if (c < " " and c not in "\n\t") or c == "\x7f" else c for c in text)


def reply_line(line: bytes) -> tuple[int, bool]:
    """One reply line (CRs removed, no LF): its code, and whether it ends the reply.
    RFC 5321 §4.2: three digits, the first 2-5, then SP, ``-`` (more lines follow) or
    nothing."""
    if len(line) > MAX_LINE:  # the same verdict however the line was split
        raise ProtocolViolation("reply line too long")
    if (len(line) < 3 or not line[:3].isdigit() or line[:1] not in (b"2", b"3", b"4", b"5")
            or line[3:4] not in (b"", b" ", b"-")):
        raise ProtocolViolation("malformed reply")
    return int(line[:3]), line[3:4] != b"-"


def parse_reply(lines: list[bytes]) -> Reply:
    """The one reply parser: a complete reply from its lines (CRs removed, no LF).
    Every line well formed, every one but the last continued with ``-``, one code on
    every line — a multi-line reply whose lines disagree is not a reply at all."""
    if not lines:
        raise ProtocolViolation("empty reply")
    codes = set()
    for i, ln in enumerate(lines):
        code, last = reply_line(ln)
        if last != (i == len(lines) - 1):
            raise ProtocolViolation("malformed reply")
        codes.add(code)
    if len(codes) != 1:
        raise ProtocolViolation("multi-line reply with different codes")
    text = clean_text(b"".join(ln + b"\n" for ln in lines))[:MAX_TEXT]
    rest = tuple(clean_text(ln[4:]) for ln in lines)
    return Reply(codes.pop(), text, rest)


class ReplyParser:
    """Bytes from the server -> complete replies (:func:`parse_reply`).  Pure; no I/O.
    Bounded: a line over MAX_LINE or a reply over MAX_LINES lines is a violation."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lines: list[bytes] = []

    @property
    def idle(self) -> bool:
        """Nothing read beyond the replies already returned."""
        return not self.buf and not self.lines

    def feed(self, data: bytes) -> list[Reply]:
        self.buf += data
        out: list[Reply] = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE:
                    raise ProtocolViolation("reply line too long")
                return out
            line = bytes(self.buf[:nl]).replace(b"\r", b"")
            del self.buf[: nl + 1]
            _, last = reply_line(line)
            if len(self.lines) >= MAX_LINES:
                raise ProtocolViolation("reply too long")
            self.lines.append(line)
            if last:
                lines, self.lines = self.lines, []
                out.append(parse_reply(lines))


def said(reply: Reply | None) -> str:
    return f"Remote host said: {reply.text}" if reply is not None and reply.text else ""


def ehlo_keywords(reply: Reply) -> set[str]:
    return {ln.split(" ", 1)[0].split("=", 1)[0].upper() for ln in reply.lines[1:] if ln}


def auth_login_offered(reply: Reply) -> bool:
    """An ``AUTH`` (or ``AUTH=``) EHLO line listing the LOGIN mechanism."""
    for ln in reply.lines[1:]:
        words = ln.replace("=", " ", 1).upper().split()
        if words and words[0] == "AUTH" and "LOGIN" in words[1:]:
            return True
    return False


ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")


def quote_address(addr: str) -> str:
    """qmail's quote.c: quote the local part unless it is a dot-atom."""
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    atoms = local.split(".")
    if local and all(a and set(a) <= ATEXT for a in atoms):
        quoted = local
    else:
        quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{quoted}@{domain}" if at else quoted


def size_offered(ehlo: Reply | None) -> int | None:
    """RFC 1870: None if the EHLO reply has no SIZE keyword, else the limit it states
    (0 = none stated, or not a number: no fixed limit)."""
    if ehlo is None:
        return None
    for ln in ehlo.lines[1:]:
        words = ln.split()
        if words and words[0].upper() == "SIZE":
            arg = words[1] if len(words) > 1 else ""
            return int(arg) if arg.isdigit() and len(arg) <= 20 else 0
    return None


# qmail-rspawn ranks the outcomes: success above deferral above failure.
_RANK = {Verdict.SUCCESS: 1, Verdict.DEFERRAL: 0, Verdict.FAILURE: -1}


def rspawn_outcome(rcpt: Outcome | None, message: Outcome) -> Outcome:
    """qmail-rspawn's merge of one recipient's outcome with the message's.

    ``rcpt`` None (qmail-remote stopped before RCPT): the message's alone.  Otherwise
    a refused recipient keeps its own verdict, an accepted one takes the message's;
    the text is the recipient's, followed by the message's unless the message did
    better than the verdict (a refused recipient of a delivered message)."""
    if rcpt is None:
        return message
    verdict = message.verdict if rcpt.verdict is Verdict.SUCCESS else rcpt.verdict
    tail = message.text if _RANK[message.verdict] <= _RANK[verdict] else ""
    return Outcome(verdict, rcpt.text + tail)


def dropped(ip: str, critical: bool) -> Outcome:
    dup = "Possible duplicate! " if critical else ""
    return Outcome(Verdict.DEFERRAL, f"Connected to {ip} but connection died. {dup}(#4.4.2)\n")


def violation(ip: str, e: ProtocolViolation, critical: bool) -> Outcome:
    """A server out of step: a deferral, like a dropped connection."""
    dup = "Possible duplicate! " if critical else ""
    return Outcome(Verdict.DEFERRAL,
                   f"Connected to {ip} but the server broke the SMTP protocol ({e.why}). "
                   f"{dup}(#4.5.0)\n{said(e.reply)}")


def too_large(ip: str, size: int, limit: int) -> Outcome:
    """Postfix's 5.3.4: the server said in advance that it takes no message this big."""
    return Outcome(Verdict.FAILURE,
                   f"Connected to {ip} but the message ({size} bytes) is larger than the server "
                   f"accepts ({limit} bytes): message size exceeds fixed limit. (#5.3.4)\n")


def _refusal(code: int) -> Verdict:
    """A 5xx is a failure, a 4xx a deferral."""
    return Verdict.FAILURE if code >= 500 else Verdict.DEFERRAL


@dataclass(frozen=True)
class TlsDemand:
    """What a domain's published TLS policy asks of one of its MX hosts (issue 17),
    decided by remote delivery: ``kind`` (eqmail.delivery.tlspolicy.PolicyKind's
    value), ``enforce`` (a failure closes the connection with :class:`PolicyFailure`;
    otherwise it is only recorded and the session goes on as opportunistic TLS:
    MTA-STS testing, or a message with ``TLS-Required: No``), ``webpki`` (MTA-STS: the
    certificate must verify against the CA store and name the host), ``tlsa`` (DANE:
    the usable TLSA records the chain must match; empty under DANE = TLS mandatory
    but unauthenticated, RFC 7672 §2.2), ``names``: DANE-TA's reference identifiers."""

    kind: str
    enforce: bool
    webpki: bool = False
    tlsa: tuple[Tlsa, ...] = ()
    names: tuple[str, ...] = ()


# DANE's chain check (eqmail.delivery.dane.verify, handed in by remote delivery):
# (records, chain leaf first, reference identifiers, now) -> (result type or None, detail)
DaneCheck = Callable[[Sequence[Tlsa], Sequence[x509.Certificate], Sequence[str], float],
                     tuple[str | None, str]]


@dataclass(frozen=True)
class Destination:
    ip: str
    port: int = 25
    host: str = ""  # MX or relay name (an IP relay: its address): TLS files, SNI, name check
    user: str | None = None
    password: str | None = None
    implicit_tls: bool = False  # TLS from the first byte (smtproutes port 465)
    demand: TlsDemand | None = None  # the domain's TLS policy for this host (issue 17)


@dataclass
class SmtpSession:
    """One SMTP connection.  ``open`` runs the greeting up to AUTH; ``transaction``
    sends one message; ``rset`` readies a reused connection.  Replies are read in
    lockstep (module docstring): :meth:`reply` after each command, :meth:`expect_silence`
    before the next one."""

    transport: Transport
    dest: Destination
    helohost: str
    tls: TlsConfig
    parser: ReplyParser = field(default_factory=ReplyParser)
    last: str = "the greeting"  # what the last reply answered, for violation texts
    authed: bool = False
    tls_active: bool = False
    usable: bool = False
    size_limit: int | None = None  # the server's SIZE (0 = no limit); None: not offered
    dane: DaneCheck | None = None  # how a DANE demand's chain is checked
    keywords: frozenset[str] = frozenset()  # the last EHLO reply's keywords
    # issue 17: how the TLS of this session measured up to the host's demand --
    # (RFC 8460 result type or None for success, detail or what matched); None: no
    # demand was checked (no policy, or a tlshosts/ pin)
    tls_result: tuple[str | None, str] | None = None

    @property
    def ip(self) -> str:
        return self.dest.ip

    def reply(self, stage: str) -> Reply:
        """The one reply to what we just sent.  Anything read beyond it (a second reply,
        part of one) was asked for by nobody: it would be taken as the answer to a
        later command, so it is a violation, never kept."""
        got: list[Reply] = []
        while not got:
            data = self.transport.recv()
            if not data:
                raise Dropped("connection closed")
            got = self.parser.feed(data)
        if len(got) > 1 or not self.parser.idle:
            raise ProtocolViolation(f"unsolicited data after {stage}")
        self.last = stage
        return got[0]

    def expect_silence(self) -> None:
        """Before we speak again: whatever has arrived since the last reply is unsolicited.
        (End of stream is left for the next read to report.)"""
        if self.transport.pending_input():
            raise ProtocolViolation(f"unsolicited data after {self.last}")

    def command(self, line: str, stage: str) -> Reply:
        self.expect_silence()
        self.transport.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self.reply(stage)

    def quit(self, verdict: Verdict, prepend: str, append: str, reply: Reply | None) -> Quit:
        """qmail-remote's quit(): QUIT without waiting, the outcome with the remote text."""
        try:
            self.transport.send(b"QUIT\r\n")
        except Dropped:
            pass
        self.usable = False
        return Quit(Outcome(verdict, f"{prepend}{self.ip}{append}.\n{said(reply)}"))

    # ---------------------------------------------------------------- opening
    def open(self, allow_tls: bool = True) -> None:
        """Greeting, EHLO/HELO, TLS as the policy says, AUTH LOGIN with credentials.
        A server out of step gives a terminal deferral, as a failed greeting."""
        try:
            self._open(allow_tls)
        except ProtocolViolation as e:
            self.usable = False
            raise Quit(violation(self.ip, e, False)) from None

    def _open(self, allow_tls: bool) -> None:
        mode, pem = self.tls.mode_for(self.dest.host)
        demand = self.dest.demand
        if demand is not None and mode is not TlsMode.MANDATORY:
            return self._open_demanded(demand, allow_tls)
        if self.dest.implicit_tls:
            self._handshake(mode, pem, implicit=True)
        ehlo = self._greeted()
        if not self.tls_active and mode is not TlsMode.OFF and allow_tls:
            ehlo = self._starttls(ehlo, mode, pem)
        self._ready(ehlo)

    def _greeted(self) -> Reply | None:
        """The greeting (qmail-remote's rules: 5xx fails, 4xx tries the next address,
        anything but 220 defers), then EHLO/HELO: the EHLO reply, None after HELO."""
        greeting = self.reply("the greeting")
        if self.dest.implicit_tls and greeting.code != 220:
            raise self.quit(Verdict.DEFERRAL, "TLS Connected to ", " but greeting failed", greeting)
        if 500 <= greeting.code < 600:
            raise self.quit(Verdict.FAILURE, "Connected to ", " but greeting failed", greeting)
        if 400 <= greeting.code < 500:
            self.close(send_quit=False)
            raise TryNext()
        if greeting.code != 220:
            raise self.quit(Verdict.DEFERRAL, "Connected to ", " but greeting failed", greeting)
        return self._hello()

    def _ready(self, ehlo: Reply | None) -> None:
        """After TLS: AUTH LOGIN when we have credentials and it is offered, SIZE."""
        if self.dest.user is not None and self.dest.password is not None and ehlo is not None:
            if auth_login_offered(ehlo):
                self._auth_login()
        self.size_limit = size_offered(ehlo)
        self.usable = True

    def _open_demanded(self, demand: TlsDemand, allow_tls: bool) -> None:
        """:meth:`_open` for a host under a published TLS policy (DANE, MTA-STS): TLS
        is mandatory when the policy is enforced — no STARTTLS, a refused one, a failed
        handshake or a certificate that does not match end the session with
        :class:`PolicyFailure`, never with the clear-text retry — and checked (and the
        check recorded in :attr:`tls_result`) when it is not."""
        ehlo = self._greeted()
        if allow_tls:
            ehlo = self._starttls_demanded(ehlo, demand)
        self._ready(ehlo)

    def _policy_miss(self, demand: TlsDemand, result: str, detail: str) -> None:
        """A failed check: the end of this session when enforced, else recorded."""
        self.tls_result = (result, detail)
        if demand.enforce:
            self.usable = False
            self.close(send_quit=not self.tls_active)
            raise PolicyFailure(result, detail)

    def _starttls_demanded(self, ehlo: Reply | None, demand: TlsDemand) -> Reply | None:
        if ehlo is None or "STARTTLS" not in ehlo_keywords(ehlo):
            self._policy_miss(demand, "starttls-not-supported", "STARTTLS not offered")
            return ehlo
        r = self.command("STARTTLS", "the reply to STARTTLS")
        if r.code != 220:
            self._policy_miss(demand, "starttls-not-supported",
                              f"STARTTLS refused ({r.code})")
            return ehlo
        self.expect_silence()  # CVE-2021-38371, as in _starttls
        sni = self.dest.host if ip_literal(self.dest.host) is None else ""
        try:
            conn = self.transport.start_tls(self.tls.context("", webpki=demand.webpki), sni)
        except (Dropped, SSL.Error) as e:
            text = ssl_error_text(e)
            self.tls_result = ("validation-failure", f"TLS handshake failed: {text}")
            self.usable = False
            self.close(send_quit=False)
            if demand.enforce:
                raise PolicyFailure(*self.tls_result) from None
            raise RetryClear(text) from None
        self.tls_active = True
        result, detail = self._check_demand(conn, demand)
        if result is not None:
            self._policy_miss(demand, result, detail)
        else:
            self.tls_result = (None, detail)
        self.parser = ReplyParser()
        return self._hello()

    def _check_demand(self, conn: SSL.Connection, demand: TlsDemand) -> tuple[str | None, str]:
        """The peer's certificate against the demand: (None, what matched) or (RFC 8460
        result type, why not)."""
        peer = conn.get_peer_certificate()
        if peer is None:
            return "certificate-not-trusted", "no certificate provided"
        if demand.webpki:
            problem = conn.get_app_data()
            if problem is not None:
                kind = ("certificate-expired" if "expired" in str(problem)
                        else "certificate-not-trusted")
                return kind, str(problem)
            leaf = peer.to_cryptography()
            sans, cns, ips = certificate_names(leaf)
            name_problem = peer_name_problem(self.dest.host, sans, cns, ips)
            if name_problem is not None:
                return "certificate-host-mismatch", name_problem
            return None, f"certificate for {self.dest.host} issued by {leaf.issuer.rfc4514_string()[:200]}"
        if demand.tlsa:
            if self.dane is None:  # pragma: no cover - remote delivery always hands it in
                return "validation-failure", "no DANE verifier"
            chain = [c.to_cryptography() for c in conn.get_peer_cert_chain() or [peer]]
            return self.dane(demand.tlsa, chain, demand.names, time.time())
        return None, "TLS without authentication (no usable TLSA record)"

    def _hello(self) -> Reply | None:
        """EHLO, else HELO (qmail-core §4.3); the EHLO reply, or None after HELO."""
        ehlo = self.command(f"EHLO {self.helohost}", "the reply to EHLO")
        if ehlo.code == 250:
            self.keywords = frozenset(ehlo_keywords(ehlo))
            return ehlo
        self.keywords = frozenset()
        helo = self.command(f"HELO {self.helohost}", "the reply to HELO")
        if helo.code != 250:
            raise self.quit(Verdict.DEFERRAL, "Connected to ", " but my name was rejected", helo)
        return None

    def _tls_fail(self, what: str) -> Quit:
        self.usable = False
        self.close(send_quit=not self.tls_active)
        return Quit(Outcome(Verdict.DEFERRAL, f"{what}; connected to {self.ip}.\n"))

    def _starttls(self, ehlo: Reply | None, mode: TlsMode, pem: str) -> Reply | None:
        if ehlo is None or "STARTTLS" not in ehlo_keywords(ehlo):
            if mode is TlsMode.MANDATORY:
                raise self._tls_fail(f"No TLS achieved while {pem} exists")
            return ehlo
        r = self.command("STARTTLS", "the reply to STARTTLS")
        if r.code != 220:
            if mode is TlsMode.MANDATORY:
                raise self._tls_fail(f"STARTTLS rejected while {pem} exists")
            return ehlo  # carry on in clear text with the first EHLO's answer
        # Clear text sent with or after the 220 must never be read as the first reply
        # under TLS (CVE-2021-38371): reply() refused it if it came with the 220; what is
        # already waiting is refused here; what arrives later goes into the handshake,
        # which then fails.
        self.expect_silence()
        self._handshake(mode, pem, implicit=False)
        self.parser = ReplyParser()
        return self._hello()

    def _handshake(self, mode: TlsMode, pem: str, implicit: bool) -> None:
        sni = self.dest.host if ip_literal(self.dest.host) is None else ""
        try:
            conn = self.transport.start_tls(self.tls.context(pem), sni)
        except Dropped as e:
            if mode is TlsMode.OPPORTUNISTIC and not implicit:
                self.close(send_quit=False)
                raise RetryClear(str(e)) from None
            raise self._tls_fail(f"TLS connect failed: {e}") from None
        except SSL.Error as e:  # context problems (unreadable .pem)
            raise self._tls_fail(f"TLS connect failed: {ssl_error_text(e)}") from None
        self.tls_active = True
        if mode is TlsMode.MANDATORY:
            self._verify(conn, pem)

    def _verify(self, conn: SSL.Connection, pem: str) -> None:
        problem = conn.get_app_data()
        if problem is not None:
            raise self._tls_fail(f"TLS unable to verify server with {pem}: {problem}")
        peer = conn.get_peer_certificate()
        if peer is None:
            raise self._tls_fail(f"TLS unable to verify server with {pem}: no certificate provided")
        sans, cns, ips = certificate_names(peer.to_cryptography())
        problem = peer_name_problem(self.dest.host, sans, cns, ips)
        if problem is not None:
            raise self._tls_fail(f"TLS unable to verify server {self.dest.host}: {problem}")

    def _auth_login(self) -> None:
        assert self.dest.user is not None and self.dest.password is not None
        steps = (("AUTH LOGIN", "AUTH LOGIN"),
                 (base64.b64encode(self.dest.user.encode()).decode(), "username"),
                 (base64.b64encode(self.dest.password.encode()).decode(), "password"))
        for i, (line, what) in enumerate(steps):
            r = self.command(line, f"the reply to AUTH LOGIN ({what})")
            if r.code != (235 if i == 2 else 334):
                raise self.quit(Verdict.DEFERRAL, "Connected to ",
                                f" but authentication was rejected ({what})", r)
        self.authed = True

    # ---------------------------------------------------------------- mail
    def transaction(self, sender: str, recipients: list[str], body: BinaryIO,
                    requiretls: bool = False) -> tuple[list[Outcome] | None, Outcome]:
        """One message: per-recipient outcomes (None if RCPT was never reached) and the
        message's.  The body is the stored message (LF line ends, ending in LF).
        ``requiretls``: MAIL FROM carries RFC 8689's REQUIRETLS (the caller has made
        sure the server offers it and the TLS is validated)."""
        size = wire_size(body)
        if self.size_limit and size > self.size_limit:
            return None, too_large(self.ip, size, self.size_limit)  # nothing sent: still usable
        self.usable = False
        rcpts: list[Outcome] | None = None
        critical = False
        try:
            params = f" AUTH=<{sender}>" if self.authed else ""
            if self.size_limit is not None:
                params += f" SIZE={size}"
            if requiretls:
                params += " REQUIRETLS"
            r = self.command(f"MAIL FROM:<{sender}>{params}", "the reply to MAIL")
            if r.code >= 400:
                raise self.quit(_refusal(r.code), "Connected to ", " but sender was rejected", r)
            _final(r, "MAIL")
            rcpts = [self._rcpt(rc) for rc in recipients]
            if not any(x.verdict is Verdict.SUCCESS for x in rcpts):
                raise self.quit(Verdict.FAILURE, "Giving up on ", "", None)
            if "CHUNKING" in self.keywords:
                # RFC 3030: the whole message as one counted chunk (its size is known:
                # wire_size), so nothing is dot-stuffed and no end mark is needed.
                self.expect_silence()
                self.transport.send(f"BDAT {size} LAST\r\n".encode())
                self._blast(body, BdatEncoder())
                stage = "BDAT"
            else:
                r = self.command("DATA", "the reply to DATA")
                if r.code >= 400:
                    raise self.quit(_refusal(r.code), "", " failed on DATA command", r)
                if not 300 <= r.code < 400:
                    raise ProtocolViolation(f"{r.code} reply to DATA", r)
                self.expect_silence()
                self._blast(body)
                stage = "the end of data"
            critical = True  # qmail's flagcritical: the final dot (the chunk) is out
            r = self.reply(f"the reply to {stage}")
            _final(r, stage)
            self.usable = True
            if r.code >= 400:
                return rcpts, Outcome(_refusal(r.code),
                                      f"{self.ip} failed after I sent the message.\n{said(r)}")
            return rcpts, Outcome(Verdict.SUCCESS, f"{self.ip} accepted message.\n{said(r)}")
        except Quit as q:
            return rcpts, q.outcome
        except ProtocolViolation as e:
            self.usable = False
            return rcpts, violation(self.ip, e, critical)
        except Dropped:
            self.usable = False
            return rcpts, dropped(self.ip, critical)

    def _rcpt(self, recipient: str) -> Outcome:
        """qmail-remote's ``r`` (:data:`ACCEPTED`), ``h`` (failure) or ``s`` (deferral)."""
        r = self.command(f"RCPT TO:<{recipient}>", "the reply to RCPT")
        if r.code >= 400:
            return Outcome(_refusal(r.code), f"{self.ip} does not like recipient.\n{said(r)}")
        _final(r, "RCPT")
        return ACCEPTED

    def _blast(self, body: BinaryIO, encoder: DataEncoder | None = None) -> None:
        encoder = encoder or DataEncoder()
        pending = bytearray()
        while chunk := body.read(CHUNK):
            pending += encoder.feed(chunk)
            if len(pending) >= CHUNK:
                self.transport.send(bytes(pending))
                pending.clear()
        self.transport.send(bytes(pending) + encoder.end())

    def rset(self) -> bool:
        """Ready a reused connection for the next transaction."""
        try:
            ok = self.command("RSET", "the reply to RSET").code == 250
        except Dropped:
            ok = False
        self.usable = ok
        return ok

    def close(self, send_quit: bool = True) -> None:
        if send_quit:
            try:
                self.transport.send(b"QUIT\r\n")
            except Dropped:
                pass
        self.usable = False
        self.transport.close()


def _final(r: Reply, stage: str) -> None:
    """A reply where a final answer is due: a 3xx there is a protocol error, never
    "accepted" (1xx and other first digits never get this far: :func:`reply_line`)."""
    if not 200 <= r.code < 300 and not 400 <= r.code < 600:
        raise ProtocolViolation(f"{r.code} reply to {stage}", r)
