"""Hypothesis properties of control/tcp.smtp (eqmail.tcprules); test_tcprules.py has the
worked examples of tcpserver's lookup order.

- any text parses to Rules or raises ControlFileError naming the file and a line that
  exists; matching never raises, whatever the peer address, host or info strings;
- rules generated from real addresses behave like tcpserver: the exact address beats
  every prefix, the longest prefix wins, the first of two rules with the same key wins,
  IPv4 peers on an IPv6 socket (``::ffff:a.b.c.d``) match their IPv4 rules, any IPv6
  spelling of an address matches, ranges cover exactly their addresses, no rule means
  allow;
- variable values round-trip through every quoting tcprules allows.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eqmail.errors import ControlFileError
from eqmail.tcprules import RuleResult, Rules

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
names = st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True)
values = st.text(alphabet="abc123 ,:=.@-_/", max_size=12)
rule_text = st.text(alphabet="0123456789.:/-=@,abcdefxyzAXY_\"'\n#allowdeny", max_size=120)


@settings(max_examples=500)
@given(st.one_of(rule_text, st.text(max_size=80)))
def test_any_text_gives_rules_or_a_control_file_error(text: str) -> None:
    try:
        rules = Rules.parse(text, "control/tcp.smtp")
    except ControlFileError as e:
        assert e.file == "control/tcp.smtp"
        assert 1 <= e.line <= len(text.splitlines())
        return
    assert isinstance(rules.match("192.0.2.1"), RuleResult)


@settings(max_examples=300)
@given(st.text(alphabet="0123456789.:abcdef%fxz", max_size=45),
       st.one_of(st.none(), st.text(max_size=20)), st.one_of(st.none(), st.text(max_size=10)))
def test_match_never_raises(ip: str, host: str | None, info: str | None) -> None:
    rules = Rules.parse("127.:allow,A=1\n=.example.com:deny\nx@10.1.:allow\n::1:allow\n:deny\n", "f")
    assert isinstance(rules.match(ip, host, info), RuleResult)


@given(ipv4, st.integers(1, 3))
def test_exact_address_beats_prefix_and_longest_prefix_wins(ip: str, octets: int) -> None:
    parts = ip.split(".")
    short = ".".join(parts[:1]) + "."
    long_ = ".".join(parts[:octets]) + "."
    text = f"{short}:allow,WHO=short\n{long_}:allow,WHO=long\n{ip}:deny\n:allow,WHO=default\n"
    rules = Rules.parse(text, "f")
    assert rules.match(ip) == RuleResult(False, {})
    other = ".".join(parts[:3] + [str((int(parts[3]) + 1) % 256)])
    assume(other != ip)
    # with one octet both prefixes are the same key: the first line wins
    assert rules.match(other).env == {"WHO": "short" if octets == 1 else "long"}


networks = st.builds(lambda ip, plen: ipaddress.IPv4Network((ip, plen), strict=False),
                     st.ip_addresses(v=4), st.integers(1, 31))


@given(networks, st.data())
def test_cidr_prefix_covers_exactly_its_network(net: ipaddress.IPv4Network, data: st.DataObject) -> None:
    rules = Rules.parse(f"{net}:allow,IN=1\n:deny\n", "f")
    inside = data.draw(st.integers(0, net.num_addresses - 1))
    assert rules.match(str(net.network_address + inside)).allow
    outside = data.draw(st.ip_addresses(v=4))
    assert rules.match(str(outside)).allow == (outside in net)


@given(ipv4, st.integers(0, 255), st.integers(0, 255))
def test_last_octet_range(ip: str, low: int, high: int) -> None:
    low, high = min(low, high), max(low, high)
    stem = ip.rsplit(".", 1)[0]
    rules = Rules.parse(f"{stem}.{low}-{high}:allow,R=1\n:deny\n", "f")
    for n in {low, high, (low + high) // 2, max(0, low - 1), min(255, high + 1)}:
        assert rules.match(f"{stem}.{n}").allow == (low <= n <= high)


@given(ipv4)
def test_ipv4_mapped_peer_matches_ipv4_rules(ip: str) -> None:
    rules = Rules.parse(f"{ip}:allow,V4=1\n:deny\n", "f")
    assert rules.match(f"::ffff:{ip}") == RuleResult(True, {"V4": "1"})


@given(ipv6)
def test_any_ipv6_spelling_matches(ip: str) -> None:
    addr = ipaddress.IPv6Address(ip)
    rules = Rules.parse(f"{addr.exploded}:allow,V6=1\n:deny\n", "f")
    assert rules.match(addr.compressed) == RuleResult(True, {"V6": "1"})
    assert rules.match(addr.exploded.upper()) == RuleResult(True, {"V6": "1"})


@given(ipv4, ipv6)
def test_first_rule_with_a_key_wins_and_no_rule_allows(ip4: str, ip6: str) -> None:
    rules = Rules.parse(f"{ip4}:allow,N=first\n{ip4}:deny\n", "f")
    assert rules.match(ip4) == RuleResult(True, {"N": "first"})
    assert rules.match(ip6) == RuleResult(True, {})


@given(st.dictionaries(names, values, max_size=4), st.sampled_from(['"', "/", "'", "|"]))
def test_values_round_trip_through_quoting(env: dict[str, str], quote: str) -> None:
    assume(all(quote not in v for v in env.values()))
    text = "".join(f",{k}={quote}{v}{quote}" for k, v in env.items())
    assert Rules.parse(f"10.:allow{text}\n", "f").match("10.1.2.3") == RuleResult(True, env)


@given(st.dictionaries(names, st.text(alphabet="abc123.@-_", min_size=1, max_size=8), max_size=4))
def test_bare_values(env: dict[str, str]) -> None:
    """eqmail's extension: a value without quotes runs to the next comma."""
    text = "".join(f",{k}={v}" for k, v in env.items())
    assert Rules.parse(f":allow{text}\n", "f").match("203.0.113.7") == RuleResult(True, env)


@pytest.mark.parametrize("bad", ["1.2.3.256:allow", "1.2.3.4/33:allow", "::g:allow", "1.2.3.4:allow,=x"])
def test_bad_lines_name_their_line(bad: str) -> None:
    with pytest.raises(ControlFileError) as e:
        Rules.parse(f"127.:allow\n# c\n\n{bad}\n", "control/tcp.smtp")
    assert e.value.line == 4
