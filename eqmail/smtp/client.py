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

Outputs: per recipient ``r`` / ``h<text>`` / ``s<text>`` and one message report
``K``/``Z``/``D`` + text, exactly as qmail-remote prints them (``\\n`` where qmail has
newlines, ``Remote host said: ...`` from the last reply, ``Possible duplicate!`` when
the connection died after the final dot).

Failures: terminal reports travel as :class:`Quit`; :class:`TryNext` = a 4xx greeting
(try the next address silently, eQmail); :class:`RetryClear` = an opportunistic
STARTTLS handshake failed (the caller reconnects to the same address in clear text
once: DESIGN, Postfix's behaviour); a dead, silent or garbled peer is
:class:`Dropped` (eqmail.smtp.transport's).  Hosts with ``tlshosts/<host>.pem`` never
fall back and are verified strictly (subjectAltName DNS names, else CN; no eQmail CN
fallback).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import BinaryIO

from OpenSSL import SSL

from eqmail.smtp.transport import (
    CHUNK,
    Dropped,
    TlsConfig,
    TlsMode,
    Transport,
    certificate_names,
    peer_name_problem,
    ssl_error_text,
)

MAX_TEXT = 5000  # qmail-remote's HUGESMTPTEXT
MAX_LINE = 16384  # one reply line; longer = broken peer
MAX_LINES = 512


class Quit(Exception):
    """A terminal message report (qmail-remote's quit()/temp_*/perm_*)."""

    def __init__(self, report: str) -> None:
        super().__init__(report)
        self.report = report


class TryNext(Exception):
    """A 4xx greeting: close silently and try the next address."""


class RetryClear(Exception):
    """Opportunistic TLS failed its handshake: retry this address without TLS."""


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


class ReplyParser:
    """Bytes from the server -> complete replies.  Pure; no I/O."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lines: list[bytes] = []

    def feed(self, data: bytes) -> list[Reply]:
        self.buf += data
        out: list[Reply] = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE:
                    raise Dropped("reply line too long")
                return out
            line = bytes(self.buf[:nl]).replace(b"\r", b"")
            del self.buf[: nl + 1]
            if len(line) > MAX_LINE:  # the same verdict however the line was split
                raise Dropped("reply line too long")
            if len(line) < 3 or not line[:3].isdigit() or len(self.lines) >= MAX_LINES:
                raise Dropped("malformed reply")
            self.lines.append(line)
            if line[3:4] != b"-":
                out.append(self._reply())

    def _reply(self) -> Reply:
        lines, self.lines = self.lines, []
        text = clean_text(b"".join(ln + b"\n" for ln in lines))[:MAX_TEXT]
        rest = tuple(clean_text(ln[4:]) for ln in lines)
        return Reply(int(lines[-1][:3]), text, rest)


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


def stuff(chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """LF -> CRLF and a leading dot doubled, for one chunk of a streamed message."""
    out = chunk.replace(b"\n.", b"\n..")
    if at_line_start and chunk.startswith(b"."):
        out = b"." + out
    return out.replace(b"\n", b"\r\n"), chunk.endswith(b"\n") if chunk else at_line_start


def rspawn_report(rcpt: str | None, message: str) -> str:
    """qmail-rspawn's merge of one recipient's r/h/s report with the message report."""
    result = {"K": 1, "Z": 0, "D": -1}.get(message[:1], 0)
    if rcpt is None:  # qmail-remote stopped before RCPT: the message report alone
        return ("KZD"[1 - result]) + message[1:]
    orr = {"s": 0, "h": -1}.get(rcpt[:1], result)
    return "KZD"[1 - orr] + rcpt[1:] + (message[1:] if result <= orr else "")


def dropped_text(ip: str, critical: bool) -> str:
    dup = "Possible duplicate! " if critical else ""
    return f"ZConnected to {ip} but connection died. {dup}(#4.4.2)\n"


@dataclass(frozen=True)
class Destination:
    ip: str
    port: int = 25
    host: str = ""  # MX or relay name: TLS file lookup, SNI, name check
    user: str | None = None
    password: str | None = None
    implicit_tls: bool = False  # TLS from the first byte (smtproutes port 465)


@dataclass
class SmtpSession:
    """One SMTP connection.  ``open`` runs the greeting up to AUTH; ``transaction``
    sends one message; ``rset`` readies a reused connection."""

    transport: Transport
    dest: Destination
    helohost: str
    tls: TlsConfig
    parser: ReplyParser = field(default_factory=ReplyParser)
    pending: list[Reply] = field(default_factory=list)
    authed: bool = False
    tls_active: bool = False
    usable: bool = False

    @property
    def ip(self) -> str:
        return self.dest.ip

    def reply(self) -> Reply:
        while not self.pending:
            data = self.transport.recv()
            if not data:
                raise Dropped("connection closed")
            self.pending += self.parser.feed(data)
        return self.pending.pop(0)

    def command(self, line: str) -> Reply:
        self.transport.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self.reply()

    def quit(self, prepend: str, append: str, reply: Reply | None) -> Quit:
        """qmail-remote's quit(): QUIT without waiting, the report with the remote text."""
        try:
            self.transport.send(b"QUIT\r\n")
        except Dropped:
            pass
        self.usable = False
        return Quit(f"{prepend}{self.ip}{append}.\n{said(reply)}")

    # ---------------------------------------------------------------- opening
    def open(self, allow_tls: bool = True) -> None:
        """Greeting, EHLO/HELO, TLS as the policy says, AUTH LOGIN with credentials."""
        mode, pem = self.tls.mode_for(self.dest.host)
        if self.dest.implicit_tls:
            self._handshake(mode, pem, implicit=True)
        greeting = self.reply()
        if self.dest.implicit_tls and greeting.code != 220:
            raise self.quit("ZTLS Connected to ", " but greeting failed", greeting)
        if 500 <= greeting.code < 600:
            raise self.quit("DConnected to ", " but greeting failed", greeting)
        if 400 <= greeting.code < 500:
            self.close(send_quit=False)
            raise TryNext()
        if greeting.code != 220:
            raise self.quit("ZConnected to ", " but greeting failed", greeting)
        ehlo = self._hello()
        if not self.tls_active and mode is not TlsMode.OFF and allow_tls:
            ehlo = self._starttls(ehlo, mode, pem)
        if self.dest.user is not None and self.dest.password is not None and ehlo is not None:
            if auth_login_offered(ehlo):
                self._auth_login()
        self.usable = True

    def _hello(self) -> Reply | None:
        """EHLO, else HELO (qmail-core §4.3); the EHLO reply, or None after HELO."""
        ehlo = self.command(f"EHLO {self.helohost}")
        if ehlo.code == 250:
            return ehlo
        helo = self.command(f"HELO {self.helohost}")
        if helo.code != 250:
            raise self.quit("ZConnected to ", " but my name was rejected", helo)
        return None

    def _tls_fail(self, what: str) -> Quit:
        self.usable = False
        self.close(send_quit=not self.tls_active)
        return Quit(f"Z{what}; connected to {self.ip}.\n")

    def _starttls(self, ehlo: Reply | None, mode: TlsMode, pem: str) -> Reply | None:
        if ehlo is None or "STARTTLS" not in ehlo_keywords(ehlo):
            if mode is TlsMode.MANDATORY:
                raise self._tls_fail(f"No TLS achieved while {pem} exists")
            return ehlo
        r = self.command("STARTTLS")
        if r.code != 220:
            if mode is TlsMode.MANDATORY:
                raise self._tls_fail(f"STARTTLS rejected while {pem} exists")
            return ehlo  # carry on in clear text with the first EHLO's answer
        self._handshake(mode, pem, implicit=False)
        return self._hello()

    def _handshake(self, mode: TlsMode, pem: str, implicit: bool) -> None:
        try:
            conn = self.transport.start_tls(self.tls.context(pem), self.dest.host)
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
        sans, cns = certificate_names(peer.to_cryptography())
        problem = peer_name_problem(self.dest.host, sans, cns)
        if problem is not None:
            raise self._tls_fail(f"TLS unable to verify server {self.dest.host}: {problem}")

    def _auth_login(self) -> None:
        assert self.dest.user is not None and self.dest.password is not None
        steps = (("AUTH LOGIN", "AUTH LOGIN"),
                 (base64.b64encode(self.dest.user.encode()).decode(), "username"),
                 (base64.b64encode(self.dest.password.encode()).decode(), "password"))
        for i, (line, what) in enumerate(steps):
            r = self.command(line)
            if r.code != (235 if i == 2 else 334):
                raise self.quit("ZConnected to ", f" but authentication was rejected ({what})", r)
        self.authed = True

    # ---------------------------------------------------------------- mail
    def transaction(self, sender: str, recipients: list[str],
                    body: BinaryIO) -> tuple[list[str] | None, str]:
        """One message: per-recipient reports (None if RCPT was never reached) and the
        message report.  The body is the stored message (LF line ends, ending in LF)."""
        self.usable = False
        rcpts: list[str] | None = None
        critical = False
        try:
            auth = f" AUTH=<{sender}>" if self.authed else ""
            r = self.command(f"MAIL FROM:<{sender}>{auth}")
            if r.code >= 500:
                raise self.quit("DConnected to ", " but sender was rejected", r)
            if r.code >= 400:
                raise self.quit("ZConnected to ", " but sender was rejected", r)
            rcpts = [self._rcpt(rc) for rc in recipients]
            if not any(x == "r" for x in rcpts):
                raise self.quit("DGiving up on ", "", None)
            r = self.command("DATA")
            if r.code >= 400:
                raise self.quit("D" if r.code >= 500 else "Z", " failed on DATA command", r)
            self._blast(body)
            critical = True  # qmail's flagcritical: the final dot is out
            r = self.reply()
            self.usable = True
            if r.code >= 500:
                return rcpts, f"D{self.ip} failed after I sent the message.\n{said(r)}"
            if r.code >= 400:
                return rcpts, f"Z{self.ip} failed after I sent the message.\n{said(r)}"
            return rcpts, f"K{self.ip} accepted message.\n{said(r)}"
        except Quit as q:
            return rcpts, q.report
        except Dropped:
            self.usable = False
            return rcpts, dropped_text(self.ip, critical)

    def _rcpt(self, recipient: str) -> str:
        r = self.command(f"RCPT TO:<{recipient}>")
        if r.code >= 400:
            return f"{'h' if r.code >= 500 else 's'}{self.ip} does not like recipient.\n{said(r)}"
        return "r"

    def _blast(self, body: BinaryIO) -> None:
        at_start = True
        pending = bytearray()
        while True:
            chunk = body.read(CHUNK)
            if not chunk:
                break
            data, at_start = stuff(chunk, at_start)
            pending += data
            if len(pending) >= CHUNK:
                self.transport.send(bytes(pending))
                pending.clear()
        self.transport.send(bytes(pending) + b".\r\n")

    def rset(self) -> bool:
        """Ready a reused connection for the next transaction."""
        try:
            ok = self.command("RSET").code == 250
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
