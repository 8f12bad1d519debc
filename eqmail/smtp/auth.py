"""The SMTP AUTH exchange of qmail-smtpd-auth 0.59 as built into eQmail 1.09.

Owns: the client side of LOGIN, PLAIN and CRAM-MD5 up to the point where the
credentials are complete (reference/eqmail-features.md §3): prompts (eQmail's clear-text
``334 Username:`` / ``334 Password:``, ``334 `` for PLAIN, the base64 CRAM-MD5
challenge), ``*`` -> canceled, empty line or empty user/password -> malformed, and the
lenient base64 decoder (bytes outside the alphabet are skipped, never an error).

Inputs: the mechanism, the optional initial response and then each continuation line
(CR LF already stripped).  Outputs: :class:`Prompt` (send and wait for another line),
:class:`Failed` (send, exchange over) or :class:`Credentials` (hand them to the
checkpassword program).  Checking the password is not done here: the session emits a
CheckPassword action and the I/O layer runs the checker.  Pure, never raises.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from eqmail.smtp import replies
from eqmail.smtp.replies import Reply

MECHANISMS = ("login", "plain", "cram-md5")
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def lenient_b64decode(data: bytes) -> bytes:
    """Decode base64 the way the AUTH patch does: skip junk, stop at ``=``, decode
    whatever full bytes the remaining characters carry."""
    pad = data.find(b"=")
    if pad >= 0:
        data = data[:pad]
    clean = bytes(b for b in data if b in _B64_ALPHABET)
    usable = len(clean) - (len(clean) % 4 == 1)  # a lone 6-bit tail carries no byte
    clean = clean[:usable]
    return base64.b64decode(clean + b"=" * (-len(clean) % 4))


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
            return self._done(self._user, lenient_b64decode(line))
        if self.method == "plain":
            return self._plain(line)
        return self._cram(line)

    def _login_user(self, data: bytes) -> AuthStep:
        user = lenient_b64decode(data)
        if not user:
            return Failed(replies.AUTH_MALFORMED)
        self._user = user
        return Prompt(replies.AUTH_PASSWORD)

    def _plain(self, data: bytes) -> AuthStep:
        # authzid NUL user NUL password; the authzid is ignored, as in eQmail.
        fields = lenient_b64decode(data).split(b"\0")
        user = fields[1] if len(fields) > 1 else b""
        password = fields[2] if len(fields) > 2 else b""
        return self._done(user, password)

    def _cram(self, data: bytes) -> AuthStep:
        user, _, digest = lenient_b64decode(data).partition(b" ")
        return self._done(user, digest)

    def _done(self, user: bytes, password: bytes) -> AuthStep:
        # The checker protocol is NUL-separated and eQmail uses C strings: a NUL ends
        # the field, so a user name can never smuggle a password or challenge field.
        user = user.split(b"\0", 1)[0]
        password = password.split(b"\0", 1)[0]
        if not user or not password:
            return Failed(replies.AUTH_MALFORMED)
        return Credentials(self.method, user, password, self.challenge)
