"""eqmail.dkim.dns.dnspython_txt_lookup against the loopback DNS server of the tests:
NXDOMAIN and no TXT are permanent, SERVFAIL, silence and garbage temporary, a record's
strings are joined, several records stay apart; each lookup is bounded in time."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dnsserver import Behaviour, DnsServer

from eqmail.dkim.dns import DnsPermError, DnsTempError, dnspython_txt_lookup

LONG = "A" * 300
ZONE = {
    "s1._domainkey.example.com": {"TXT": ['"v=DKIM1; k=rsa; " "p=QUJD"']},
    "two._domainkey.example.com": {"TXT": ['"v=DKIM1; p=QUJD"', '"v=DKIM1; p=REVG"']},
    "long._domainkey.example.com": {"TXT": [f'"{LONG[:255]}" "{LONG[255:]}"']},
    "a-only.example.com": {"A": ["192.0.2.1"]},
    "broken.example.com": "SERVFAIL",
    "slow.example.com": "TIMEOUT",
    "junk.example.com": "GARBAGE",
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as srv:
        yield srv


def test_answers(server: DnsServer) -> None:
    lookup = dnspython_txt_lookup((("127.0.0.1", server.port),), 2.0)
    assert lookup("s1._domainkey.example.com") == [b"v=DKIM1; k=rsa; p=QUJD"]
    assert sorted(lookup("two._domainkey.example.com")) == [b"v=DKIM1; p=QUJD", b"v=DKIM1; p=REVG"]
    assert lookup("LONG._domainkey.example.com.") == [LONG.encode()]


@pytest.mark.parametrize("name,error", [
    ("nothing.example.com", DnsPermError),        # NXDOMAIN
    ("a-only.example.com", DnsPermError),         # NOERROR, no TXT
    ("broken.example.com", DnsTempError),         # SERVFAIL
    ("slow.example.com", DnsTempError),           # never answered
    ("junk.example.com", DnsTempError),           # a malformed answer
    ("x" * 64 + ".example.com", DnsPermError),    # not a DNS name
])
def test_errors(server: DnsServer, name: str, error: type[Exception]) -> None:
    lookup = dnspython_txt_lookup((("127.0.0.1", server.port),), 1.0)
    t0 = time.monotonic()
    with pytest.raises(error):
        lookup(name)
    assert time.monotonic() - t0 < 5


def test_a_silent_server_is_temporary_and_bounded() -> None:
    srv = DnsServer(ZONE)
    srv.behaviour = Behaviour.SILENT
    srv.start()
    try:
        lookup = dnspython_txt_lookup((("127.0.0.1", srv.port),), 0.5)
        t0 = time.monotonic()
        with pytest.raises(DnsTempError):
            lookup("s1._domainkey.example.com")
        assert time.monotonic() - t0 < 3
    finally:
        srv.stop()


def test_an_ipv6_server(server: DnsServer) -> None:
    v6 = DnsServer(ZONE, host="::1")
    try:
        port6 = v6.start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        lookup = dnspython_txt_lookup((("::1", port6),), 2.0)
        assert lookup("s1._domainkey.example.com") == [b"v=DKIM1; k=rsa; p=QUJD"]
    finally:
        v6.stop()
