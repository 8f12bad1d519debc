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

This machine's own addresses (for "am I an MX") come from eqmail.netif.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass

import dns.exception
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
    """A lookup that will not pass: NXDOMAIN, no record of the type, an impossible name."""


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
                 rng: random.Random | None = None, dnssec: bool = False) -> None:
        # dnssec (control/dnssec 1): ask with DO and believe the servers' AD bit
        self.dnssec = dnssec
        self.res = dns.resolver.Resolver(configure=not servers)
        if servers:
            self.res.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
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
            raise LookupHard(str(e)) from None
        except (dns.exception.DNSException, OSError, ValueError) as e:
            # Timeouts, SERVFAIL from every server, malformed answers, bad names: soft,
            # as qmail's dns.c treats everything but NXDOMAIN.
            if isinstance(e, (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel)):
                raise LookupHard(str(e)) from None
            raise LookupSoft(str(e)) from None

    def _records(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[str]:
        """Addresses of one type for a name, following CNAMEs the server did not chase."""
        for _ in range(MAX_CNAME_HOPS):
            answer = self._query(name, rdtype)
            if answer.rrset is not None:
                return [r.address for r in list(answer.rrset)[:MAX_ADDRS]]
            target = answer.canonical_name.to_text()
            if dns.name.from_text(name) == answer.canonical_name:
                return []
            name = target
        return []

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

    def addresses(self, name: str) -> list[str]:
        """All AAAA then all A addresses of ``name``.  Soft only when nothing was found
        and a lookup was soft; hard only when both were hard."""
        found: list[str] = []
        errors: list[Exception] = []
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                found += self._records(name, rdtype)
            except (LookupSoft, LookupHard) as e:
                errors.append(e)
        if found:
            return [str(ipaddress.ip_address(a)) for a in found]
        if any(isinstance(e, LookupSoft) for e in errors):
            raise LookupSoft("address lookup failed")
        if len(errors) == 2:
            raise LookupHard("no such host")
        return []

    def host_addresses(self, host: str, pref: int = 0) -> list[MxAddress]:
        """dns_ip for a relay or a host without MX; raises DnsFailure with its text."""
        self._begin()
        ip = literal_ip(host)
        if ip is not None:
            return [MxAddress(ip, 0, "")]
        return self._host_or_fail(host, pref)

    def _host_or_fail(self, host: str, pref: int) -> list[MxAddress]:
        try:
            found = self.addresses(host)
        except LookupSoft:
            raise DnsFailure(TEMP_DNS) from None
        except LookupHard:
            raise DnsFailure(perm_dns(host)) from None
        if not found:
            raise DnsFailure(PERM_NOMX)
        return [MxAddress(a, pref, host) for a in found]

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
        except LookupHard:
            return self._host_or_fail(host, 0)
        mxs = [(r.preference, r.exchange.to_text(omit_final_dot=True))
               for r in list(answer.rrset or [])[:MAX_MX]]
        if not mxs:
            return self._host_or_fail(host, 0)
        out: list[MxAddress] = []
        soft = False
        for pref, name in order_mx(mxs, self.rng):
            try:
                out += [MxAddress(a, pref, name.lower()) for a in self.addresses(name)]
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
        that host then."""
        raise NotImplementedError("issue 17 contract: the DANE work fills this in")

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
