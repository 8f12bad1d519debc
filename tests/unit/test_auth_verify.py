"""eqmail.auth.authenticate end to end against a loopback DNS server: DKIM (messages
signed by eqmail.dkim.sign with keys published in the zone), DMARC (RFC 7489 policy
discovery, alignment, p/sp/pct) and ARC (chains sealed by dkimpy's arc_sign), each
result read back from the Authentication-Results field as a reader sees it — parsed by
the authres package, a parser nobody here wrote."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import authres
import dkim
import pytest
from dkimkeys import ed_key, pem, record, rsa_key
from dnsserver import DnsServer, txt

from eqmail.auth import (
    AuthPolicy,
    AuthReport,
    DmarcDisposition,
    Inbound,
    Lookups,
    authenticate,
    make_lookups,
)
from eqmail.auth.dmarc import organizational_domain, parse_record, selected
from eqmail.dkim.sign import KeyType, SigningKey, _dkimpy_key, sign

GOOD_IP, BAD_IP = "192.0.2.10", "203.0.113.5"


def spf_pass(domain: str) -> dict[str, list[str]]:
    return {"TXT": [txt(f"v=spf1 ip4:{GOOD_IP} -all")]}


def dmarc(text: str) -> dict[str, list[str]]:
    return {"TXT": [txt(text)]}


ZONE: dict[str, object] = {
    "example.com": spf_pass("example.com"),
    "_dmarc.example.com": dmarc("v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.com"),
    "strict.example.com": spf_pass("strict"),
    "_dmarc.strict.example.com": dmarc("v=DMARC1; p=reject; adkim=s; aspf=s"),
    "half.example.net": spf_pass("half"),
    "_dmarc.half.example.net": dmarc("v=DMARC1; p=reject; pct=50"),
    "zero.example.net": spf_pass("zero"),
    "_dmarc.zero.example.net": dmarc("v=DMARC1; p=quarantine; pct=0"),
    "two.example.net": spf_pass("two"),
    "_dmarc.two.example.net": {"TXT": [txt("v=DMARC1; p=reject"), txt("v=DMARC1; p=none")]},
    "badp.example.net": spf_pass("badp"),
    "_dmarc.badp.example.net": dmarc("v=DMARC1; p=bogus"),
    "badprua.example.net": spf_pass("badprua"),
    "_dmarc.badprua.example.net": dmarc("v=DMARC1; p=bogus; rua=mailto:x@badprua.example.net"),
    "notdmarc.example.net": spf_pass("notdmarc"),
    "_dmarc.notdmarc.example.net": dmarc("v=spf1 -all"),
    "none.example.org": spf_pass("none"),
    "tempdmarc.example.org": spf_pass("temp"),
    "_dmarc.tempdmarc.example.org": "SERVFAIL",
    "rsa._domainkey.example.com": {"TXT": [txt(record(rsa_key()).decode())]},
    "ed._domainkey.example.com": {"TXT": [txt(record(ed_key()).decode())]},
    "rsa._domainkey.other.example": {"TXT": [txt(record(rsa_key()).decode())]},
    "hang._domainkey.example.com": "TIMEOUT",
    "arc._domainkey.sealer.example": {"TXT": [txt(record(rsa_key()).decode())]},
    "helo.example.com": spf_pass("helo"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as srv:
        yield srv


@pytest.fixture(scope="module")
def lookups(server: DnsServer) -> Lookups:
    return make_lookups((("127.0.0.1", server.port),))


def message(from_: str = "Alice <alice@example.com>", body: bytes = b"Hello.\n",
            extra: bytes = b"") -> bytes:
    return (extra + f"From: {from_}\nTo: bob@mx.test\nSubject: hi\n"
            "Date: Tue, 8 Dec 2026 00:00:00 +0000\nMessage-ID: <1@example.com>\n\n".encode()
            + body)


def signed(msg: bytes, domain: str = "example.com", selectors: tuple[str, ...] = ("rsa", "ed")
           ) -> bytes:
    keys = {"rsa": SigningKey(domain, "rsa", KeyType.RSA, pem(rsa_key())),
            "ed": SigningKey(domain, "ed", KeyType.ED25519, pem(ed_key())),
            "hang": SigningKey(domain, "hang", KeyType.RSA, pem(rsa_key()))}
    return sign(msg, [keys[s] for s in selectors]) + msg


def check(lookups: Lookups, msg: bytes, ip: str = GOOD_IP, sender: str = "alice@example.com",
          helo: str = "helo.example.com", deadline: float = 5) -> AuthReport:
    return authenticate(Inbound(ip, helo, sender, msg), lookups, AuthPolicy("mx.test", deadline))


def results(report: AuthReport) -> list[tuple[str, str, dict[str, str]]]:
    """(method, result, {ptype.property: value}) as authres parses our field."""
    text = report.header.decode("ascii").replace("\n", "\r\n").rstrip("\r\n")
    parsed = authres.AuthenticationResultsHeader.parse(text)
    assert parsed.authserv_id == "mx.test"
    return [(r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
            for r in parsed.results]


def method(report: AuthReport, name: str) -> list[tuple[str, dict[str, str]]]:
    return [(res, props) for m, res, props in results(report) if m == name]


# ---------------------------------------------------------------- DKIM


def test_two_signatures_pass_each_with_d_s_and_b(lookups: Lookups) -> None:
    msg = signed(message())
    r = check(lookups, msg, ip=BAD_IP)
    assert [d.result for d in r.dkim] == ["pass", "pass"]
    got = method(r, "dkim")
    assert [(res, p["header.d"], p["header.s"]) for res, p in got] == [
        ("pass", "example.com", "rsa"), ("pass", "example.com", "ed")]
    bs = re.findall(rb"\bb=([A-Za-z0-9+/]{8})", msg)
    assert [p["header.b"] for _, p in got] == [b.decode() for b in bs]
    # SPF fails (wrong IP) but DKIM aligns: DMARC passes
    assert r.spf == "fail" and r.dmarc == "pass" and r.disposition == DmarcDisposition.NONE


def test_one_signature_has_no_header_b(lookups: Lookups) -> None:
    r = check(lookups, signed(message(), selectors=("rsa",)))
    assert method(r, "dkim") == [("pass", {"header.d": "example.com", "header.s": "rsa"})]


def test_tampered_body_fails_dkim_and_dmarc_asks_reject(lookups: Lookups) -> None:
    msg = signed(message()).replace(b"Hello.", b"Hellp.")
    r = check(lookups, msg, ip=BAD_IP)
    assert [d.result for d in r.dkim] == ["fail", "fail"]
    assert b"dkim=fail (body hash did not verify) header.d=example.com" in r.header
    assert r.dmarc == "fail" and r.disposition == DmarcDisposition.REJECT
    assert method(r, "dmarc") == [("fail", {"header.from": "example.com",
                                           "policy.dmarc": "reject"})]


def test_unsigned_is_dkim_none(lookups: Lookups) -> None:
    r = check(lookups, message())
    assert method(r, "dkim") == [("none", {})] and r.dkim[0].result == "none"


def test_signature_of_another_domain_passes_but_does_not_align(lookups: Lookups) -> None:
    r = check(lookups, signed(message(), "other.example", ("rsa",)), ip=BAD_IP)
    assert r.dkim[0].result == "pass" and r.dkim[0].domain == "other.example"
    assert r.dmarc == "fail" and r.disposition == DmarcDisposition.REJECT


def test_key_lookup_timeout_is_temperror_and_dmarc_temperror(lookups: Lookups) -> None:
    r = check(lookups, signed(message(), selectors=("hang",)), ip=BAD_IP, deadline=1.5)
    assert r.dkim[0].result == "temperror"
    assert r.dmarc == "temperror" and r.disposition == DmarcDisposition.NONE
    assert r.elapsed < 1.5 + 2


# ---------------------------------------------------------------- DMARC


def test_spf_alignment_passes_relaxed(lookups: Lookups) -> None:
    r = check(lookups, message("a@news.example.com"), sender="bounce@example.com")
    assert r.spf == "pass" and r.dmarc == "pass"


def test_strict_alignment_needs_the_same_name(lookups: Lookups) -> None:
    msg = message("a@strict.example.com")
    assert check(lookups, msg, sender="x@strict.example.com").dmarc == "pass"
    r = check(lookups, msg, sender="x@example.com")             # SPF passes, not aligned
    assert r.spf == "pass" and r.dmarc == "fail" and r.disposition == "reject"
    r = check(lookups, signed(msg), ip=BAD_IP, sender="x@strict.example.com")
    assert r.dkim[0].result == "pass" and r.dmarc == "fail"       # d=example.com, adkim=s


def test_subdomain_gets_sp_from_the_organizational_domain(lookups: Lookups) -> None:
    r = check(lookups, message("a@news.example.com"), ip=BAD_IP, sender="a@news.example.com")
    assert r.dmarc == "fail" and r.disposition == DmarcDisposition.QUARANTINE
    assert r.from_domain == "news.example.com"
    assert method(r, "dmarc")[0][1]["policy.dmarc"] == "quarantine"
    assert b"(p=reject sp=quarantine pct=100 dis=quarantine)" in r.header


def test_no_record_is_none(lookups: Lookups) -> None:
    r = check(lookups, message("a@none.example.org"), ip=BAD_IP, sender="a@none.example.org")
    assert r.dmarc == "none" and r.disposition == "none"
    assert method(r, "dmarc") == [("none", {"header.from": "none.example.org"})]


@pytest.mark.parametrize(("domain", "want", "policy"), [
    ("two.example.net", "none", None),          # two records: no policy (§6.6.3)
    ("badp.example.net", "none", None),         # invalid p=, no rua: not a record
    ("badprua.example.net", "fail", "none"),    # invalid p= with rua: p=none
    ("notdmarc.example.net", "none", None),     # not v=DMARC1: discarded
])
def test_record_rules(lookups: Lookups, domain: str, want: str, policy: str | None) -> None:
    r = check(lookups, message(f"a@{domain}"), ip=BAD_IP, sender=f"a@{domain}")
    assert r.dmarc == want and r.disposition == "none"
    assert method(r, "dmarc")[0][1].get("policy.dmarc") == policy


def test_policy_lookup_servfail_is_temperror(lookups: Lookups) -> None:
    r = check(lookups, message("a@tempdmarc.example.org"), ip=BAD_IP,
              sender="a@tempdmarc.example.org")
    assert r.dmarc == "temperror" and r.disposition == "none"


def _hashing(pct: int, inside: bool) -> bytes:
    for n in range(1000):
        msg = message("a@half.example.net", body=f"{n}\n".encode())
        if (int.from_bytes(hashlib.sha256(msg).digest()[:8], "big") % 100 < pct) == inside:
            return msg
    raise AssertionError("no such message")


def test_pct_sample_is_a_hash_of_the_message(lookups: Lookups) -> None:
    inside, outside = _hashing(50, True), _hashing(50, False)
    r = check(lookups, inside, ip=BAD_IP, sender="a@half.example.net")
    assert r.dmarc == "fail" and r.disposition == DmarcDisposition.REJECT
    r = check(lookups, outside, ip=BAD_IP, sender="a@half.example.net")
    assert r.dmarc == "fail" and r.disposition == DmarcDisposition.QUARANTINE  # one less
    r = check(lookups, message("a@zero.example.net"), ip=BAD_IP, sender="a@zero.example.net")
    assert r.dmarc == "fail" and r.disposition == DmarcDisposition.NONE


@pytest.mark.parametrize(("head", "want"), [
    (b"To: b@mx.test\n", "no From field"),
    (b"From: undisclosed\n", "From address has no valid domain"),
    (b"From: <>\n", "From has no address"),
    (b"From: a@exa mple..com\n", "From address has no valid domain"),
])
def test_from_missing_or_unparsable_is_permerror(lookups: Lookups, head: bytes,
                                                 want: str) -> None:
    r = check(lookups, head + b"Subject: x\n\nbody\n")
    assert r.dmarc == "permerror" and r.from_domain is None and r.disposition == "none"
    assert f"dmarc=permerror ({want})".encode() in r.header


def test_several_from_fields_of_one_domain_are_evaluated(lookups: Lookups) -> None:
    r = check(lookups, message("a@example.com", extra=b"From: b@example.com\n"), ip=BAD_IP,
              sender="x@example.com")
    assert r.dmarc == "fail" and r.disposition == "reject" and r.from_domain == "example.com"
    assert b"2 From fields" in r.header


def test_a_second_from_domain_cannot_wash_out_reject(lookups: Lookups) -> None:
    r = check(lookups, message("a@none.example.org, b@example.com"), ip=BAD_IP,
              sender="x@none.example.org")
    assert r.dmarc == "fail" and r.disposition == "reject"
    assert b"From names 2 domains" in r.header


def test_null_sender_aligns_through_the_helo_identity(lookups: Lookups) -> None:
    r = check(lookups, message("a@example.com"), sender="", helo="helo.example.com")
    assert r.spf == "pass" and r.dmarc == "pass"
    assert method(r, "spf") == [("pass", {"smtp.helo": "helo.example.com"})]


def test_organizational_domain_and_record_parsing() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("co.uk") == "co.uk"
    rec = parse_record(b"v=DMARC1; p=Quarantine; pct=7; adkim=s")
    assert rec is not None and (rec.p, rec.sp, rec.pct, rec.adkim, rec.aspf) == (
        "quarantine", "quarantine", 7, "s", "r")
    assert parse_record(b"p=reject; v=DMARC1") is None          # v= must come first
    bad_pct = parse_record(b"v=DMARC1; p=reject; pct=101")
    assert bad_pct is not None and bad_pct.pct == 100
    assert selected(b"x", 100) and not selected(b"x", 0)


# ---------------------------------------------------------------- ARC


def sealed(msg: bytes, ar: bytes = b"Authentication-Results: sealer.example; spf=pass\n"
           ) -> bytes:
    key = _dkimpy_key(SigningKey("sealer.example", "arc", KeyType.RSA, pem(rsa_key())))
    msg = ar + msg
    fields = dkim.arc_sign(msg, b"arc", b"sealer.example", key, b"sealer.example",
                           linesep=b"\n")
    return b"".join(fields) + msg


def test_arc_sealed_message_passes(lookups: Lookups) -> None:
    r = check(lookups, sealed(message()))
    assert r.arc == "pass" and method(r, "arc") == [("pass", {})]


def test_arc_tampered_message_fails(lookups: Lookups) -> None:
    r = check(lookups, sealed(message()).replace(b"Hello.", b"Hellp."))
    assert r.arc == "fail" and method(r, "arc")[0][0] == "fail"


def test_no_arc_fields_no_arc_entry(lookups: Lookups) -> None:
    r = check(lookups, message())
    assert r.arc is None and [m for m, _, _ in results(r)] == ["spf", "dkim", "dmarc"]


def test_an_incomplete_arc_set_fails(lookups: Lookups) -> None:
    """RFC 8617 §5.2 step 2: a set without its seal is a broken chain, not "none"."""
    r = check(lookups, message(extra=b"ARC-Authentication-Results: i=1; x.example; spf=pass\n"))
    assert r.arc == "fail" and b"arc=fail (Incomplete ARC set for instance 1)" in r.header


def test_arc_key_lookup_timeout_is_a_temporary_fail(server: DnsServer) -> None:
    msg = sealed(message())
    hang = DnsServer({**ZONE, "arc._domainkey.sealer.example": "TIMEOUT"})
    hang.start()
    try:
        r = check(make_lookups((("127.0.0.1", hang.port),)), msg, deadline=1.5)
    finally:
        hang.stop()
    assert r.arc == "fail" and r.arc_detail is not None
    assert r.arc_detail.reason.startswith("temporary: ")
    assert r.elapsed < 1.5 + 2
