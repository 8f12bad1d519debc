"""eqmail.dns's DNSSEC switch against a loopback server that sets AD on every answer
(tests/dnsserver.py): the bit counts only with ``dnssec``, and only then are DO and AD
asked for.  (Real validation: tests/integration/test_dnssec_resolver.py.)"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import pytest
from dnsserver import DnsServer

from eqmail.dns import DnsFailure, MxAddress, Resolver, Tlsa, TlsaAnswer, shared_cache

ZONE = {
    "ad.test": {"MX": [(10, "mx.ad.test")]},
    "mx.ad.test": {"A": ["192.0.2.1"]},
    "_25._tcp.mx.ad.test": {"TLSA": ["3 1 1 " + "ab" * 32]},
    "nomx.ad.test": {"A": ["192.0.2.2"]},
    "alias.ad.test": {"CNAME": "mx.ad.test"},
}


class AdServer(DnsServer):
    """Claims every answer authenticated (AD), as a validating resolver would for a
    signed zone; remembers each query's DO and AD bits."""

    def __init__(self, zone: dict[str, object], ad: bool = True) -> None:
        super().__init__(zone)
        self.ad = ad
        self.asked: list[tuple[bool, bool]] = []

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        self.asked.append((bool(query.ednsflags & dns.flags.DO), bool(query.flags & dns.flags.AD)))
        resp = super().answer(query)
        if resp is not None and self.ad:
            resp.flags |= dns.flags.AD
        return resp


@pytest.fixture
def server() -> Iterator[AdServer]:
    with AdServer(ZONE) as srv:
        yield srv


def resolver(server: DnsServer, dnssec: bool) -> Resolver:
    return Resolver((("127.0.0.1", server.port),), 3.0, random.Random(1), dnssec=dnssec)


def test_ad_counts_only_with_dnssec(server: AdServer) -> None:
    assert resolver(server, True).mx_addresses("ad.test") == [
        MxAddress("192.0.2.1", 10, "mx.ad.test", True)]
    assert server.asked and all(do and ad for do, ad in server.asked)
    server.asked.clear()
    assert resolver(server, False).mx_addresses("ad.test") == [
        MxAddress("192.0.2.1", 10, "mx.ad.test", False)]
    assert server.asked and not any(do or ad for do, ad in server.asked)


def test_tlsa_only_with_dnssec(server: AdServer) -> None:
    want = TlsaAnswer((Tlsa(3, 1, 1, b"\xab" * 32),), True, "mx.ad.test")
    assert resolver(server, True).tlsa("mx.ad.test") == want
    assert resolver(server, True).tlsa("alias.ad.test") == TlsaAnswer(want.records, True,
                                                                     "mx.ad.test")
    asked = len(server.asked)
    assert resolver(server, False).tlsa("mx.ad.test") == TlsaAnswer((), False)
    assert len(server.asked) == asked  # not even asked
    # authenticated denial (NXDOMAIN with AD): opportunistic TLS
    assert resolver(server, True).tlsa("nomx.ad.test") == TlsaAnswer((), True)
    # a literal has no TLSA
    assert resolver(server, True).tlsa("[192.0.2.1]") == TlsaAnswer((), False)


def test_implicit_mx_is_secure_with_an_authenticated_denial(server: AdServer) -> None:
    assert resolver(server, True).mx_addresses("nomx.ad.test") == [
        MxAddress("192.0.2.2", 0, "nomx.ad.test", True)]


def test_without_ad_nothing_is_secure() -> None:
    with AdServer(ZONE, ad=False) as plain:
        r = resolver(plain, True)
        assert [a.secure for a in r.mx_addresses("ad.test")] == [False]
        assert r.tlsa("mx.ad.test") == TlsaAnswer((), False)
        assert not r.validates()


def cached(server: DnsServer, dnssec: bool) -> Resolver:
    return Resolver((("127.0.0.1", server.port),), 3.0, random.Random(1), dnssec=dnssec,
                    cache=True)


def test_cache_answers_again_without_asking(server: AdServer) -> None:
    """Resolver(cache=True): a second delivery's MX, address and TLSA lookups (another
    Resolver, as another pool thread has) are answered from the shared cache, AD bit
    and all; NXDOMAIN's authenticated denial survives the cache too."""
    want_mx = [MxAddress("192.0.2.1", 10, "mx.ad.test", True)]
    want_tlsa = TlsaAnswer((Tlsa(3, 1, 1, b"\xab" * 32),), True, "mx.ad.test")
    assert cached(server, True).mx_addresses("ad.test") == want_mx
    assert cached(server, True).tlsa("mx.ad.test") == want_tlsa
    assert cached(server, True).tlsa("nomx.ad.test") == TlsaAnswer((), True)
    asked = len(server.queries)
    assert asked
    r = cached(server, True)
    assert r.mx_addresses("ad.test") == want_mx
    assert r.tlsa("mx.ad.test") == want_tlsa
    assert r.tlsa("nomx.ad.test") == TlsaAnswer((), True)
    assert len(server.queries) == asked
    # without the cache every lookup asks
    assert resolver(server, True).mx_addresses("ad.test") == want_mx
    assert len(server.queries) > asked


def test_cache_is_per_dnssec_setting(server: AdServer) -> None:
    """An answer asked without DO (dnssec off) never serves a dnssec resolver: the AD
    bit of what is cached depends on how it was asked."""
    assert cached(server, False).mx_addresses("ad.test") == [
        MxAddress("192.0.2.1", 10, "mx.ad.test", False)]
    server.asked.clear()
    assert cached(server, True).mx_addresses("ad.test") == [
        MxAddress("192.0.2.1", 10, "mx.ad.test", True)]
    assert server.asked and all(do and ad for do, ad in server.asked)


def test_cache_honours_the_ttl(server: AdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test server's records have a TTL of 60 s: an answer older than that is
    asked again."""
    r = cached(server, True)
    r.mx_addresses("ad.test")
    asked = len(server.queries)
    r.mx_addresses("ad.test")
    assert len(server.queries) == asked
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 61)
    assert r.mx_addresses("ad.test") == [MxAddress("192.0.2.1", 10, "mx.ad.test", True)]
    assert len(server.queries) > asked


def test_cache_keeps_no_failure() -> None:
    """SERVFAIL (a validating resolver's word for bogus data) and timeouts are asked
    again every time: a failure must not outlive its cause."""
    with AdServer({"bogus.ad.test": "SERVFAIL"}) as srv:
        for _ in range(2):
            before = len(srv.queries)
            with pytest.raises(DnsFailure):
                cached(srv, True).mx_addresses("bogus.ad.test")
            assert len(srv.queries) > before


def test_validates_bypasses_the_cache(server: AdServer) -> None:
    r = cached(server, False)
    assert r.validates()
    assert r.res.cache is shared_cache((("127.0.0.1", server.port),), False)
    assert (dns.name.root, dns.rdatatype.DNSKEY, dns.rdataclass.IN) not in r.res.cache.data
