"""eqmail.auth.dns: the one DNS path of the inbound checks, against a loopback DNS server
(UDP, TCP on truncation, IPv6), and the per-message Budget."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dnsserver import Behaviour, DnsServer, txt

from eqmail.auth.dns import Budget, DnsTempError, Lookups, make_lookups

ZONE = {
    "a.example": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"],
                  "MX": [(10, "mx.a.example"), (20, "mx2.a.example")],
                  "TXT": [txt("v=spf1 -all"), '"two" "strings"']},
    "1.2.0.192.in-addr.arpa": {"PTR": ["host.a.example."]},
    "long.example": {"TXT": [txt("x" * 3000)]},
    "alias.example": {"CNAME": "a.example"},
    "broken.example": "SERVFAIL",
    "slow.example": "TIMEOUT",
    "garbage.example": "GARBAGE",
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as srv:
        yield srv


@pytest.fixture(scope="module")
def lookups(server: DnsServer) -> Lookups:
    return make_lookups((("127.0.0.1", server.port),))


def test_answers(lookups: Lookups) -> None:
    assert sorted(lookups.addresses("a.example", "A", 2)) == ["192.0.2.1", "192.0.2.2"]
    assert lookups.addresses("a.example", "AAAA", 2) == ["2001:db8::1"]
    assert sorted(lookups.mx("a.example", 2)) == [(10, "mx.a.example"), (20, "mx2.a.example")]
    assert lookups.ptr("1.2.0.192.in-addr.arpa", 2) == ["host.a.example"]
    assert sorted(lookups.txt("a.example", 2)) == [(b"two", b"strings"), (b"v=spf1 -all",)]
    assert b"".join(lookups.txt("long.example", 2)[0]) == b"x" * 3000   # over TCP
    assert lookups.addresses("alias.example", "A", 2)                    # CNAME chased


def test_nxdomain_nodata_and_impossible_names_are_empty(lookups: Lookups) -> None:
    assert lookups.txt("nowhere.example", 2) == []
    assert lookups.mx("1.2.0.192.in-addr.arpa", 2) == []
    assert lookups.txt("x" * 70 + ".example", 2) == []
    assert lookups.txt(("a" * 60 + ".") * 5 + "example", 2) == []


@pytest.mark.parametrize("name", ["broken.example", "garbage.example"])
def test_servfail_and_garbage_are_temporary(lookups: Lookups, name: str) -> None:
    with pytest.raises(DnsTempError):
        lookups.txt(name, 2)


def test_a_hang_is_temporary_within_the_time_given(lookups: Lookups) -> None:
    t0 = time.monotonic()
    with pytest.raises(DnsTempError):
        lookups.txt("slow.example", 1.0)
    assert time.monotonic() - t0 < 1.0 + 1


def test_an_ipv6_server() -> None:
    srv = DnsServer(ZONE, host="::1")
    srv.start()
    try:
        assert make_lookups((("::1", srv.port),)).addresses("a.example", "A", 2)
    finally:
        srv.stop()


def test_budget_shares_the_deadline_and_asks_nothing_after_it(server: DnsServer) -> None:
    server.behaviour = Behaviour.SILENT
    try:
        budget = Budget(make_lookups((("127.0.0.1", server.port),)), time.monotonic() + 1.0)
        t0 = time.monotonic()
        for _ in range(5):
            with pytest.raises(DnsTempError):
                budget.txt("a.example")
        assert time.monotonic() - t0 < 1.0 + 1
        before = len(server.queries)
        with pytest.raises(DnsTempError, match="used up"):
            budget.mx("a.example")
        assert len(server.queries) == before
    finally:
        server.behaviour = Behaviour.NORMAL


class Broken:
    def txt(self, name: str, timeout: float) -> list[tuple[bytes, ...]]:
        raise RuntimeError("bug")

    def addresses(self, name: str, rdtype: str, timeout: float) -> list[str]:
        raise KeyError(name)

    def mx(self, name: str, timeout: float) -> list[tuple[int, str]]:
        return []

    def ptr(self, name: str, timeout: float) -> list[str]:
        return []


def test_a_lookups_that_breaks_its_contract_is_temporary() -> None:
    budget = Budget(Broken(), time.monotonic() + 5)
    with pytest.raises(DnsTempError, match="RuntimeError"):
        budget.txt("a.example")
    with pytest.raises(DnsTempError, match="KeyError"):
        budget.addresses("a.example", "A")
    assert budget.count == 2
