"""SPF (RFC 7208) on the message's DNS budget: pyspf evaluates, eqmail.auth.dns asks.

Owns: the bridge between pyspf and :class:`eqmail.auth.dns.Budget` and the mapping of
pyspf's outcome to one :class:`SpfResult`.  No SPF record parsing, macro expansion or
mechanism evaluation is written here: pyspf (``spf.query.check``) does all of it,
including RFC 7208's limits (10 DNS-querying terms, 2 void lookups, 10 MX/PTR names).

pyspf's resolver is a module global (``spf.DNSLookup``).  It is replaced once, at
import, by :func:`_dns_lookup`, which asks the :class:`Budget` of the check running in
the current thread or task (a ``contextvars.ContextVar``): concurrent checks in
different threads each use their own budget, and a pyspf call made outside
:func:`check_host` gets ``temperror`` instead of reaching the system resolver.

The identity (RFC 7208 §2.4): the MAIL FROM domain, or for the null sender
``postmaster@<HELO>`` (pyspf's ``ident == "helo"``; Authentication-Results then says
``smtp.helo=``).  A null sender without a HELO name has no identity: ``none``; any
other odd name (an address literal, no dot) is pyspf's to judge, as it always was for
the plugin.

Used by :func:`eqmail.auth.authenticate` and by the qmail-spp plugin plugins/spf, so
the SMTP-time check and the Authentication-Results field never disagree.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import ipaddress
import warnings
from dataclasses import dataclass
from typing import Any

from eqmail.auth.dns import Budget, DnsTempError

with warnings.catch_warnings():  # pyspf 2.0.14 has invalid escapes in docstrings
    warnings.simplefilter("ignore", SyntaxWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import spf  # type: ignore[import-untyped]

ADDRESS_CACHE = 1024  # parsed addresses and networks kept for pyspf (see _Addresses)
_budget: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "eqmail_auth_spf_budget", default=None)


class Spf(enum.StrEnum):
    """The spf= results of RFC 8601 §2.7.2 (RFC 7208 §2.6)."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True)
class SpfResult:
    """One SPF check: the ``result``, which identity was checked (``"mailfrom"`` or
    ``"helo"``), the identity's value as Authentication-Results reports it
    (``smtp.mailfrom`` = the envelope sender, ``smtp.helo`` = the HELO name), its
    ``domain`` (for DMARC alignment), and pyspf's ``explanation`` (the reason, or for
    ``fail`` the domain's exp= text)."""

    result: Spf
    identity: str
    value: str
    domain: str
    explanation: str = ""


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup contract: ``[((name, type), value), ...]``, ``[]`` for
    NXDOMAIN/NODATA, ``spf.TempError`` for the rest."""
    budget = _budget.get()
    if budget is None:
        raise spf.TempError("DNS: no resolver outside eqmail.auth.spfcheck.check_host")
    key = (name, qtype)
    try:
        if qtype in ("A", "AAAA"):
            return [(key, a) for a in budget.addresses(name, qtype)]
        if qtype == "MX":
            return [(key, mx) for mx in budget.mx(name)]
        if qtype == "PTR":
            return [(key, p) for p in budget.ptr(name)]
        if qtype == "TXT":
            return [(key, list(t)) for t in budget.txt(name)]
    except DnsTempError as e:
        raise spf.TempError(f"DNS {e}") from None
    return []  # type SPF (99): obsolete since RFC 7208; nobody publishes only that


spf.DNSLookup = _dns_lookup


class _Addresses:
    """pyspf's ``ipaddress``, with the parses it repeats for every message kept.

    pyspf parses the client's address (query.set_ip) and every ip4:/ip6:/a/mx network
    it compares with it (query.cidrmatch) afresh per check: a fifth of an SPF check's
    CPU for a record such as ``v=spf1 ip4:192.0.2.0/24 -all`` (bench/auth.sh).  The
    objects are immutable, so one parse can serve every check: ``ip_address`` and
    ``ip_network`` are the module's own functions behind a bounded cache (the key is
    the text pyspf passes; an invalid text raises ValueError every time, uncached);
    everything else is the module itself."""

    def __init__(self) -> None:
        self.ip_address = functools.lru_cache(maxsize=ADDRESS_CACHE)(ipaddress.ip_address)
        self.ip_network = functools.lru_cache(maxsize=ADDRESS_CACHE)(ipaddress.ip_network)

    def __getattr__(self, name: str) -> Any:
        return getattr(ipaddress, name)


spf.ipaddress = _Addresses()


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _usable_ip(ip: str) -> bool:
    try:
        spf.ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def check_host(budget: Budget, ip: str, sender: str, helo: str,
               receiver: str = "unknown") -> SpfResult:
    """SPF for the client ``ip``, envelope ``sender`` ("" = null sender) and ``helo``,
    every lookup on ``budget``.  Never raises."""
    identity = "mailfrom" if sender else "helo"
    value = sender if sender else helo
    domain = _domain(sender) if sender else helo.lower().rstrip(".")
    if not _usable_ip(ip):
        return SpfResult(Spf.NONE, identity, value, domain, "no client IP address")
    if not domain:
        return SpfResult(Spf.NONE, identity, value, domain, "no domain to check")
    token = _budget.set(budget)
    try:
        left = max(budget.left(), 0.001)
        q = spf.query(i=ip, s=sender, h=helo, receiver=receiver, timeout=left,
                      querytime=left)
        result, _code, explanation = q.check()
    except Exception as e:  # pyspf on input it did not expect: never our caller's problem
        return SpfResult(Spf.PERMERROR, identity, value, domain,
                         f"unevaluable: {type(e).__name__}")
    finally:
        _budget.reset(token)
    try:
        outcome = Spf(str(result).lower())
    except ValueError:
        outcome = Spf.PERMERROR  # "ambiguous" (only with strict=2, which we do not use)
    return SpfResult(outcome, identity, value, domain, str(explanation))
