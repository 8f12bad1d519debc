"""The one DNS path of inbound authentication: SPF, DKIM, DMARC and ARC all ask here.

Owns: the :class:`Lookups` interface (what the checks may ask: TXT, A, AAAA, MX, PTR),
the real one on dnspython (:func:`make_lookups`, through :class:`eqmail.dns.Resolver`
with control/dnsservers as parsed), and :class:`Budget`, the per-message deadline every
lookup of one message shares.  This is the one module of eqmail.auth that may reach the
network (tests/unit/test_layers.py); the rest of the package is pure and is handed a
:class:`Lookups`.

Outcomes of a lookup, the same for every record type:

- a list of records (at most :data:`MAX_RECORDS`);
- ``[]`` for NXDOMAIN and for NODATA (a name without a record of the type): the RFCs
  this package implements treat the two alike (RFC 7208 §4.3/§5 "void lookup",
  RFC 7489 §6.6.3 "no record", RFC 6376 §6.1.2 "no key");
  A name that cannot exist (a label over 63 bytes, a name over 255) is ``[]`` too.
- :class:`DnsTempError` for everything else: a timeout, SERVFAIL, an answer that does
  not parse, and any lookup asked for once the message's budget is spent.  Callers turn it into ``temperror``; it never becomes a 5xx.

Privilege: none beyond UDP/TCP to the configured resolvers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from eqmail.dkim.dns import DnsPermError, DnsTempError, TxtLookup
from eqmail.dns import Resolver

MAX_RECORDS = 64                # records used from one answer (SPF's MX/A limits are 10)
_R = TypeVar("_R")
PER_LOOKUP = 5.0                # seconds one lookup may take at most, within the budget
FOUND_MAX = 4096                # cached answers remembered by name (see _DnspythonLookups)

__all__ = ["MAX_RECORDS", "Budget", "CacheOnly", "DnsTempError", "Lookups", "cache_only",
           "lookups_on", "make_lookups"]


class Lookups(Protocol):
    """What the checks may ask of DNS.  Each method is given the seconds it may take;
    returns ``[]`` for NXDOMAIN/NODATA and raises :class:`DnsTempError` otherwise
    (see the module doc).  Names are absolute, without the final dot."""

    def txt(self, name: str, timeout: float) -> list[tuple[bytes, ...]]:
        """Each TXT record as its character-strings (callers join them)."""
        ...

    def addresses(self, name: str, rdtype: str, timeout: float) -> list[str]:
        """The A (``rdtype="A"``) or AAAA (``"AAAA"``) addresses, as text."""
        ...

    def mx(self, name: str, timeout: float) -> list[tuple[int, str]]:
        """(preference, exchange without the final dot) pairs."""
        ...

    def ptr(self, name: str, timeout: float) -> list[str]:
        """PTR targets without the final dot (``name`` is the in-addr/ip6 name)."""
        ...


class _DnspythonLookups:
    """:class:`Lookups` on dnspython, with eqmail.dns's resolver set-up (the servers of
    control/dnsservers, EDNS with 1232-byte UDP answers, TCP on truncation)."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.res = resolver
        # (name as asked, type) -> (expiry, records): what cached() found in the
        # resolver's cache, valid until the answer's own expiry (its TTL), so the next
        # ask skips dnspython's name parsing and hashing (most of a cached lookup's cost)
        self._found: dict[tuple[str, int], tuple[float, list[object]]] = {}

    def _answer(self, name: str, rdtype: dns.rdatatype.RdataType,
                timeout: float) -> list[object]:
        if timeout <= 0:
            raise DnsTempError(f"{name}: no time left")
        try:
            answer = self.res.resolve(name, rdtype, raise_on_no_answer=False, search=False,
                                      lifetime=min(timeout, PER_LOOKUP))
        except dns.resolver.NXDOMAIN:
            return []
        except _IMPOSSIBLE:
            return []  # a name that cannot exist has no records (as eqmail.dns says)
        except (dns.exception.DNSException, OSError, ValueError, UnicodeError) as e:
            raise DnsTempError(f"{name}: {type(e).__name__}: {e}") from None
        return _records(answer, rdtype)

    def cached(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[object] | None:
        """What :meth:`_answer` would return now from the resolver's cache alone (the
        same answers dnspython's resolve() takes from it: TTLs honoured, NXDOMAIN and
        NODATA included), or None when it would have to ask."""
        cache = self.res.cache
        if cache is None:
            return None
        key = (name, int(rdtype))
        found = self._found.get(key)
        if found is not None and found[0] > time.time():  # LRUCache's expiry test
            return found[1]
        try:
            qname = dns.name.from_text(name)
        except _IMPOSSIBLE:
            return []
        except Exception:  # resolve() decides what such a name gives
            return None
        answer = cache.get((qname, rdtype, dns.rdataclass.IN))
        if answer is not None:
            records = _records(answer, rdtype)
        else:
            answer = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
            if answer is None or answer.response.rcode() != dns.rcode.NXDOMAIN:
                return None
            records = []
        if len(self._found) >= FOUND_MAX:
            self._found.clear()
        self._found[key] = (answer.expiration, records)
        return records

    def txt(self, name: str, timeout: float) -> list[tuple[bytes, ...]]:
        return [tuple(r.strings) for r in self._answer(name, dns.rdatatype.TXT, timeout)]  # type: ignore[attr-defined]

    def addresses(self, name: str, rdtype: str, timeout: float) -> list[str]:
        kind = dns.rdatatype.AAAA if rdtype == "AAAA" else dns.rdatatype.A
        return [str(r.address) for r in self._answer(name, kind, timeout)]  # type: ignore[attr-defined]

    def mx(self, name: str, timeout: float) -> list[tuple[int, str]]:
        return [(int(r.preference), r.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
                for r in self._answer(name, dns.rdatatype.MX, timeout)]

    def ptr(self, name: str, timeout: float) -> list[str]:
        return [r.target.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
                for r in self._answer(name, dns.rdatatype.PTR, timeout)]


_IMPOSSIBLE = (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel)


def _records(answer: dns.resolver.Answer, rdtype: dns.rdatatype.RdataType) -> list[object]:
    if answer.rrset is None or answer.rrset.rdtype != rdtype:
        return []  # NODATA, or only a CNAME the server did not chase
    return list(answer.rrset)[:MAX_RECORDS]


def make_lookups(servers: tuple[tuple[str, int], ...], cache: int = 0) -> Lookups:
    """The real :class:`Lookups`: ``servers`` is ``Controls.dnsservers`` (empty: the
    system's /etc/resolv.conf, as for remote delivery).  Safe to share between threads
    (dnspython's resolver keeps no per-query state).  ``cache``: answers kept in
    dnspython's LRUCache (each for its TTL; thread-safe), 0 for none."""
    lookups = _DnspythonLookups(Resolver(servers, lifetime=PER_LOOKUP).res)
    if cache > 0:
        lookups.res.cache = dns.resolver.LRUCache(cache)
    return lookups


class CacheOnly:
    """A :class:`Lookups` that answers from another one's cache and never waits: what
    is not cached is a :class:`DnsTempError` and sets :attr:`missed`, after which
    :meth:`clock` says the time is up, so the checks ask nothing more.  With it the
    checks can run where blocking is not allowed (the listener's event loop): a run
    that did not miss gave exactly the results the real lookups would have given; one
    that missed is thrown away.  Made by :func:`cache_only`."""

    def __init__(self, real: _DnspythonLookups) -> None:
        self.real = real
        self.missed = False

    def clock(self) -> float:
        return float("inf") if self.missed else time.monotonic()

    def _get(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[Any]:
        records = None if self.missed else self.real.cached(name, rdtype)
        if records is None:
            self.missed = True
            raise DnsTempError(f"{name}: not cached")
        return records

    def txt(self, name: str, timeout: float) -> list[tuple[bytes, ...]]:
        return [tuple(r.strings) for r in self._get(name, dns.rdatatype.TXT)]

    def addresses(self, name: str, rdtype: str, timeout: float) -> list[str]:
        kind = dns.rdatatype.AAAA if rdtype == "AAAA" else dns.rdatatype.A
        return [str(r.address) for r in self._get(name, kind)]

    def mx(self, name: str, timeout: float) -> list[tuple[int, str]]:
        return [(int(r.preference), r.exchange.to_text(omit_final_dot=True))
                for r in self._get(name, dns.rdatatype.MX)]

    def ptr(self, name: str, timeout: float) -> list[str]:
        return [r.target.to_text(omit_final_dot=True) for r in self._get(name, dns.rdatatype.PTR)]


def cache_only(lookups: Lookups) -> CacheOnly | None:
    """A :class:`CacheOnly` on ``lookups``, or None when they have no cache."""
    if isinstance(lookups, _DnspythonLookups) and lookups.res.cache is not None:
        return CacheOnly(lookups)
    return None


def lookups_on(resolver: dns.resolver.Resolver) -> Lookups:
    """A :class:`Lookups` on a dnspython resolver configured elsewhere: the qmail-spp
    plugin plugins/spf has its own (sppkit's, from control/dnsservers, re-read when the
    file changes) and shares everything else with :func:`eqmail.auth.authenticate`."""
    return _DnspythonLookups(resolver)


class Budget:
    """One message's lookups: every lookup gets the time left until ``deadline`` (a
    ``clock()`` value); once it has passed, every lookup is a :class:`DnsTempError`
    without asking.  Counts the lookups made, for the logs and the tests."""

    def __init__(self, lookups: Lookups, deadline: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lookups = lookups
        self.deadline = deadline
        self.clock = clock
        self.count = 0

    def left(self) -> float:
        return self.deadline - self.clock()

    def _time(self, name: str) -> float:
        left = self.left()
        if left <= 0:
            raise DnsTempError(f"{name}: time for this message's lookups used up")
        self.count += 1
        return left

    def _ask(self, name: str, ask: Callable[[float], list[_R]]) -> list[_R]:
        try:
            return ask(self._time(name))
        except DnsTempError:
            raise
        except Exception as e:  # a Lookups that breaks its contract: still only temporary
            raise DnsTempError(f"{name}: {type(e).__name__}") from None

    def txt(self, name: str) -> list[tuple[bytes, ...]]:
        return self._ask(name, lambda t: self.lookups.txt(name, t))

    def addresses(self, name: str, rdtype: str) -> list[str]:
        return self._ask(name, lambda t: self.lookups.addresses(name, rdtype, t))

    def mx(self, name: str) -> list[tuple[int, str]]:
        return self._ask(name, lambda t: self.lookups.mx(name, t))

    def ptr(self, name: str) -> list[str]:
        return self._ask(name, lambda t: self.lookups.ptr(name, t))

    def txt_lookup(self) -> TxtLookup:
        """eqmail.dkim's :data:`TxtLookup` on this budget (joined strings; no record is
        :class:`DnsPermError`, as eqmail.dkim.verify expects)."""
        def lookup(name: str) -> list[bytes]:
            records = [b"".join(r) for r in self.txt(name)]
            if not records:
                raise DnsPermError(f"{name}: no TXT record")
            return records
        return lookup
