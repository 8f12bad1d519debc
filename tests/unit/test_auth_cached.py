"""The cheap path of inbound verification: eqmail.auth.authenticate_cached (the checks
answered from the DNS cache alone, run by the listener on its event loop) gives the
same report as authenticate or none at all, and RSA signatures checked by OpenSSL for
dkimpy agree with dkimpy's own arithmetic.  DNS: a loopback server (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dkim
import dkim.crypto
import pytest
from dkimkeys import ed_key, pem, record, rsa_key
from dnsserver import DnsServer, txt
from harness import parsed_controls

from eqmail.auth import AuthPolicy, AuthReport, Inbound, authenticate, authenticate_cached
from eqmail.auth.dns import make_lookups
from eqmail.dkim import verify as dkimverify
from eqmail.dkim.sign import KeyType, SigningKey, sign
from eqmail.workers.inbound import InboundChecker

GOOD_IP, BAD_IP = "192.0.2.10", "203.0.113.5"
ZONE: dict[str, object] = {
    "example.com": {"TXT": [txt(f"v=spf1 ip4:{GOOD_IP} -all")]},
    "_dmarc.example.com": {"TXT": [txt("v=DMARC1; p=reject")]},
    "rsa._domainkey.example.com": {"TXT": [txt(record(rsa_key()).decode())]},
    "ed._domainkey.example.com": {"TXT": [txt(record(ed_key()).decode())]},
    "sub.example.com": {"TXT": [txt("v=spf1 include:example.com ~all")]},
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    srv = DnsServer(ZONE)
    srv.start()
    yield srv
    srv.stop()


def message(frm: str = "alice@example.com") -> bytes:
    msg = (f"From: Alice <{frm}>\nTo: bob@mx.test\nSubject: hi\n"
           "Date: Tue, 8 Dec 2026 00:00:00 +0000\n\nHello.\n").encode()
    keys = [SigningKey("example.com", "rsa", KeyType.RSA, pem(rsa_key())),
            SigningKey("example.com", "ed", KeyType.ED25519, pem(ed_key()))]
    return sign(msg, keys) + msg


CASES = [
    Inbound(GOOD_IP, "helo.example.com", "alice@example.com", message()),
    Inbound(BAD_IP, "helo.example.com", "alice@example.com", message()),
    Inbound(BAD_IP, "helo.example.com", "alice@sub.example.com", message("a@sub.example.com")),
    Inbound(BAD_IP, "helo.example.com", "x@nowhere.example.org",
            message().replace(b"Hello.", b"Changed.")),
    Inbound(GOOD_IP, "helo.example.com", "", b"Subject: no from\n\nbody\n"),
]


def same(a: AuthReport, b: AuthReport) -> bool:
    return (a.header, a.spf, a.dkim, a.dmarc, a.arc, a.disposition, a.from_domain,
            a.lookups) == (b.header, b.spf, b.dkim, b.dmarc, b.arc, b.disposition,
                           b.from_domain, b.lookups)


@pytest.mark.parametrize("inbound", CASES)
def test_cached_checks_give_the_same_report_or_none(server: DnsServer, inbound: Inbound) -> None:
    lookups = make_lookups((("127.0.0.1", server.port),), cache=100)
    policy = AuthPolicy("mx.test", 5)
    assert authenticate_cached(inbound, lookups, policy) is None  # nothing cached yet
    real = authenticate(inbound, lookups, policy)
    cached = authenticate_cached(inbound, lookups, policy)
    assert cached is not None and same(cached, real)
    assert b"temperror" not in cached.header


def test_no_cache_no_cached_checks(server: DnsServer) -> None:
    lookups = make_lookups((("127.0.0.1", server.port),))
    policy = AuthPolicy("mx.test", 5)
    authenticate(CASES[0], lookups, policy)
    assert authenticate_cached(CASES[0], lookups, policy) is None


def test_the_listener_checks_cached_mail_without_its_pool(server: DnsServer) -> None:
    """Once a domain's answers are cached the listener's checks do not go to a thread
    (where they would hold the GIL against the event loop): here the pool's check is
    broken, and the message still gets its real results."""
    c = parsed_controls({"authcheck": "1\n", "authservid": "mx.test\n",
                         "dnsservers": f"127.0.0.1:{server.port}\n"})
    checker = InboundChecker(c, ThreadPoolExecutor(1), asyncio.Semaphore(1))
    inbound = CASES[0]

    def run() -> bytes:
        msg = checker.begin(inbound.client_ip, inbound.helo, inbound.mail_from, 0)
        msg.feed(inbound.message)
        msg.end()
        return asyncio.run(msg.finish()).fields

    first = run()  # answers not cached yet: the pool's thread asks the server
    assert b"spf=pass" in first and b"dkim=pass" in first and b"dmarc=pass" in first

    def broken(_inbound: object, _began: float) -> AuthReport:
        raise ValueError("the pool was used")

    checker.check = broken  # type: ignore[method-assign]
    assert run() == first


def test_openssl_rsa_check_agrees_with_dkimpys() -> None:
    """dkimpy's pure-Python RSASSA-PKCS1-v1_5 verify and the OpenSSL one that
    eqmail.dkim.verify gives dkimpy decide alike: good, altered and foreign signatures."""
    pk_record = record(rsa_key())
    tags = dkim.util.parse_tag_value(pk_record)
    public = dkim.crypto.parse_public_key(base64.b64decode(tags[b"p"]))
    for digest_of in (b"one", b"two"):
        h = dkim.HashThrough(dkim.crypto.HASH_ALGORITHMS[b"rsa-sha256"](digest_of))
        good = dkim.crypto.RSASSA_PKCS1_v1_5_sign(h, dkim.crypto.parse_pem_private_key(
            pem(rsa_key())))
        bad = bytes(good[:-1]) + bytes([good[-1] ^ 1])
        other = dkim.HashThrough(dkim.crypto.HASH_ALGORITHMS[b"rsa-sha256"](b"other"))
        for hash_obj, signature in ((h, good), (h, bad), (other, good), (h, b"\0" + good[1:])):
            want = dkim.crypto.RSASSA_PKCS1_v1_5_verify(hash_obj, signature, public)
            assert dkimverify._rsa_verify(hash_obj, signature, public) is want


def test_a_changed_key_record_is_judged_afresh() -> None:
    """Parsed keys are kept per record bytes: when the record at a name changes (a key
    rotation, or a revocation), the next message is verified against the new one."""
    msg = b"From: a@example.com\nSubject: s\n\nbody\n"
    signed = sign(msg, [SigningKey("example.com", "rsa", KeyType.RSA, pem(rsa_key()))]) + msg
    published = {"rsa._domainkey.example.com": record(rsa_key())}

    def lookup(name: str) -> list[bytes]:
        return [published[name]]

    assert [r.result for r in dkimverify.verify(signed, lookup)] == [dkimverify.Result.PASS]
    published["rsa._domainkey.example.com"] = record(rsa_key(1024))  # another key
    assert [r.result for r in dkimverify.verify(signed, lookup)] == [dkimverify.Result.FAIL]
    published["rsa._domainkey.example.com"] = b"v=DKIM1; k=rsa; p="  # revoked
    assert [r.result for r in dkimverify.verify(signed, lookup)] == [dkimverify.Result.PERMERROR]
    published["rsa._domainkey.example.com"] = record(rsa_key())
    assert [r.result for r in dkimverify.verify(signed, lookup)] == [dkimverify.Result.PASS]
