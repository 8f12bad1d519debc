"""SPF (RFC 7208) through eqmail.auth: pyspf on our lookups, against a loopback DNS
server (tests/dnsserver.py), one case per result and per mechanism, and the same code
the qmail-spp plugin uses."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dnsserver import Behaviour, DnsServer, txt

from eqmail.auth import AuthPolicy, Inbound, Spf, authenticate, make_lookups
from eqmail.auth.dns import Budget
from eqmail.auth.spfcheck import check_host

ZONE = {
    "pass.example": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all")]},
    "fail.example": {"TXT": [txt("v=spf1 ip4:198.51.100.1 -all")]},
    "soft.example": {"TXT": [txt("v=spf1 ~all")]},
    "neutral.example": {"TXT": [txt("v=spf1 ?all")]},
    "nospf.example": {"TXT": [txt("some other text")]},
    "perm.example": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 bogus:x -all")]},
    "twice.example": {"TXT": [txt("v=spf1 -all"), txt("v=spf1 +all")]},
    "a.example": {"TXT": [txt("v=spf1 a -all")], "A": ["192.0.2.7"]},
    "mx.example": {"TXT": [txt("v=spf1 mx -all")], "MX": [(10, "mail.mx.example")]},
    "mail.mx.example": {"A": ["192.0.2.8"], "AAAA": ["2001:db8::8"]},
    "inc.example": {"TXT": [txt("v=spf1 include:pass.example -all")]},
    "redir.example": {"TXT": [txt("v=spf1 redirect=pass.example")]},
    "exists.example": {"TXT": [txt("v=spf1 exists:%{i}.ok.exists.example -all")]},
    "192.0.2.10.ok.exists.example": {"A": ["127.0.0.2"]},
    "ptr.example": {"TXT": [txt("v=spf1 ptr -all")]},
    "10.2.0.192.in-addr.arpa": {"PTR": ["host.ptr.example."]},
    "host.ptr.example": {"A": ["192.0.2.10"]},
    "exp.example": {"TXT": [txt("v=spf1 -all exp=why.exp.example")]},
    "why.exp.example": {"TXT": [txt("%{i} is not one of our servers")]},
    "temp.example": "SERVFAIL",
    "hang.example": "TIMEOUT",
    "inctemp.example": {"TXT": [txt("v=spf1 include:temp.example -all")]},
    "helo.example": {"TXT": [txt("v=spf1 ip4:192.0.2.10 -all")]},
    "loop.example": {"TXT": [txt("v=spf1 include:loop.example -all")]},
    "void.example": {"TXT": [txt("v=spf1 a:n1.void.example a:n2.void.example "
                                 "a:n3.void.example -all")]},
    "garbage.example": "GARBAGE",
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as srv:
        yield srv


def spf(server: DnsServer, sender: str, ip: str = "192.0.2.10", helo: str = "mx.client.example",
        deadline: float = 10.0) -> tuple[str, str]:
    budget = Budget(make_lookups((("127.0.0.1", server.port),)), time.monotonic() + deadline)
    r = check_host(budget, ip, sender, helo, "mx.test")
    return r.result.value, r.explanation


@pytest.mark.parametrize(("sender", "ip", "want"), [
    ("a@pass.example", "192.0.2.10", "pass"),
    ("a@pass.example", "2001:db8::1", "pass"),
    ("a@pass.example", "203.0.113.1", "fail"),
    ("a@fail.example", "192.0.2.10", "fail"),
    ("a@soft.example", "192.0.2.10", "softfail"),
    ("a@neutral.example", "192.0.2.10", "neutral"),
    ("a@nospf.example", "192.0.2.10", "none"),
    ("a@nxdomain.example", "192.0.2.10", "none"),
    ("a@perm.example", "192.0.2.10", "permerror"),
    ("a@twice.example", "192.0.2.10", "permerror"),       # RFC 7208 §4.5: two records
    ("a@a.example", "192.0.2.7", "pass"),
    ("a@a.example", "192.0.2.8", "fail"),
    ("a@mx.example", "192.0.2.8", "pass"),
    ("a@mx.example", "2001:db8::8", "pass"),
    ("a@mx.example", "192.0.2.7", "fail"),
    ("a@inc.example", "192.0.2.10", "pass"),
    ("a@inc.example", "198.51.100.9", "fail"),
    ("a@redir.example", "192.0.2.10", "pass"),
    ("a@exists.example", "192.0.2.10", "pass"),
    ("a@exists.example", "192.0.2.11", "fail"),
    ("a@ptr.example", "192.0.2.10", "pass"),
    ("a@ptr.example", "192.0.2.12", "fail"),
    ("a@temp.example", "192.0.2.10", "temperror"),
    ("a@inctemp.example", "192.0.2.10", "temperror"),
    ("a@garbage.example", "192.0.2.10", "temperror"),
    ("a@loop.example", "192.0.2.10", "permerror"),       # include loop: too many lookups
    ("a@void.example", "192.0.2.10", "permerror"),       # RFC 7208 §4.6.4: > 2 void lookups
])
def test_results(server: DnsServer, sender: str, ip: str, want: str) -> None:
    assert spf(server, sender, ip)[0] == want


def test_fail_explanation_is_the_domains_exp_text(server: DnsServer) -> None:
    assert spf(server, "a@exp.example") == ("fail", "192.0.2.10 is not one of our servers")


def test_null_sender_checks_the_helo_identity(server: DnsServer) -> None:
    assert spf(server, "", helo="helo.example")[0] == "pass"
    assert spf(server, "", ip="192.0.2.99", helo="helo.example")[0] == "fail"
    assert spf(server, "", helo="")[0] == "none"
    assert spf(server, "", helo="[192.0.2.10]") == ("none", "")     # pyspf: no record


def test_a_hanging_server_is_temperror_within_the_budget(server: DnsServer) -> None:
    t0 = time.monotonic()
    assert spf(server, "a@hang.example", deadline=1.5)[0] == "temperror"
    assert time.monotonic() - t0 < 1.5 + 2


def test_a_silent_server_is_temperror_within_the_budget() -> None:
    srv = DnsServer(ZONE)
    srv.start()
    srv.behaviour = Behaviour.SILENT
    try:
        t0 = time.monotonic()
        assert spf(srv, "a@pass.example", deadline=1.0)[0] == "temperror"
        assert time.monotonic() - t0 < 1.0 + 2
    finally:
        srv.stop()


def test_bad_client_ip_is_none(server: DnsServer) -> None:
    assert spf(server, "a@pass.example", ip="not-an-ip")[0] == "none"


def test_authenticate_reports_spf_in_the_header(server: DnsServer) -> None:
    lookups = make_lookups((("127.0.0.1", server.port),))
    msg = b"From: a@pass.example\nSubject: x\n\nbody\n"
    r = authenticate(Inbound("192.0.2.10", "mx.client.example", "a@pass.example", msg),
                     lookups, AuthPolicy("mx.test", 5))
    assert r.spf == Spf.PASS == "pass"
    assert r.header.startswith(b"Authentication-Results: mx.test;\n\tspf=pass ")
    assert b" smtp.mailfrom=a@pass.example;\n" in r.header
    r = authenticate(Inbound("192.0.2.10", "helo.example", "", msg), lookups,
                     AuthPolicy("mx.test", 5))
    assert r.spf == "pass" and b" smtp.helo=helo.example;\n" in r.header
