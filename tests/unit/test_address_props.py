"""Hypothesis properties of qmail-smtpd's address parsing (eqmail.smtp.address) and the
rcpthosts/badmailfrom matchers (test_smtp_address.py has the worked examples).

- parse_address, parse_mail_params and domain_of never raise, whatever the bytes;
- any address round-trips through ``<...>``, through qmail's quoting of every byte
  and through a source route; ``FROM:addr`` without brackets ends at a space;
- the result is never longer than qmail's 899 bytes; every byte survives (surrogateescape);
- SIZE= takes at most 20 leading digits; AUTH= decodes +2B/+3D only;
- rcpthosts and badmailfrom are case-insensitive and look at the last ``@``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.smtp.address import MAX_ADDRESS, domain_of, parse_address, parse_mail_params
from eqmail.smtp.policy import BadMailFrom, RcptHosts
from eqmail.textio import decode, encode

plain = st.binary(max_size=60).filter(lambda b: not set(b) & set(b'<>"\\ '))
label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)
domains = st.lists(label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=500)
@given(st.binary(max_size=1200), st.booleans())
def test_parse_address_never_raises_and_is_bounded(arg: bytes, localip: bool) -> None:
    addr = parse_address(arg, frozenset({"127.0.0.1"}), "me.example" if localip else None)
    if addr is not None:
        assert len(encode(addr)) <= MAX_ADDRESS
        assert decode(encode(addr)) == addr


@given(plain.filter(lambda b: not b.startswith(b"@")))  # a leading @ is a source route
def test_bracketed_address_round_trips(addr: bytes) -> None:
    assert parse_address(b"TO:<" + addr + b">") == decode(addr)
    assert parse_address(b"FROM:<" + addr + b"> SIZE=1 BODY=8BITMIME") == decode(addr)


@given(st.binary(max_size=80))
def test_quoting_every_byte_gives_the_same_address(addr: bytes) -> None:
    quoted = b"".join(b"\\" + bytes([c]) for c in addr)
    expected = parse_address(b"<" + quoted + b">")
    assert expected == decode(addr)
    assert parse_address(b'<"' + addr.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'">') == decode(addr)


@given(plain.filter(lambda b: not b.startswith(b"@")), st.lists(domains, min_size=1, max_size=3))
def test_source_route_is_dropped(addr: bytes, route: list[str]) -> None:
    prefix = ",".join("@" + r for r in route).encode() + b":"
    assert parse_address(b"<" + prefix + addr + b">") == decode(addr)


@given(plain.filter(lambda b: b != b"" and not b.startswith(b"@")), st.binary(max_size=20))
def test_unbracketed_address_ends_at_a_space(addr: bytes, rest: bytes) -> None:
    assert parse_address(b"FROM:  " + addr + b" " + rest.replace(b"<", b"")) == decode(addr)


@given(st.binary(max_size=MAX_ADDRESS + 50).filter(lambda b: not set(b) & set(b'<>"\\ @')))
def test_length_limit_is_exactly_899(addr: bytes) -> None:
    result = parse_address(b"<" + addr + b">")
    assert (result is None) == (len(addr) > MAX_ADDRESS)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_mail_params_never_raise(arg: bytes) -> None:
    p = parse_mail_params(arg)
    assert p.size is None or 0 <= p.size < 10**20


@given(st.integers(min_value=0, max_value=10**30), st.sampled_from([b"SIZE=", b"size=", b"SiZe="]),
       st.binary(max_size=5).filter(lambda b: not b[:1].isdigit() and b" " not in b))
def test_size_takes_leading_digits_bounded(n: int, key: bytes, junk: bytes) -> None:
    p = parse_mail_params(b"FROM:<a@b> " + key + str(n).encode() + junk)
    assert p.size == int(str(n)[:20])


@given(st.text(alphabet="ab+=x2B3D", max_size=30))
def test_auth_xtext_decodes_only_plus_and_equals(value: str) -> None:
    raw = value.replace("+", "+2B").replace("=", "+3D")
    assert parse_mail_params(b"FROM:<a@b> AUTH=" + raw.encode()).auth == value


@given(st.text(max_size=40))
def test_domain_of_is_after_the_last_at(address: str) -> None:
    d = domain_of(address)
    assert d == (address.rsplit("@", 1)[1] if "@" in address else None)


@given(st.text(alphabet="abc.@", max_size=20), domains, st.booleans())
def test_rcpthosts_case_insensitive_on_the_last_at(local: str, domain: str, upper: bool) -> None:
    hosts = RcptHosts.from_lines([domain])
    addr = f"{local}@{domain.upper() if upper else domain}"
    assert hosts.allows(addr)
    assert not hosts.allows(f"{addr}@other-{domain}x")
    assert hosts.allows(f"{local}@sub.{domain}") == hosts.allows(f"x@sub.{domain}")


@given(st.text(alphabet="abc.", min_size=1, max_size=10), domains, st.booleans())
def test_badmailfrom_address_and_domain_entries(local: str, domain: str, upper: bool) -> None:
    addr = f"{local}@{domain}"
    shown = addr.upper() if upper else addr
    assert BadMailFrom.from_lines([addr]).matches(shown)
    assert BadMailFrom.from_lines(["@" + domain]).matches(shown)
    assert not BadMailFrom.from_lines(["@x" + domain]).matches(shown)
    assert not BadMailFrom.from_lines([addr]).matches("")
