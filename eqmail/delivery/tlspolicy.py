"""The values of outbound TLS policy (issue 17): what a domain asks of the TLS to its MX
hosts, and what one session to one of them found.

Owns: the vocabulary every part of outbound TLS policy shares — which policy applied to
a delivery (:class:`PolicyKind`: a tlshosts/ pin, DANE, MTA-STS enforce or testing,
opportunistic TLS, none), a DANE TLSA record (:class:`Tlsa`), an MTA-STS policy
(:class:`StsPolicy`, with RFC 8461 §4.1's MX pattern match) and the answer of a policy
lookup (:class:`StsLookup`), RFC 8460's result types (:class:`ResultType`) and one
session's record for TLS-RPT and for ``eqmailctl`` (:class:`SessionResult`), plus the
texts of REQUIRETLS refusals.  Pure values and pure functions; no I/O.

Who uses it: remote delivery (eqmail.delivery.remote, eqmailr) decides a domain's
policy and enforces it per MX host; the MTA-STS policy worker answers
:class:`StsLookup`s; eqmail.delivery.tlsrpt stores :class:`SessionResult`s and makes
RFC 8460 reports of them; the queue carries REQUIRETLS to remote delivery as the
delivery option ``("requiretls", "1")``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from eqmail.dns import Tlsa
from eqmail.ipc.delivery import Outcome, Verdict

__all__ = ["Tlsa"]  # defined with the DNS code (a foundation module), used from here


class PolicyKind(enum.StrEnum):
    """The TLS policy that applied to a delivery attempt, as logs and eqmailctl name it.
    Precedence (issue 17 item 5, RFC 8461 §2): a tlshosts/ pin, then DANE, then
    MTA-STS, then opportunistic TLS (or none, for notlshosts/ and an exhaustive
    tlshosts/)."""

    PIN = "tlshosts pin"
    DANE = "dane"
    STS_ENFORCE = "mta-sts enforce"
    STS_TESTING = "mta-sts testing"
    OPPORTUNISTIC = "opportunistic"
    NONE = "no tls"

    @property
    def validated(self) -> bool:
        """Whether this policy authenticates the server (RFC 8689 §4.2.1: what a
        REQUIRETLS message may be relayed under)."""
        return self in (PolicyKind.PIN, PolicyKind.DANE, PolicyKind.STS_ENFORCE)


class StsMode(enum.StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class StsPolicy:
    """An MTA-STS policy (RFC 8461 §3.2) as fetched and validated.  ``text``: the policy
    body (for TLS-RPT's policy-string); ``id``: the TXT record's id it was fetched
    under; ``fetched``: when (Unix time), so ``fetched + max_age`` is its expiry."""

    mode: StsMode
    mx: tuple[str, ...]
    max_age: int
    id: str
    text: str
    fetched: float

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: the MX host name matches one of the ``mx`` patterns — exactly,
        or a ``*.`` pattern matching exactly one leftmost label; case-insensitive,
        trailing dots ignored."""
        h = host.lower().rstrip(".")
        for p in self.mx:
            p = p.lower().rstrip(".")
            if p.startswith("*."):
                if "." in h and h.split(".", 1)[1] == p[2:]:
                    return True
            elif p == h:
                return True
        return False

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age


@dataclass(frozen=True)
class StsLookup:
    """What remote delivery learns of a domain's MTA-STS: ``policy`` (None: the domain
    has none that applies) and, when a TXT record says there is one but no usable
    policy could be had, ``failure`` (sts-policy-fetch-error, sts-policy-invalid or
    sts-webpki-invalid) with ``detail`` — recorded for TLS-RPT, delivery goes on as
    without a policy (RFC 8461 §5)."""

    policy: StsPolicy | None
    failure: ResultType | None = None
    detail: str = ""


class StsSource(Protocol):
    """Where remote delivery gets a domain's MTA-STS policy (the policy worker's
    client, eqmail.delivery.stsclient): answers within its own time bound, never
    raises for a domain's problems (they are a :class:`StsLookup`'s failure)."""

    def lookup(self, domain: str) -> StsLookup: ...


class ResultType(enum.StrEnum):
    """RFC 8460 §4.3's result-type values."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


@dataclass(frozen=True)
class SessionResult:
    """One attempt at one MX host of a domain under a policy: what TLS-RPT counts and
    what ``eqmailctl queue show``/``status`` name for deferred deliveries.

    ``result`` None = the TLS session was established as the policy asks (a success
    in RFC 8460's terms); otherwise the failure's result type, ``detail`` saying more
    (the certificate name received, the handshake error).  ``policy_strings``: the
    STS policy's lines or the TLSA records' presentation forms; ``mx_patterns``: the
    STS policy's mx values.  ``matched``: which certificate or TLSA record matched
    (for the log).  ``sending_ip``/``receiving_ip``: the two ends (receiving "" when
    no connection was made)."""

    when: float
    domain: str
    policy: PolicyKind
    mx_host: str
    receiving_ip: str
    sending_ip: str
    result: ResultType | None
    detail: str = ""
    matched: str = ""
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()


# RFC 8689 §4.2.1 / §5: a REQUIRETLS message that cannot be relayed as it demands.
PERM_REQUIRETLS_NOPOLICY = Outcome(
    Verdict.FAILURE,
    "REQUIRETLS: no validated TLS to this domain is possible (no DANE, MTA-STS "
    "enforce or tlshosts pin for it). (#5.7.10)\n")


def perm_requiretls_unoffered(ip: str) -> Outcome:
    """The next hop does not offer REQUIRETLS (RFC 8689 §4.2.1 step 4)."""
    return Outcome(Verdict.FAILURE,
                   f"Connected to {ip} but it does not offer REQUIRETLS, which the sender "
                   "demanded. (#5.7.10)\n")
