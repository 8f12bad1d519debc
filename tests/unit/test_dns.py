"""eqmail.dns against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
from dnsserver import DnsServer

from eqmail import dns as edns
from eqmail.dns import DnsProblem, MxAddress, candidates, literal_ip, order_mx

ZONE = {
    "example.net": {"MX": [(20, "backup.example.net"), (10, "mx1.example.net"), (10, "mx2.example.net")]},
    "mx1.example.net": {"AAAA": ["2001:db8::1", "2001:db8::11"], "A": ["192.0.2.1", "192.0.2.11"]},
    "mx2.example.net": {"CNAME": "real2.example.net"},
    "real2.example.net": {"A": ["192.0.2.2"]},
    "backup.example.net": {"A": ["192.0.2.3"]},
    "nomx.example.net": {"A": ["192.0.2.4"], "AAAA": ["2001:db8::4"]},
    "empty.example.net": {"TXT": ["x"]},
    "softmx.example.net": {"MX": [(10, "broken.example.net"), (20, "backup.example.net")]},
    "allsoft.example.net": {"MX": [(10, "broken.example.net")]},
    "deadmx.example.net": {"MX": [(10, "gone.example.net")]},
    "broken.example.net": "SERVFAIL",
    "slow.example.net": "TIMEOUT",
    "alias.example.net": {"CNAME": "example.net"},
    "many.example.net": {"A": [f"192.0.2.{i}" for i in range(1, 101)]},  # > 1232 bytes: TCP
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as srv:
        yield srv


def resolver(server: DnsServer, lifetime: float = 3.0, seed: int = 1) -> edns.Resolver:
    return edns.Resolver((("127.0.0.1", server.port),), lifetime, random.Random(seed))


def test_mx_lowest_preference_first_ipv6_first_all_records(server: DnsServer) -> None:
    addrs = resolver(server).mx_addresses("example.net")
    assert [a.pref for a in addrs] == [10, 10, 10, 10, 10, 20]
    by_host: dict[str, list[str]] = {}
    for a in addrs:
        by_host.setdefault(a.host, []).append(a.ip)
    # IPv6 first; within one RRset the order is the server's (dnspython shuffles)
    v6, v4 = by_host["mx1.example.net"][:2], by_host["mx1.example.net"][2:]
    assert set(v6) == {"2001:db8::1", "2001:db8::11"} and set(v4) == {"192.0.2.1", "192.0.2.11"}
    assert by_host["mx2.example.net"] == ["192.0.2.2"]  # CNAME chain followed
    assert addrs[-1] == MxAddress("192.0.2.3", 20, "backup.example.net")


def test_equal_preferences_are_shuffled(server: DnsServer) -> None:
    firsts = {resolver(server, seed=s).mx_addresses("example.net")[0].host for s in range(12)}
    assert firsts == {"mx1.example.net", "mx2.example.net"}


def test_no_mx_uses_the_host_itself(server: DnsServer) -> None:
    addrs = resolver(server).mx_addresses("nomx.example.net")
    assert [(a.ip, a.pref) for a in addrs] == [("2001:db8::4", 0), ("192.0.2.4", 0)]


def test_texts_for_failures(server: DnsServer) -> None:
    r = resolver(server)
    with pytest.raises(edns.DnsFailure) as e:
        r.mx_addresses("nowhere.example.net")
    assert e.value.problem == DnsProblem(True, "Sorry, I couldn't find any host named nowhere.example.net. (#5.1.2)\n")
    with pytest.raises(edns.DnsFailure) as e:
        r.mx_addresses("broken.example.net")
    assert e.value.problem == DnsProblem(False, "Sorry, I couldn't find any host by that name. (#4.1.2)\n")
    with pytest.raises(edns.DnsFailure) as e:
        r.mx_addresses("empty.example.net")
    assert e.value.problem == DnsProblem(True, "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n")
    with pytest.raises(edns.DnsFailure) as e:
        r.mx_addresses("deadmx.example.net")
    assert e.value.problem == edns.PERM_NOMX


def test_soft_failure_tolerated_while_an_address_is_known(server: DnsServer) -> None:
    r = resolver(server)
    assert [a.ip for a in r.mx_addresses("softmx.example.net")] == ["192.0.2.3"]
    with pytest.raises(edns.DnsFailure) as e:
        r.mx_addresses("allsoft.example.net")
    assert e.value.problem == edns.TEMP_DNS


def test_timeout_is_soft_and_bounded(server: DnsServer) -> None:
    start = time.monotonic()
    with pytest.raises(edns.DnsFailure) as e:
        resolver(server, lifetime=1.0).mx_addresses("slow.example.net")
    assert e.value.problem == edns.TEMP_DNS
    assert time.monotonic() - start < 4


def test_big_answer_over_tcp_is_capped(server: DnsServer) -> None:
    addrs = resolver(server).host_addresses("many.example.net")
    assert len(addrs) == edns.MAX_ADDRS
    assert {a.ip for a in addrs} <= {f"192.0.2.{i}" for i in range(1, 101)}


def test_literals_and_relay(server: DnsServer) -> None:
    r = resolver(server)
    assert r.mx_addresses("[192.0.2.9]") == [MxAddress("192.0.2.9", 0, "")]
    assert r.host_addresses("[2001:db8::9]") == [MxAddress("2001:db8::9", 0, "")]
    assert literal_ip("[IPv6:2001:DB8::9]") == "2001:db8::9"
    assert literal_ip("1.2.3.4") == "1.2.3.4"
    assert literal_ip("2001:db8::1") is None
    assert literal_ip("mx.example.net") is None
    with pytest.raises(edns.DnsFailure) as e:
        r.host_addresses("relay.nowhere.example.net")
    assert e.value.problem == DnsProblem(
        True, "Sorry, I couldn't find any host named relay.nowhere.example.net. (#5.1.2)\n")


def test_cname_canonicalisation(server: DnsServer) -> None:
    r = resolver(server)
    assert r.canonical("alias.example.net") == "example.net"
    assert r.canonical("example.net") == "example.net"
    assert r.canonical("nowhere.example.net") == "nowhere.example.net"
    with pytest.raises(edns.DnsFailure) as e:
        r.canonical("broken.example.net")
    assert e.value.problem == DnsProblem(False, "CNAME lookup failed temporarily. (#4.4.3)\n")


def test_self_mx_rule() -> None:
    addrs = [MxAddress("192.0.2.1", 10, "a"), MxAddress("127.0.0.1", 20, "me"),
             MxAddress("192.0.2.3", 30, "c")]
    me = frozenset({"127.0.0.1", "::1"})
    assert [a.ip for a in candidates(addrs, me, None)] == ["192.0.2.1"]
    assert len(candidates(addrs, me, edns.PREF_ROUTE)) == 3
    with pytest.raises(edns.DnsFailure) as e:
        candidates([MxAddress("::1", 0, "")], me, None)
    assert e.value.problem.permanent
    assert e.value.problem.text.startswith("Sorry. Although I'm listed as a best-preference MX or A")
    assert e.value.problem.text.endswith("so I don't treat it as local. (#5.4.6)\n")


def test_order_mx_is_stable_by_preference() -> None:
    recs = [(30, "c"), (10, "a"), (20, "b")]
    assert order_mx(recs, random.Random(3)) == [(10, "a"), (20, "b"), (30, "c")]




def test_permanence_agrees_with_the_enhanced_code() -> None:
    """qmail-remote's perm_* texts carry a #5.x.x code, its temp_* ones a #4.x.x."""
    for problem in (edns.TEMP_DNS, edns.PERM_NOMX, edns.TEMP_CNAME, edns.PERM_AMBIGMX,
                    edns.perm_dns("x.test")):
        assert ("(#5." in problem.text) is problem.permanent, problem
        assert ("(#4." in problem.text) is not problem.permanent, problem
