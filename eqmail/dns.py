"""DNS for remote delivery: MX, AAAA and A with qmail-remote's rules and texts.

Owns: every DNS query eqmail makes (dnspython), the "am I an MX for this host" test and
the local interface address list.  Runs in the remote delivery worker (eqmailr); needs
no privilege.

Inputs: a host (the recipient domain or an smtproutes relay), the resolver list from
``control/dnsservers`` (else /etc/resolv.conf), a query lifetime.

Outputs: an ordered list of :class:`MxAddress` — MX hosts lowest preference first, equal
preferences in random order, for each host all its AAAA addresses then all its A
addresses (CNAME chains followed), i.e. IPv6 first (qmail-core §4.2, eQmail §8 with
eQmail's "first A record only" bug fixed).

Failures: :class:`DnsFailure` with a :class:`DnsProblem` — permanent or temporary, and
qmail-remote's text, e.g. ``Sorry, I couldn't find any host by that name. (#4.1.2)\\n``
(temporary).  Remote delivery makes it a failure or a deferral: this foundation module
knows no delivery verdicts.  A soft failure (timeout, SERVFAIL) on some MX hosts is
tolerated while any address was found.

Bounds: each query has ``lifetime`` seconds, one resolution ``3 * lifetime`` in all;
at most MAX_MX exchangers, MAX_ADDRS addresses per name and MAX_TOTAL in all are used;
UDP answers are limited by EDNS to 1232 bytes (TCP on truncation, 64 KiB by protocol).

DNSSEC (issue 17, RFC 7672 §2.1): with ``Resolver(dnssec=True)`` (control/dnssec 1)
every query carries the DO and AD bits and an answer counts as authenticated when the
resolver set AD in its reply -- the resolvers of control/dnsservers are trusted to
validate, as Postfix's ``smtp_dns_support_level = dnssec`` trusts them.  Without it no
answer is ever "secure", whatever the server says.  A validating resolver answers bogus
data with SERVFAIL: that is :class:`LookupSoft`, so bogus data defers.
:attr:`MxAddress.secure` and :meth:`Resolver.tlsa` carry the verdicts to DANE.

Answer cache (opt-in, ``Resolver(cache=True)``): answers, NODATA and NXDOMAIN included,
are kept for their TTL (dnspython's LRUCache, at most CACHE_SIZE of them, thread-safe)
and shared by every cached Resolver of the same servers and ``dnssec`` setting -- the
AD bit is part of what is kept, so an answer asked without DO never serves a DANE
decision.  Failures (timeouts, SERVFAIL, i.e. bogus data) are never kept.  Without
it every lookup asks the servers, as qmail did; a busy relay sending to one domain
otherwise asks the same four to six questions for every message (bench/tlspolicy.sh).

This machine's own addresses (for "am I an MX") come from eqmail.netif.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

MAX_MX = 32
MAX_ADDRS = 16
MAX_TOTAL = 64
MAX_CNAME_HOPS = 10
PREF_ROUTE = 300000  # qmail-remote: with a route every address is tried
PREF_CNAME = 500000  # ... and when the recipient domain was an alias
MAX_TLSA = 32  # records of one TLSA RRset that are looked at
CACHE_SIZE = 4096  # answers one shared cache keeps (least recently used go first)

_caches: dict[tuple[tuple[tuple[str, int], ...], bool], dns.resolver.LRUCache] = {}
_caches_lock = threading.Lock()


def shared_cache(servers: tuple[tuple[str, int], ...], dnssec: bool) -> dns.resolver.LRUCache:
    """The process's answer cache for these servers and this ``dnssec`` setting."""
    key = (servers, dnssec)
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = dns.resolver.LRUCache(CACHE_SIZE)
        return cache


@dataclass(frozen=True)
class DnsProblem:
    """Why a resolution failed: ``permanent`` (qmail-remote's perm_*, the mail bounces)
    or temporary (temp_*, retried), and qmail-remote's ``text``."""

    permanent: bool
    text: str


class DnsFailure(Exception):
    """Resolution failed, for the reason ``problem``."""

    def __init__(self, problem: DnsProblem) -> None:
        super().__init__(problem.text)
        self.problem = problem


TEMP_DNS = DnsProblem(False, "Sorry, I couldn't find any host by that name. (#4.1.2)\n")
PERM_NOMX = DnsProblem(True, "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n")
TEMP_CNAME = DnsProblem(False, "CNAME lookup failed temporarily. (#4.4.3)\n")
PERM_AMBIGMX = DnsProblem(
    True, "Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
          "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n")


def perm_dns(host: str) -> DnsProblem:
    return DnsProblem(True, f"Sorry, I couldn't find any host named {safe(host)}. (#5.1.2)\n")


def safe(text: str) -> str:
    """qmail-remote's outsafe(): unprintable characters of echoed names become ``?``."""
    return "".join(c if " " <= c < "\x7f" or c > "\x9f" else "?" for c in text)


class LookupSoft(Exception):
    """A lookup that may pass later: timeout, SERVFAIL, a malformed answer."""


class LookupHard(Exception):
    """A lookup that will not pass: NXDOMAIN, no record of the type, an impossible name.
    ``secure``: the denial was DNSSEC-authenticated (only ever with ``dnssec``)."""

    def __init__(self, *args: object, secure: bool = False) -> None:
        super().__init__(*args)
        self.secure = secure


@dataclass(frozen=True)
class MxAddress:
    ip: str  # RFC 5952 / dotted quad text
    pref: int
    host: str  # the MX or relay name as looked up ("" for an address literal)
    # issue 17 (DANE): the MX RRset (when there was one) and this host's address RRset
    # were DNSSEC-authenticated -- only ever True when the resolver trusts the AD bit
    secure: bool = False


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        """Presentation form, as in a zone file and in TLS-RPT policy-strings."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class TlsaAnswer:
    """The TLSA RRset of ``_<port>._tcp.<host>`` (issue 17): ``records`` (empty: none
    exist), ``secure``: the answer, or the denial, was DNSSEC-authenticated."""

    records: tuple[Tlsa, ...]
    secure: bool
    # the TLSA base domain the records were found at (RFC 7672 §2.2.2: the MX host's
    # CNAME-expanded name or the name itself): DANE-TA's reference identifiers are the
    # MX host name and this name; "" without records
    base: str = ""


def _ede(e: Exception) -> str:
    """The resolver's RFC 8914 Extended DNS Error of a SERVFAIL (unbound names DNSSEC
    failures this way: "DNSSEC Bogus", "Signature Expired"), for the log; "" if none."""
    if not isinstance(e, dns.resolver.NoNameservers):
        return ""
    for err in e.kwargs.get("errors") or []:
        message = err[4] if isinstance(err, tuple) and len(err) > 4 else None
        if not isinstance(message, dns.message.Message):
            continue
        for ede in message.extended_errors():
            try:
                name = dns.edns.EDECode(ede.code).name.replace("_", " ").lower()
            except ValueError:
                name = "code"
            text = f": {safe(ede.text)}" if ede.text else ""
            return f" (EDE {ede.code} {name}{text})"[:200]
    return ""


def literal_ip(host: str) -> str | None:
    """``1.2.3.4``, ``[1.2.3.4]``, ``[2001:db8::1]`` or ``[IPv6:2001:db8::1]`` -> the IP."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    if text is host and ":" in text:
        return None  # a bare IPv6 address is not a host name qmail accepts
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def order_mx(records: list[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first; equal preferences shuffled (qmail's randomised order)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])  # sort is stable: the shuffle survives


def candidates(addrs: list[MxAddress], me: frozenset[str], prefme: int | None) -> list[MxAddress]:
    """qmail-remote's self-MX rule: only addresses whose preference is below the best
    preference at which one of our own addresses appears.  ``prefme`` given = a route
    or an aliased domain: every address is tried."""
    if prefme is None:
        prefme = 100000
        for a in addrs:
            if a.ip in me and a.pref < prefme:
                prefme = a.pref
    out = [a for a in addrs if a.pref < prefme]
    if not out:
        raise DnsFailure(PERM_AMBIGMX)
    return out


class Resolver:
    """dnspython with qmail's error classes, bounded in time and size."""

    def __init__(self, servers: tuple[tuple[str, int], ...] = (), lifetime: float = 30.0,
                 rng: random.Random | None = None, dnssec: bool = False,
                 cache: bool = False) -> None:
        # dnssec (control/dnssec 1): ask with DO and believe the servers' AD bit
        self.dnssec = dnssec
        self.res = dns.resolver.Resolver(configure=not servers)
        if cache:  # see the module's docstring: answers kept for their TTL
            self.res.cache = shared_cache(servers, dnssec)
        if servers:
            self.res.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        if dnssec:
            # DO (RFC 4035 §3.2.1) makes a validating resolver validate and say so; AD in
            # the query (RFC 6840 §5.7) asks for the AD bit in the reply
            self.res.use_edns(0, dns.flags.DO, 1232)
            self.res.flags = dns.flags.RD | dns.flags.AD
        else:
            self.res.use_edns(0, 0, 1232)
        self.res.timeout = min(2.0, lifetime)
        self.lifetime = lifetime
        self.rng = rng or random.Random()
        self.deadline = 0.0

    def _begin(self) -> None:
        self.deadline = time.monotonic() + 3 * self.lifetime

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        left = min(self.lifetime, self.deadline - time.monotonic())
        if left <= 0:
            raise LookupSoft("resolution took too long")
        try:
            return self.res.resolve(name, rdtype, raise_on_no_answer=False, search=False,
                                    lifetime=left)
        except dns.resolver.NXDOMAIN as e:
            raise LookupHard(str(e), secure=self._denial_secure(e)) from None
        except (dns.exception.DNSException, OSError, ValueError) as e:
            # Timeouts, SERVFAIL from every server, malformed answers, bad names: soft,
            # as qmail's dns.c treats everything but NXDOMAIN.
            if isinstance(e, (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel)):
                raise LookupHard(str(e)) from None
            raise LookupSoft(str(e) + _ede(e)) from None

    def _secure(self, response: dns.message.Message | None) -> bool:
        """The resolver authenticated this reply (AD), and we trust it to (dnssec)."""
        return self.dnssec and response is not None and bool(response.flags & dns.flags.AD)

    def _denial_secure(self, e: dns.resolver.NXDOMAIN) -> bool:
        responses = list(e.responses().values())  # type: ignore[no-untyped-call]
        return bool(responses) and all(self._secure(r) for r in responses)

    def _records(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[list[str], bool]:
        """Addresses of one type for a name, following CNAMEs the server did not chase,
        and whether every answer on the way was authenticated."""
        secure = self.dnssec
        for _ in range(MAX_CNAME_HOPS):
            answer = self._query(name, rdtype)
            secure = secure and self._secure(answer.response)
            if answer.rrset is not None:
                return [r.address for r in list(answer.rrset)[:MAX_ADDRS]], secure
            target = answer.canonical_name.to_text()
            if dns.name.from_text(name) == answer.canonical_name:
                return [], secure
            name = target
        return [], False

    def txt(self, name: str) -> list[bytes]:
        """The TXT records at ``name``, each record's strings joined (CNAMEs the server
        did not chase are not followed: a TXT owner is looked up where it is).  Raises
        :class:`LookupHard` for NXDOMAIN, no TXT record or an impossible name, and
        :class:`LookupSoft` for anything that may pass (timeouts, SERVFAIL, bad answers)."""
        self._begin()
        answer = self._query(name, dns.rdatatype.TXT)
        if answer.rrset is None or answer.rrset.rdtype != dns.rdatatype.TXT:
            raise LookupHard(f"{name}: no TXT record")
        return [b"".join(rdata.strings) for rdata in answer.rrset]

    def _addresses(self, name: str) -> tuple[list[str], bool]:
        """All AAAA then all A addresses of ``name`` (soft only when nothing was found
        and a lookup was soft; hard only when both were hard), and whether both lookups
        were authenticated (answers or denials; RFC 7672 §2.2.2 wants the host's
        address records secure).  Within a resolution begun by a public method: its
        deadline bounds the lookups."""
        found: list[str] = []
        errors: list[Exception] = []
        secure = self.dnssec
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                records, authenticated = self._records(name, rdtype)
                found += records
                secure = secure and authenticated
            except LookupHard as e:
                errors.append(e)
                secure = secure and e.secure
            except LookupSoft as e:
                errors.append(e)
                secure = False
        if found:
            return [str(ipaddress.ip_address(a)) for a in found], secure
        if any(isinstance(e, LookupSoft) for e in errors):
            raise LookupSoft("address lookup failed")
        if len(errors) == 2:
            raise LookupHard("no such host")
        return [], secure

    def host_addresses(self, host: str, pref: int = 0) -> list[MxAddress]:
        """dns_ip for a relay or a host without MX; raises DnsFailure with its text."""
        self._begin()
        ip = literal_ip(host)
        if ip is not None:
            return [MxAddress(ip, 0, "")]
        return self._host_or_fail(host, pref, self.dnssec)

    def _host_or_fail(self, host: str, pref: int, mx_secure: bool) -> list[MxAddress]:
        """``mx_secure``: the MX denial that led here (or none, for a relay) was
        authenticated -- the implicit MX of RFC 7672 §2.2.1 is only as secure as it."""
        try:
            found, secure = self._addresses(host)
        except LookupSoft:
            raise DnsFailure(TEMP_DNS) from None
        except LookupHard:
            raise DnsFailure(perm_dns(host)) from None
        if not found:
            raise DnsFailure(PERM_NOMX)
        return [MxAddress(a, pref, host, mx_secure and secure) for a in found]

    def mx_addresses(self, host: str) -> list[MxAddress]:
        """dns_mxip: MX hosts in order, each host's addresses IPv6 first."""
        self._begin()
        ip = literal_ip(host)
        if ip is not None:
            return [MxAddress(ip, 0, "")]
        try:
            answer = self._query(host, dns.rdatatype.MX)
        except LookupSoft:
            raise DnsFailure(TEMP_DNS) from None
        except LookupHard as e:
            return self._host_or_fail(host, 0, e.secure)
        mx_secure = self._secure(answer.response)
        mxs = [(r.preference, r.exchange.to_text(omit_final_dot=True))
               for r in list(answer.rrset or [])[:MAX_MX]]
        if not mxs:
            return self._host_or_fail(host, 0, mx_secure)
        out: list[MxAddress] = []
        soft = False
        for pref, name in order_mx(mxs, self.rng):
            try:
                found, secure = self._addresses(name)
                out += [MxAddress(a, pref, name.lower(), mx_secure and secure) for a in found]
            except LookupSoft:
                soft = True
            except LookupHard:
                pass
            if len(out) >= MAX_TOTAL:
                break
        if not out:
            raise DnsFailure(TEMP_DNS if soft else PERM_NOMX)
        return out[:MAX_TOTAL]

    def tlsa(self, host: str, port: int = 25) -> TlsaAnswer:
        """The TLSA records for ``host``'s SMTP port (RFC 7672 §2.2.2: at the end of
        the host's CNAME chain first, then at the name itself).  Raises
        :class:`LookupSoft` when the answer may change (timeout, SERVFAIL -- which a
        validating resolver gives for bogus data) -- the caller must not deliver to
        that host then.

        ``TlsaAnswer(records, True)``: an authenticated RRset (DANE applies; the
        records may all be unusable).  ``TlsaAnswer((), True)``: authenticated denial
        (opportunistic TLS).  ``TlsaAnswer((), False)``: nothing authenticated -- no
        ``dnssec``, an address literal, an insecure host name or TLSA RRset -- so no
        DANE (insecure records are never returned)."""
        self._begin()
        if not self.dnssec or literal_ip(host) is not None:
            return TlsaAnswer((), False)
        initial = host.lower().rstrip(".")
        try:
            answer = self._query(initial, dns.rdatatype.A)
        except LookupHard:
            return TlsaAnswer((), False)
        if not self._secure(answer.response):
            return TlsaAnswer((), False)  # §2.2.2: only a secure host name has TLSA
        expanded = answer.canonical_name.to_text(omit_final_dot=True).lower()
        secure = False
        for name in ([expanded] if expanded != initial else []) + [initial]:
            # a soft failure at the expanded name is not passed over for the initial
            # one: the host is indeterminate (Postfix's tls_dane_resolve does the same)
            records, secure = self._tlsa_at(f"_{port}._tcp.{name}")
            if records:
                return TlsaAnswer(records, True, name)
        return TlsaAnswer((), secure)

    def validates(self) -> bool:
        """Whether the resolvers authenticate DNSSEC: the root zone's DNSKEY RRset, which
        every validating resolver can check with its trust anchor, comes back with AD
        (asked with DO and AD whatever ``dnssec`` says).  Raises :class:`LookupSoft`
        when they do not answer.  For ``eqmailctl check``."""
        saved = (self.dnssec, self.res.flags, self.res.ednsflags, self.res.cache)
        self.dnssec = True
        self.res.cache = None  # asked with other flags than the cache's answers were
        self.res.use_edns(0, dns.flags.DO, 1232)
        self.res.flags = dns.flags.RD | dns.flags.AD
        self._begin()
        try:
            return self._secure(self._query(".", dns.rdatatype.DNSKEY).response)
        except LookupHard as e:
            return e.secure
        finally:
            self.dnssec, self.res.flags, self.res.cache = saved[0], saved[1], saved[3]
            self.res.use_edns(0, saved[2], 1232)

    def _tlsa_at(self, owner: str) -> tuple[tuple[Tlsa, ...], bool]:
        """The authenticated TLSA records at ``owner`` (CNAMEs chased by the resolver)
        and whether the answer or denial was authenticated."""
        try:
            answer = self._query(owner, dns.rdatatype.TLSA)
        except LookupHard as e:
            return (), e.secure
        if not self._secure(answer.response):
            return (), False
        if answer.rrset is None or answer.rrset.rdtype != dns.rdatatype.TLSA:
            return (), True
        return tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert))
                     for r in list(answer.rrset)[:MAX_TLSA]), True

    def canonical(self, domain: str) -> str:
        """The end of the domain's CNAME chain (qmail-remote's addrmangle); ``domain``
        itself when it is not an alias.  A soft failure is TEMP_CNAME."""
        self._begin()
        if literal_ip(domain) is not None:
            return domain
        name = domain
        for _ in range(MAX_CNAME_HOPS):
            try:
                answer = self._query(name, dns.rdatatype.CNAME)
            except LookupHard:
                break
            except LookupSoft:
                raise DnsFailure(TEMP_CNAME) from None
            if answer.rrset is None:
                break
            name = answer.rrset[0].target.to_text(omit_final_dot=True)
        return domain if name.lower() == domain.lower() else name
