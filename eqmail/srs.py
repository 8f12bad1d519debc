"""The Sender Rewriting Scheme (SRS) for forwarded mail, pure.

Owns the address format of Shevek's SRS paper as libsrs2 (and so postsrsd) writes it
— the "guarded" scheme:

    SRS0=HHHH=TT=orig.domain=orig.user@srs.domain         (first forwarder)
    SRS1=HHHH=first.forwarder==HHHH=TT=orig.domain=orig.user@srs.domain

``HHHH`` is the first 4 characters of base64(HMAC-SHA1(secret, lowercased data)),
``TT`` the day number modulo 1024 in two base32 characters.  An SRS0 sender that
eqmail forwards again becomes SRS1 (bounces go back to the first forwarder, whose hash
only it can check); an SRS1 sender keeps its first forwarder and gets our hash.
Reversing checks the hash against every secret (rotation: the first secret signs, all
verify), case-insensitively as libsrs2 does (some MTAs smash the case of local parts),
and the time stamp against ``max_age`` days (21, libsrs2's and postsrsd's default).

Why not a PyPI library: srslib accepts a hash of any length (a one-character hash is a
1-in-38 forgery) and compares in variable time; pysrs calls base64.encodestring, gone
since Python 3.9 (docs/design-notes.md).  Addresses written here are byte-compatible
with libsrs2/postsrsd given the same secret and domain, so an admin moving from
Postfix + postsrsd can copy the secret file and outstanding bounces still reverse.

Inputs: addresses as ``str`` (surrogate-escaped bytes, eqmail.textio), secrets as
bytes, the time.  Outputs: the rewritten address, or a :class:`Refusal` saying why an
address does not reverse.  No I/O, no failure modes beyond the refusals.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import time
from dataclasses import dataclass, field

HASH_LENGTH = 4     # libsrs2's default; postsrsd's too
HASH_MIN = 4        # a shorter hash in an address never verifies (libsrs2's hashmin)
MAX_AGE_DAYS = 21   # libsrs2's default maxage
SECRET_MIN = 16     # characters; control/srssecrets refuses shorter secrets
DAY = 86400
TIME_SLOTS = 1024   # the stamp is the day number modulo this (two base32 characters)
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SEPARATORS = "=+-"  # what may follow the SRS0/SRS1 tag (libsrs2's srs_is_separator)


class Refusal(enum.Enum):
    """Why an address does not reverse; the value is the text a reply or bounce shows."""

    NOT_SRS = "not an SRS address"
    MALFORMED = "malformed SRS address"
    BAD_HASH = "SRS address with an invalid signature"
    EXPIRED = "SRS address too old"


@dataclass(frozen=True)
class SrsKeys:
    """What forwarding and reversing need: the secrets (the first signs) and our SRS
    domain.  ``secrets`` is left out of repr so that no log line or traceback shows it."""

    secrets: tuple[bytes, ...] = field(repr=False)
    domain: str
    max_age: int = MAX_AGE_DAYS

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ValueError("SRS needs at least one secret")

    def ours(self, address: str) -> bool:
        """Whether ``address`` is an SRS address at our SRS domain (only those are
        reversed; an SRS-looking address elsewhere is an ordinary address)."""
        local, at, domain = address.rpartition("@")
        return bool(at) and domain.lower() == self.domain.lower() and is_srs_local(local)


def is_srs_local(local: str) -> bool:
    """An SRS0 or SRS1 tag (any case) and a separator start the local part."""
    return len(local) > 4 and local[:4].upper() in ("SRS0", "SRS1") and local[4] in _SEPARATORS


def _hash(secret: bytes, *data: str) -> str:
    mac = hmac.new(secret, digestmod=hashlib.sha1)
    for piece in data:
        # libsrs2 lowercases the hashed data (ASCII only: tolower() in the C locale)
        mac.update(piece.encode("utf-8", "surrogateescape").lower())
    return base64.b64encode(mac.digest()).decode("ascii")


def _stamp(now: float) -> str:
    day = int(now // DAY) % TIME_SLOTS
    return _BASE32[day >> 5] + _BASE32[day & 31]


def _stamp_ok(stamp: str, now: float, max_age: int) -> bool:
    if len(stamp) != 2 or any(ch not in _BASE32 for ch in stamp.upper()):
        return False
    then = (_BASE32.index(stamp[0].upper()) << 5) | _BASE32.index(stamp[1].upper())
    today = int(now // DAY) % TIME_SLOTS
    if then > today:
        today += TIME_SLOTS  # the day number wrapped since the stamp was made
    return today - then <= max_age


def _hash_ok(keys: SrsKeys, given: str, *data: str) -> bool:
    if len(given) < HASH_MIN:
        return False
    given_b = given.lower().encode("utf-8", "surrogateescape")
    ok = False
    for secret in keys.secrets:
        want = _hash(secret, *data)[: len(given)].lower().encode("ascii")
        # every secret is tried, in constant time each, so timing says nothing of which
        ok |= hmac.compare_digest(given_b, want)
    return ok


def forward(sender: str, keys: SrsKeys, now: float | None = None) -> str:
    """The SRS address for ``sender`` (``user@domain``) at our SRS domain: SRS0, or
    SRS1 when the sender is already an SRS address.  A sender without ``@`` or with an
    empty part is returned unchanged (nothing to rewrite, as libsrs2 refuses it)."""
    user, at, domain = sender.rpartition("@")
    if not at or not user or not domain:
        return sender
    tag = user[:4].upper()
    if is_srs_local(user) and tag == "SRS1":
        parts = user[5:].split("=", 2)
        if len(parts) == 3 and parts[1]:
            _, first_hop, opaque = parts  # a new hash over the same first hop
            return (f"SRS1={_hash(keys.secrets[0], first_hop, opaque)[:HASH_LENGTH]}"
                    f"={first_hop}={opaque}@{keys.domain}")
    elif is_srs_local(user):
        opaque = user[4:]  # with its separator: reversal gives back "SRS0" + opaque
        return (f"SRS1={_hash(keys.secrets[0], domain, opaque)[:HASH_LENGTH]}"
                f"={domain}={opaque}@{keys.domain}")
    stamp = _stamp(time.time() if now is None else now)
    digest = _hash(keys.secrets[0], stamp, domain, user)[:HASH_LENGTH]
    return f"SRS0={digest}={stamp}={domain}={user}@{keys.domain}"


def reverse(address: str, keys: SrsKeys, now: float | None = None) -> str | Refusal:
    """The address an SRS address at our domain stands for, or why it does not
    reverse.  SRS0 gives the original sender, SRS1 the first forwarder's SRS0 address.
    The domain is not checked here (see :meth:`SrsKeys.ours`)."""
    local, at, _domain = address.rpartition("@")
    if not at or not is_srs_local(local):
        return Refusal.NOT_SRS
    if local[:4].upper() == "SRS1":
        parts = local[5:].split("=", 2)
        if len(parts) != 3 or not all(parts):
            return Refusal.MALFORMED
        digest, first_hop, opaque = parts
        if not _hash_ok(keys, digest, first_hop, opaque):
            return Refusal.BAD_HASH
        return f"SRS0{opaque}@{first_hop}"
    parts = local[5:].split("=", 3)
    if len(parts) != 4 or not all(parts):
        return Refusal.MALFORMED
    digest, stamp, domain, user = parts
    if not _hash_ok(keys, digest, stamp, domain, user):
        return Refusal.BAD_HASH
    if not _stamp_ok(stamp, time.time() if now is None else now, keys.max_age):
        return Refusal.EXPIRED
    return f"{user}@{domain}"


def check(address: str, keys: SrsKeys | None, now: float | None = None) -> Refusal | None:
    """For the RCPT check and the scanner: None when ``address`` is not an SRS address
    at our SRS domain (or SRS is off) or reverses; else why it does not."""
    if keys is None or not keys.ours(address):
        return None
    result = reverse(address, keys, now)
    return result if isinstance(result, Refusal) else None


# What a bounce of a locally injected message to a refused SRS address says (qmail's
# style: a sentence and the enhanced status code); the SMTP replies are in
# eqmail.smtp.replies.
_BOUNCE_TEXTS = {
    Refusal.NOT_SRS: "Sorry, that is not an SRS address. (#5.1.1)",
    Refusal.MALFORMED: "Sorry, this SRS address is malformed. (#5.1.1)",
    Refusal.BAD_HASH: ("Sorry, this SRS address has an invalid signature: it was not made "
                       "here, or it was altered. (#5.1.1)"),
    Refusal.EXPIRED: (f"Sorry, this SRS address is more than {MAX_AGE_DAYS} days old; "
                      "bounces to it are no longer accepted. (#5.1.1)"),
}


def bounce_text(refusal: Refusal) -> str:
    return _BOUNCE_TEXTS[refusal] + "\n"
