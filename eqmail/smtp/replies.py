"""Every SMTP reply eqmail's server side sends, named once.

Owns: the reply texts of qmail-smtpd as eQmail 1.09 sends them (AUTH 0.59, TLS 20151215,
qmail-spp), byte for byte, plus the few replies eqmail adds (line too long, STARTTLS
without a certificate).  Texts are quoted from reference/qmail-core.md §5.1 and
reference/eqmail-features.md §1–§5; keep them exact, clients and tests match on them.

Inputs: nothing; parametrised replies are small functions.  Outputs: :class:`Reply`
values whose :meth:`Reply.wire` gives the bytes to send.  No failure modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from eqmail.srs import Refusal
from eqmail.textio import encode


@dataclass(frozen=True)
class Reply:
    """One SMTP reply.  ``text`` may contain ``\\n``: each piece becomes one line,
    all but the last sent as ``code-text`` (RFC 5321 multi-line form)."""

    code: int
    text: str

    @cached_property
    def _wire(self) -> bytes:
        lines = self.text.split("\n")
        parts = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        parts.append(f"{self.code} {lines[-1]}\r\n")
        return encode("".join(parts))

    def wire(self) -> bytes:
        """The reply as sent: every line ends in CRLF.  Cached, constants are hot."""
        return self._wire


# --- session level -------------------------------------------------------------------

def greeting(smtpgreeting: str) -> Reply:
    return Reply(220, f"{smtpgreeting} ESMTP")


def helo(smtpgreeting: str) -> Reply:
    return Reply(250, smtpgreeting)


def ehlo(smtpgreeting: str, keywords: list[str]) -> Reply:
    """EHLO answer: the greeting line, then one line per extension keyword."""
    return Reply(250, "\n".join([smtpgreeting, *keywords]))


def quit_(smtpgreeting: str) -> Reply:
    return Reply(221, smtpgreeting)


OK = Reply(250, "ok")
FLUSHED = Reply(250, "flushed")
VRFY = Reply(252, "send some mail, i'll try my best")
HELP = Reply(214, "netqmail home page: http://qmail.org/netqmail")
UNRECOGNISED = Reply(500, "unrecognised (#5.5.2)")
UNIMPLEMENTED = Reply(502, "unimplemented (#5.5.1)")
# eqmail: qmail had no command-line limit; DESIGN.md caps it at 12,288 bytes.
LINE_TOO_LONG = Reply(500, "line too long (#5.5.2)")
TIMEOUT = Reply(451, "timeout (#4.4.2)")
OUT_OF_MEMORY = Reply(421, "out of memory (#4.3.0)")
UNABLE_TO_READ_CONTROLS = Reply(421, "unable to read controls (#4.3.0)")
UNABLE_TO_FIGURE_OUT_IPS = Reply(421, "unable to figure out my IP addresses (#4.3.0)")

# --- what one client may take (eqmail, issue 12; Postfix's limits) --------------------

# eqmail: qmail-smtpd took HELO/EHLO without a name.
HELO_SYNTAX = Reply(501, "syntax error, give your host name with HELO/EHLO (#5.5.4)")
TOO_MANY_ERRORS = Reply(421, "too many errors, closing connection (#4.7.0)")
TOO_MANY_JUNK = Reply(421, "too many commands without mail, closing connection (#4.7.0)")
SLOW_LINE = Reply(451, "timeout, command line not completed in time (#4.4.2)")
SLOW_DATA = Reply(451, "timeout, message data arriving too slowly (#4.4.2)")


def too_many_connections(smtpgreeting: str) -> Reply:
    """The listener is at its ``concurrency``: instead of the greeting."""
    return Reply(421, f"{smtpgreeting} too many connections, try again later (#4.3.2)")


def too_many_from_client(smtpgreeting: str) -> Reply:
    """The client's address is at control/concurrencyperclient: instead of the greeting."""
    return Reply(421, f"{smtpgreeting} too many connections from your address, "
                      "try again later (#4.7.0)")

# --- MAIL / RCPT ---------------------------------------------------------------------

SYNTAX_ERROR = Reply(555, "syntax error (#5.5.4)")
MAIL_FIRST = Reply(503, "MAIL first (#5.5.1)")
RCPT_FIRST = Reply(503, "RCPT first (#5.5.1)")
BADMAILFROM = Reply(553, "sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
NO_RCPTHOSTS = Reply(553, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
# eqmail (control/rcptchecklocal): qmail-local's bounce text, given at RCPT, as chkuser does.
NO_MAILBOX = Reply(550, "sorry, no mailbox here by that name (#5.1.1)")
# eqmail (issue 16): a bounce address of forwarded mail (SRS) that does not reverse.
SRS_MALFORMED = Reply(550, "sorry, that SRS address is malformed (#5.1.1)")
SRS_BAD_HASH = Reply(550, "sorry, that SRS address has an invalid signature (#5.1.1)")
SRS_EXPIRED = Reply(550, "sorry, that SRS address has expired (#5.1.1)")


def srs_refused(refusal: Refusal) -> Reply:
    """The RCPT reply for an SRS address at our SRS domain that does not reverse."""
    if refusal is Refusal.EXPIRED:
        return SRS_EXPIRED
    if refusal is Refusal.BAD_HASH:
        return SRS_BAD_HASH
    return SRS_MALFORMED


# eqmail (issue 17, RFC 8689): the REQUIRETLS MAIL parameter.  It is advertised only
# inside TLS; a client that asks for it in clear text is told that TLS is needed
# (RFC 5248's X.7.10 "Encryption Needed", which RFC 8689 uses for REQUIRETLS);
# the parameter takes no value (RFC 8689 §2), a value is a syntax error (RFC 5321 501).
REQUIRETLS_NEEDS_TLS = Reply(530, "REQUIRETLS needs a TLS session, use STARTTLS first (#5.7.10)")
REQUIRETLS_SYNTAX = Reply(501, "syntax error, REQUIRETLS takes no value (#5.5.4)")

# Note the trailing space before CRLF: eQmail (AUTH 0.59) sends it that way.
AUTH_REQUIRED = Reply(530, "Authorization required (#5.7.1) ")
# eqmail: qmail-smtpd accepted RCPT TO:<> (and the message was thrown away), and had
# no recipient limit.
NULL_RCPT = Reply(553, "sorry, the null address can't be a recipient (#5.1.3)")
TOO_MANY_RCPTS = Reply(452, "too many recipients (#4.5.3)")


def no_rcpthosts_tls(reason: str | None) -> Reply:
    """The relay refusal inside TLS, after the client-certificate relay was not granted."""
    tail = f": {reason}" if reason else ""
    return Reply(
        553,
        "sorry, that domain isn't in my list of allowed rcpthosts; "
        f"no valid cert for gatewaying{tail} (#5.7.1)",
    )


# --- DATA ----------------------------------------------------------------------------

GO_AHEAD = Reply(354, "go ahead")
QQT_FAILURE = Reply(451, "qqt failure (#4.3.0)")
BARE_LF = Reply(451, "See http://pobox.com/~djb/docs/smtplf.html.")
TOO_MANY_HOPS = Reply(554, "too many hops, this message is looping (#5.4.6)")
TOO_BIG = Reply(552, "sorry, that message size exceeds my databytes limit (#5.3.4)")


# eqmail (issue 18): CHUNKING (RFC 3030).  A BDAT whose size is not a number cannot be
# framed: 501 and the connection is closed (RFC 3030 §2).  DATA in a transaction that
# used BDAT, and BDAT after a refused one until RSET, get 503 (RFC 3030 §2, §4.2).
BDAT_SYNTAX = Reply(501, "syntax error, BDAT needs a size in octets (#5.5.4)")
BDAT_MIXED = Reply(503, "DATA not allowed in a BDAT transaction (#5.5.1)")
BDAT_FAILED = Reply(503, "BDAT transaction failed, send RSET (#5.5.1)")


def bdat_received(size: int) -> Reply:
    """A chunk of ``size`` octets without LAST was read."""
    return Reply(250, f"{size} octets received")


def accepted(when: int, qp: int) -> Reply:
    return Reply(250, f"ok {when} qp {qp}")


def queue_permanent(text: str) -> Reply:
    """qmail-queue said ``D<text>``."""
    return Reply(554, text)


def queue_temporary(text: str) -> Reply:
    """qmail-queue said ``Z<text>`` (or any other failure)."""
    return Reply(451, text)


def refused(text: str) -> Reply:
    """The listener's own check of the whole message refused it (issue 16)."""
    return Reply(550, text)


def dmarc_rejected(domain: str) -> str:
    """The text of :func:`refused` for a DMARC p=reject failure with control/dmarcreject
    ``reject``: OpenDMARC's, which Postfix admins and senders' bounce parsers know."""
    return f"5.7.1 rejected by DMARC policy for {domain}"


# --- STARTTLS ------------------------------------------------------------------------

TLS_READY = Reply(220, "ready for tls")
STARTTLS_SYNTAX = Reply(501, "Syntax error (no parameters allowed) (#5.5.4)")


def tls_setup_error(what: str, error: str) -> Reply:
    """Before the handshake: ``what`` is e.g. ``missing certificate``."""
    return Reply(454, f"TLS {what}: {error} (#4.3.0)")


def tls_failed(error: str) -> Reply:
    return Reply(454, f"TLS connection failed: {error} (#4.3.0)")


def tls_rehandshake_failed(error: str) -> Reply:
    return Reply(454, f"TLS rehandshake failed: {error} (#4.3.0)")


# eqmail: STARTTLS when no servercert is configured.  eQmail tries anyway and fails with
# this 454 (its OpenSSL text differs); the session stays in clear text either way.
TLS_NO_CERT = tls_setup_error("missing certificate", "no control/servercert.pem")

# --- AUTH ----------------------------------------------------------------------------

AUTH_TLS_REQUIRED = Reply(538, "AUTH PLAIN/LOGIN not available without TLS (#5.3.3)")
AUTH_NOT_AVAILABLE = Reply(503, "auth not available (#5.3.3)")
AUTH_ALREADY = Reply(503, "you're already authenticated (#5.5.0)")
AUTH_IN_TRANSACTION = Reply(503, "no auth during mail transaction (#5.5.0)")
AUTH_UNIMPLEMENTED = Reply(504, "auth type unimplemented (#5.5.1)")
AUTH_CANCELED = Reply(501, "auth exchange canceled (#5.0.0)")
AUTH_MALFORMED = Reply(501, "malformed auth input (#5.5.4)")
AUTH_USERNAME = Reply(334, "Username:")
AUTH_PASSWORD = Reply(334, "Password:")
AUTH_EMPTY_CHALLENGE = Reply(334, "")
AUTH_FAILED = Reply(535, "authentication failed (#5.7.1)")
# eqmail: the session's last failed AUTH (eqmail.smtp.session.MAX_AUTH_FAILURES).
AUTH_TOO_MANY = Reply(421, "too many authentication failures, closing connection (#4.7.0)")
AUTH_CHILD_CRASHED = Reply(454, "oops, problem with child and I can't auth (#4.3.0)")
AUTH_NO_PIPE = Reply(454, "oops, unable to open pipe and I can't auth (#4.3.0)")
AUTH_NO_CHILD = Reply(454, "oops, child won't start and I can't auth (#4.3.0)")
AUTH_WRITE_FAILED = Reply(454, "oops, unable to write pipe and I can't auth (#4.3.0)")


def auth_ok(user: str) -> Reply:
    # The name is the client's own bytes: control characters (CR, LF) would split the
    # reply into injected lines, so they are shown as '?' (eQmail echoed them raw).
    shown = "".join("?" if ch < " " or ch == "\x7f" else ch for ch in user)
    return Reply(235, f"ok, {shown}, go ahead (#2.0.0)")


def auth_challenge(b64: str) -> Reply:
    return Reply(334, b64)


# --- qmail-spp -----------------------------------------------------------------------

def spp_failure(plugin: str, reason: str) -> Reply:
    """``reason``: can't pipe(), vfork() failed, wait_pid() failed, child crashed,
    can't execute (eqmail adds: timeout, bad output)."""
    return Reply(451, f"qmail-spp failure: {plugin}: {reason} (#4.3.0)")
