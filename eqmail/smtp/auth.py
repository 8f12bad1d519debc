"""The SMTP AUTH exchange of qmail-smtpd-auth 0.59 as built into eQmail 1.09.

Owns: the client side of LOGIN, PLAIN and CRAM-MD5 up to the point where the
credentials are complete (reference/eqmail-features.md §3): prompts (eQmail's clear-text
``334 Username:`` / ``334 Password:``, ``334 `` for PLAIN, the base64 CRAM-MD5
challenge), ``*`` -> canceled, empty line or empty user/password -> malformed, and the
CRAM-MD5 challenge itself (:func:`cram_challenge`).

eqmail is stricter than eQmail (docs/compatibility.md): its base64 decoder skipped
bytes outside the alphabet and stopped at the first ``=``, and a NUL ended a field (C
strings), so ``alice\0junk`` logged in as alice.  Here base64 input must be canonical
(RFC 4648 alphabet, padded to a multiple of four, ``=`` only at the end; a lone ``=`` is
the empty response of RFC 4954), a LOGIN user name or password and a CRAM-MD5 response
must not contain a NUL, and PLAIN must decode to exactly ``authzid NUL user NUL
password``; anything else is ``501 malformed auth input (#5.5.4)``.

Inputs: the mechanism, the optional initial response and then each continuation line
(CR LF already stripped).  Outputs: :class:`Prompt` (send and wait for another line),
:class:`Failed` (send, exchange over) or :class:`Credentials` (hand them to the
checkpassword program).  Checking the password is not done here: the session emits a
CheckPassword action and the I/O layer runs the checker.  Pure, never raises.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from eqmail.smtp import replies
from eqmail.smtp.replies import Reply

MECHANISMS = ("login", "plain", "cram-md5")
_B64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
CHALLENGE_BITS = 63  # two such numbers: 126 random bits per challenge


def b64decode(data: bytes) -> bytes | None:
    """Strict base64 (RFC 4648 §4, padded); None when ``data`` is not exactly that.
    A lone ``=`` is RFC 4954's empty response."""
    if data == b"=":
        return b""
    if not _B64.fullmatch(data):
        return None
    return base64.b64decode(data)


def cram_challenge(host: str, randbits: Callable[[int], int] = secrets.randbits) -> bytes:
    """A fresh CRAM-MD5 challenge in qmail's ``<digits.digits@host>`` shape (eQmail
    used ``<pid.time@host>``: the same for every session of a listener in one second,
    so a response seen once could be replayed).  Both numbers are random."""
    return f"<{randbits(CHALLENGE_BITS)}.{randbits(CHALLENGE_BITS)}@{host}>".encode(
        "utf-8", "surrogateescape")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Prompt:
    reply: Reply


@dataclass(frozen=True)
class Failed:
    reply: Reply


@dataclass(frozen=True)
class Credentials:
    method: str          # "login", "plain" or "cram-md5" (SMTPAUTHMETHOD spelling)
    user: bytes
    password: bytes      # for CRAM-MD5: the hex digest the client sent
    challenge: bytes     # empty for LOGIN and PLAIN


AuthStep = Prompt | Failed | Credentials


class AuthExchange:
    """One AUTH command from its first line to complete credentials or failure."""

    def __init__(self, method: str, challenge: bytes = b"") -> None:
        self.method = method
        self.challenge = challenge
        self._user: bytes | None = None

    def start(self, initial: bytes) -> AuthStep:
        if self.method == "login":
            if initial:
                return self._login_user(initial)
            return Prompt(replies.AUTH_USERNAME)
        if self.method == "plain":
            if initial:
                return self._plain(initial)
            return Prompt(replies.AUTH_EMPTY_CHALLENGE)
        # CRAM-MD5 has no initial response; eQmail ignores anything after the name.
        return Prompt(replies.auth_challenge(b64encode(self.challenge)))

    def line(self, line: bytes) -> AuthStep:
        """One continuation line from the client."""
        if line == b"*":
            return Failed(replies.AUTH_CANCELED)
        if not line:
            return Failed(replies.AUTH_MALFORMED)
        if self.method == "login":
            if self._user is None:
                return self._login_user(line)
            password = b64decode(line)
            if password is None:
                return Failed(replies.AUTH_MALFORMED)
            return self._done(self._user, password)
        if self.method == "plain":
            return self._plain(line)
        return self._cram(line)

    def _login_user(self, data: bytes) -> AuthStep:
        user = b64decode(data)
        if not user or b"\0" in user:
            return Failed(replies.AUTH_MALFORMED)
        self._user = user
        return Prompt(replies.AUTH_PASSWORD)

    def _plain(self, data: bytes) -> AuthStep:
        # authzid NUL user NUL password (RFC 4616); the authzid is ignored, as in eQmail.
        decoded = b64decode(data)
        fields = decoded.split(b"\0") if decoded is not None else []
        if len(fields) != 3:
            return Failed(replies.AUTH_MALFORMED)
        return self._done(fields[1], fields[2])

    def _cram(self, data: bytes) -> AuthStep:
        decoded = b64decode(data)
        if decoded is None:
            return Failed(replies.AUTH_MALFORMED)
        user, _, digest = decoded.partition(b" ")
        return self._done(user, digest)

    def _done(self, user: bytes, password: bytes) -> AuthStep:
        # The checker protocol is NUL-separated: a NUL inside a field could smuggle a
        # password or challenge field, so it is refused, never cut (eQmail cut it).
        if not user or not password or b"\0" in user or b"\0" in password:
            return Failed(replies.AUTH_MALFORMED)
        return Credentials(self.method, user, password, self.challenge)
