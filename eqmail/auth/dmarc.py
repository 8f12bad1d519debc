"""DMARC (RFC 7489): the From: domain, policy discovery, alignment, the disposition.

Owns: the RFC5322.From rule (§6.6.1), the record syntax (§6.3/§6.4), policy discovery
at the From domain then at its organizational domain (§6.6.3; the organizational
domain from the public suffix list shipped in the ``publicsuffixlist`` package, never
fetched at run time), identifier alignment (§3.1, relaxed or strict), the result and
the disposition the domain asks for (§6.6.4 with ``pct``).  Pure apart from the TXT
lookups on the message's :class:`eqmail.auth.dns.Budget`.

Choices where the RFC leaves room (docs/design-notes.md):

- From: a message without a From field, or whose From has no parsable address with a
  domain, is ``permerror`` with disposition ``none`` (§6.6.1: such a message "is
  typically rejected" by other means; DMARC cannot name a domain to ask).  Several
  From fields or addresses naming one domain are evaluated for that domain; naming
  several domains, each is evaluated (at most :data:`MAX_DOMAINS`) and the result is
  the worst, the disposition the strictest — so that a second address cannot wash out
  a ``p=reject``.
- The SPF identity for alignment is the one SPF checked: the MAIL FROM domain, or for
  the null sender the HELO name (RFC 7208 §2.4 defines MAIL FROM as postmaster@HELO
  then; OpenDMARC does the same).
- A message that does not align while an SPF or DKIM check was ``temperror`` is
  ``temperror`` (disposition ``none``): a DNS hiccup must never reject mail.
- ``pct``: a message is "selected" when the first 8 bytes of SHA-256 over the message,
  as an integer modulo 100, are below pct: deterministic, so the same message always
  gets the same treatment and a test can pin it.  Not selected: §6.6.4's next lesser
  policy (reject -> quarantine, quarantine -> none).
- A record with an invalid ``p`` (or ``sp``) is used as ``p=none`` when it has a rua=
  tag, else ignored (§6.6.3 step 6).  ``np`` (RFC 9091) is not evaluated: it needs an
  existence test of the From domain that NXDOMAIN-vs-NODATA answers would have to carry.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import hashlib
import re
from dataclasses import dataclass

import idna
from publicsuffixlist import PublicSuffixList

from eqmail.auth.dns import Budget, DnsTempError
from eqmail.auth.message import header_fields
from eqmail.auth.spfcheck import Spf, SpfResult
from eqmail.dkim.verify import DkimResult
from eqmail.dkim.verify import Result as DkimOutcome

MAX_DOMAINS = 4
MAX_RECORD = 2048
FROM_CACHE = 1024          # From values whose domains are kept (see _value_domains)
FROM_CACHE_VALUE = 1024    # bytes: a longer value is parsed every time
ORG_CACHE = 4096           # names whose organizational domain is kept
RECORD_CACHE = 1024        # parsed policy records kept (keyed on the record's bytes)
_PSL = PublicSuffixList()
_DOMAIN = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}")


class Dmarc(enum.StrEnum):
    """The dmarc= results of RFC 7489 §11.2."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class DmarcDisposition(enum.StrEnum):
    """What the domain's policy asks a receiver to do with this message."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


_LESSER = {DmarcDisposition.REJECT: DmarcDisposition.QUARANTINE,
           DmarcDisposition.QUARANTINE: DmarcDisposition.NONE,
           DmarcDisposition.NONE: DmarcDisposition.NONE}
_ORDER = [DmarcDisposition.NONE, DmarcDisposition.QUARANTINE, DmarcDisposition.REJECT]
_WORST = [Dmarc.FAIL, Dmarc.TEMPERROR, Dmarc.PERMERROR, Dmarc.NONE, Dmarc.PASS]


@dataclass(frozen=True)
class DmarcRecord:
    """A parsed policy record and where it was found (``org``: at the organizational
    domain, not the From domain)."""

    p: DmarcDisposition
    sp: DmarcDisposition
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    domain: str = ""
    org: bool = False


@dataclass(frozen=True)
class DmarcResult:
    """The evaluation: ``result``, the From domain, the record used (None: none found),
    the ``policy`` that applies to the From domain (p, or sp at a subdomain),
    ``disposition`` (after pct; ``none`` unless the result is ``fail``), a ``reason``."""

    result: Dmarc
    from_domain: str | None = None
    record: DmarcRecord | None = None
    policy: DmarcDisposition | None = None
    disposition: DmarcDisposition = DmarcDisposition.NONE
    reason: str = ""


@functools.lru_cache(maxsize=ORG_CACHE)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2 on the public suffix list: the registered domain, or the domain
    itself when it is a public suffix (or unknown to the list).  Kept per name: the
    list is fixed for the process's life, and alignment asks it twice per message."""
    return _PSL.privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (§3.1): strict = the same name, relaxed = the same
    organizational domain."""
    identifier = identifier.lower().rstrip(".")
    if not identifier:
        return False
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def _domain_of(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return None
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    return domain if len(domain) <= 253 and _DOMAIN.fullmatch(domain) else None


def from_domains(message: bytes, fields: list[tuple[str, bytes]] | None = None
                 ) -> tuple[list[str], str]:
    """The distinct domains of the From: addresses in order, or ``([], why)``.
    ``fields``: ``header_fields(message)`` when the caller has them already."""
    if fields is None:
        fields = header_fields(message)
    values = [v for name, v in fields if name == "from"]
    if not values:
        return [], "no From field"
    domains: list[str] = []
    for raw in values:
        found = _value_domains(raw) if len(raw) <= FROM_CACHE_VALUE else _parse_from(raw)
        if isinstance(found, str):
            return [], found
        domains += [d for d in found if d not in domains]
    why = f"{len(values)} From fields" if len(values) > 1 else ""
    return domains, why


def _parse_from(raw: bytes) -> tuple[str, ...] | str:
    """The domains of one From value's addresses in order (repeats kept), or why not."""
    text = raw.decode("utf-8", "replace")
    addresses = [a for _, a in email.utils.getaddresses([text]) if a]
    if not addresses:
        return "From has no address"
    domains = []
    for address in addresses:
        domain = _domain_of(address)
        if domain is None:
            return "From address has no valid domain"
        domains.append(domain)
    return tuple(domains)


# email.utils.getaddresses is slow and mail from one sender repeats its From value
# byte for byte: the outcome is kept per value (short ones only; the key is the bytes)
_value_domains = functools.lru_cache(maxsize=FROM_CACHE)(_parse_from)


def _disposition(text: str) -> DmarcDisposition | None:
    try:
        return DmarcDisposition(text.lower())
    except ValueError:
        return None


def parse_record(text: bytes, domain: str = "", org: bool = False) -> DmarcRecord | None:
    """A DMARC record, or None when it is not one or is unusable (see the module doc)."""
    if len(text) > MAX_RECORD:
        return None
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for n, part in enumerate(p.strip() for p in decoded.split(";")):
        name, eq, val = part.partition("=")
        name, val = name.strip().lower(), val.strip()
        if n == 0 and (name != "v" or val != "DMARC1"):
            return None
        if eq and name not in tags:
            tags[name] = val
    p = _disposition(tags.get("p", ""))
    sp = _disposition(tags["sp"]) if "sp" in tags else p
    if p is None or sp is None:
        if "rua" not in tags:
            return None
        p = sp = DmarcDisposition.NONE
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcRecord(p, sp, pct, adkim, aspf, domain, org)


# a domain's record is the same bytes for every message from it (DmarcRecord is frozen)
_record = functools.lru_cache(maxsize=RECORD_CACHE)(parse_record)


def _fetch(budget: Budget, domain: str, org: bool) -> DmarcRecord | None:
    """The record at ``_dmarc.<domain>``; None when there is no single one (§6.6.3:
    records not starting with v=DMARC1 are discarded; several left = no policy)."""
    texts = [b"".join(t) for t in budget.txt(f"_dmarc.{domain}")]
    candidates = [t for t in texts if re.match(rb"\s*v\s*=\s*DMARC1\s*(;|$)", t)]
    if len(candidates) != 1:
        return None
    return _record(candidates[0], domain, org)


def discover(budget: Budget, from_domain: str) -> DmarcRecord | None:
    """Policy discovery (§6.6.3); raises DnsTempError."""
    record = _fetch(budget, from_domain, False)
    if record is not None:
        return record
    org = organizational_domain(from_domain)
    if org == from_domain:
        return None
    return _fetch(budget, org, True)


def selected(message: bytes, pct: int) -> bool:
    """Whether this message falls in the pct= sample (see the module doc)."""
    if pct >= 100:
        return True
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "big") % 100 < pct


def _one(message: bytes, budget: Budget, domain: str, spf: SpfResult,
         dkim: list[DkimResult] | tuple[DkimResult, ...]) -> DmarcResult:
    try:
        record = discover(budget, domain)
    except DnsTempError as e:
        return DmarcResult(Dmarc.TEMPERROR, domain, reason=f"policy lookup: {e}")
    if record is None:
        return DmarcResult(Dmarc.NONE, domain, reason="no policy")
    policy = record.sp if record.org else record.p
    if spf.result is Spf.PASS and aligned(spf.domain, domain, record.aspf):
        return DmarcResult(Dmarc.PASS, domain, record, policy, reason="SPF aligned")
    for r in dkim:
        if r.result is DkimOutcome.PASS and aligned(r.domain, domain, record.adkim):
            return DmarcResult(Dmarc.PASS, domain, record, policy,
                               reason=f"DKIM aligned (d={r.domain})")
    if spf.result is Spf.TEMPERROR or any(r.result is DkimOutcome.TEMPERROR for r in dkim):
        return DmarcResult(Dmarc.TEMPERROR, domain, record, policy,
                           reason="not aligned while SPF or DKIM had a temporary error")
    chosen = policy if selected(message, record.pct) else _LESSER[policy]
    return DmarcResult(Dmarc.FAIL, domain, record, policy, chosen, "neither SPF nor DKIM aligned")


def evaluate(message: bytes, budget: Budget, spf: SpfResult,
             dkim: list[DkimResult] | tuple[DkimResult, ...],
             fields: list[tuple[str, bytes]] | None = None) -> DmarcResult:
    """The DMARC result of ``message`` given its SPF and DKIM results (``fields``: its
    ``header_fields``, when the caller has them)."""
    domains, why = from_domains(message, fields)
    if not domains:
        return DmarcResult(Dmarc.PERMERROR, None, reason=why)
    results = [_one(message, budget, d, spf, dkim) for d in domains[:MAX_DOMAINS]]
    worst = min(results, key=lambda r: _WORST.index(r.result))
    strictest = max((r.disposition for r in results), key=_ORDER.index)
    notes = [n for n in (why, f"From names {len(domains)} domains" if len(domains) > 1 else "")
             if n]
    reason = "; ".join([worst.reason, *notes]) if notes else worst.reason
    return DmarcResult(worst.result, worst.from_domain, worst.record, worst.policy,
                       strictest, reason)
