"""The PROXY protocol parser (eqmail.smtp.proxy): proxy-protocol.txt's v1 and v2 headers,
fed as a balancer's bytes arrive; hostile and random input raises only ProxyError."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.smtp.proxy import (
    V1_MAX,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    Command,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    Reason,
    balancer_environment,
    encode_v1,
    encode_v2,
    parse_header,
    via,
)

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
port = st.integers(0, 65535)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6).map(tuple)


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    family = draw(st.sampled_from([ipv4, ipv6]))
    return (draw(family), draw(port)), (draw(family), draw(port))



def feed_split(data: bytes, cuts: list[int]) -> tuple[ProxyHeader | None, int]:
    """Feed ``data`` in pieces cut at ``cuts``; the header and how many bytes were taken."""
    parser = ProxyParser()
    taken, at = 0, 0
    for cut in sorted(set(cuts)) + [len(data)]:
        taken += parser.feed(data[at:cut])
        at = cut
    return parser.header, taken


# ---- round trips --------------------------------------------------------------------

@given(endpoints(), st.binary(max_size=64))
def test_v1_round_trip_leaves_what_follows(ends: tuple[tuple[str, int], tuple[str, int]],
                                           tail: bytes) -> None:
    src, dst = ends
    wire = encode_v1(src, dst)
    assert len(wire) <= V1_MAX
    parser = ProxyParser()
    assert parser.feed(wire + tail) == len(wire)
    assert parser.header == ProxyHeader(1, Command.PROXY, src, dst, len(wire))


@given(endpoints(), tlvs, st.binary(max_size=64))
def test_v2_round_trip_with_tlvs_leaves_what_follows(
        ends: tuple[tuple[str, int], tuple[str, int]], extra: tuple[tuple[int, bytes], ...],
        tail: bytes) -> None:
    src, dst = ends
    wire = encode_v2(src, dst, extra)
    parser = ProxyParser()
    assert parser.feed(wire + tail) == len(wire)
    assert parser.header == ProxyHeader(2, Command.PROXY, src, dst, len(wire))
    assert parser.header.relayed


@given(tlvs, st.binary(max_size=32))
def test_health_checks_name_no_client(extra: tuple[tuple[int, bytes], ...], tail: bytes) -> None:
    for wire in (encode_v1(None, None), b"PROXY UNKNOWN ignored 1.2.3.4 rest\r\n",
                 encode_v2(None, None, extra)):
        parser = ProxyParser()
        assert parser.feed(wire + tail) == len(wire)
        assert parser.header is not None and not parser.header.relayed
        assert parser.header.command is Command.LOCAL


def test_v2_local_ignores_its_address_block() -> None:
    # LOCAL with an INET family and addresses (what some balancers send): not used
    block = struct.pack("!4s4sHH", bytes(4), bytes(4), 1, 2)
    wire = V2_SIGNATURE + bytes([0x20, 0x11]) + struct.pack("!H", len(block)) + block
    assert parse_header(wire) == ProxyHeader(2, Command.LOCAL, length=len(wire))


def test_v2_unspec_and_unix_families_are_served_as_the_balancer() -> None:
    unspec = V2_SIGNATURE + bytes([0x21, 0x00, 0, 0])
    assert not parse_header(unspec).relayed
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"/s".ljust(216, b"\0")
    assert not parse_header(unix).relayed


@given(st.sampled_from([1, 2]), endpoints(), tlvs, st.binary(max_size=16))
@settings(max_examples=60)
def test_a_header_split_at_every_boundary_parses_the_same(
        version: int, ends: tuple[tuple[str, int], tuple[str, int]],
        extra: tuple[tuple[int, bytes], ...], tail: bytes) -> None:
    wire = encode_v1(*ends) if version == 1 else encode_v2(*ends, extra)
    whole = parse_header(wire + tail)
    for cut in range(len(wire) + len(tail) + 1):
        assert feed_split(wire + tail, [cut]) == (whole, len(wire)), cut
    assert feed_split(wire + tail, list(range(len(wire) + len(tail)))) == (whole, len(wire))


@given(st.sampled_from([1, 2]), endpoints(), tlvs, st.lists(st.integers(0, 300), max_size=8))
def test_any_split_parses_the_same(version: int, ends: tuple[tuple[str, int], tuple[str, int]],
                                   extra: tuple[tuple[int, bytes], ...], cuts: list[int]) -> None:
    wire = encode_v1(*ends) if version == 1 else encode_v2(*ends, extra)
    data = wire + b"EHLO x\r\n"
    assert feed_split(data, [min(c, len(data)) for c in cuts]) == (parse_header(data), len(wire))


def test_the_parser_asks_for_no_byte_past_a_v2_header() -> None:
    wire = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 25))
    parser = ProxyParser()
    assert parser.want() == V1_MAX  # the first peek covers either version's start
    assert parser.feed(wire[:5]) == 5
    assert parser.want() == 11  # the fixed part, which has the length
    assert parser.feed(wire[5:16]) == 11
    assert parser.want() == len(wire) - 16
    assert parser.feed(wire[16:] + b"\x16\x03\x01") == len(wire) - 16
    assert parser.want() == 0 and parser.done


# ---- random and hostile bytes ---------------------------------------------------------

@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6), st.booleans())
@settings(max_examples=500)
def test_random_bytes_raise_only_proxy_error(data: bytes, cuts: list[int], end: bool) -> None:
    parser = ProxyParser()
    at, taken = 0, 0
    try:
        for cut in sorted(min(c, len(data)) for c in cuts) + [len(data)]:
            got = parser.feed(data[at:cut])
            assert 0 <= got <= cut - at
            taken += got
            at = cut
        if end:
            parser.eof()
    except ProxyError as e:
        assert isinstance(e.reason, Reason)
        return
    assert taken <= len(data)
    if parser.header is not None:
        assert taken == parser.header.length


@given(st.sampled_from(["v1", "v2"]), st.data())
@settings(max_examples=400)
def test_mutated_headers_raise_only_proxy_error(version: str, data: st.DataObject) -> None:
    ends = data.draw(endpoints())
    wire = bytearray(encode_v1(*ends) if version == "v1" else encode_v2(*ends, data.draw(tlvs)))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        header = parse_header(bytes(wire[:cut]))
    except ProxyError:
        return
    assert header.length <= cut


def v2(ver_cmd: int, fam: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", size) + payload


V4_BLOCK = struct.pack("!4s4sHH", bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 4000, 25)


@pytest.mark.parametrize(("data", "reason"), [
    (b"EHLO client.example\r\n", Reason.NOT_PROXY),
    (b"\x16\x03\x01\x02\x00\x01", Reason.NOT_PROXY),  # a TLS ClientHello
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 " + b"9" * 80 + b"\r\n", Reason.TOO_LONG),
    (b"PROXY UNKNOWN " + b"x" * 100, Reason.TOO_LONG),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 25\n", Reason.MALFORMED),  # no CR
    (b"PROXY TCP4 192.0.2.1  192.0.2.2 4000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 25 \r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 04000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.01 192.0.2.2 4000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 ::1 ::1 4000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP6 192.0.2.1 192.0.2.2 4000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP6 fe80::1%eth0 ::1 4000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 \xd9\xa1 25\r\n", Reason.MALFORMED),  # Arabic-Indic 1
    (b"PROXY UDP4 192.0.2.1 192.0.2.2 4000 25\r\n", Reason.MALFORMED),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000\r\n", Reason.MALFORMED),
    (b"proxy TCP4 192.0.2.1 192.0.2.2 4000 25\r\n", Reason.NOT_PROXY),
    (b"PROXY TCP4 192.0.2.1\r 192.0.2.2 4000 25\r\n", Reason.MALFORMED),
    (v2(0x11, 0x11, V4_BLOCK), Reason.VERSION),
    (v2(0x31, 0x11, V4_BLOCK), Reason.VERSION),
    (v2(0x22, 0x11, V4_BLOCK), Reason.MALFORMED),  # command 2
    (v2(0x21, 0x12, V4_BLOCK), Reason.NOT_TCP),  # UDP
    (v2(0x21, 0x22, bytes(36)), Reason.NOT_TCP),
    (v2(0x21, 0x41, V4_BLOCK), Reason.MALFORMED),  # no such family
    (v2(0x21, 0x13, V4_BLOCK), Reason.MALFORMED),  # no such protocol
    (v2(0x21, 0x11, V4_BLOCK[:11]), Reason.MALFORMED),  # address block too short
    (v2(0x21, 0x21, bytes(35)), Reason.MALFORMED),
    (v2(0x21, 0x31, bytes(215)), Reason.MALFORMED),
    (v2(0x21, 0x11, V4_BLOCK + b"\x04\x00\x05ab"), Reason.MALFORMED),  # TLV past the end
    (v2(0x21, 0x11, V4_BLOCK + b"\x04\x00"), Reason.MALFORMED),  # half a TLV head
    (v2(0x21, 0x11, b"", length=V2_MAX_PAYLOAD + 1), Reason.TOO_LONG),
    (v2(0x21, 0x11, b"", length=65535), Reason.TOO_LONG),
    (V2_SIGNATURE[:7] + b"X" + V2_SIGNATURE[8:], Reason.NOT_PROXY),
    (b"\r\n\r\nQUIT\r\n", Reason.NOT_PROXY),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000", Reason.TRUNCATED),
    (v2(0x21, 0x11, V4_BLOCK)[:-1], Reason.TRUNCATED),
    (V2_SIGNATURE[:5], Reason.TRUNCATED),
    (b"", Reason.NOT_PROXY),
])
def test_hostile_headers(data: bytes, reason: Reason) -> None:
    with pytest.raises(ProxyError) as info:
        parse_header(data)
    assert info.value.reason is reason


def test_v1_at_its_limit_passes_one_byte_more_does_not() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(line) == V1_MAX and parse_header(line).length == V1_MAX
    with pytest.raises(ProxyError, match="too long"):
        parse_header(line[:-2] + b"x\r\n")
    longest = encode_v1(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff1", 65535),
                        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff2", 65535))
    assert len(longest) == 104 and parse_header(longest).relayed


def test_v2_at_its_bound_passes() -> None:
    wire = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), ((0x04, bytes(V2_MAX_PAYLOAD - 15)),))
    assert len(wire) == 16 + V2_MAX_PAYLOAD and parse_header(wire).relayed


def test_reasons_are_fixed_texts() -> None:
    # the listener logs and counts refusals by reason: client bytes never appear in one
    try:
        parse_header(b"PROXY TCP4 <script> 1 2 3\r\n")
    except ProxyError as e:
        assert str(e) == "malformed PROXY header"


def test_ipv4_mapped_addresses_and_the_environment() -> None:
    header = parse_header(encode_v2(("::ffff:192.0.2.7", 4000), ("::ffff:192.0.2.9", 25)))
    env = balancer_environment(("::ffff:127.0.0.1", 5555), header)
    assert env == {"PROXYIP": "127.0.0.1", "PROXYPORT": "5555",
                   "PROXYDESTIP": "192.0.2.9", "PROXYDESTPORT": "25"}
    assert balancer_environment(("127.0.0.1", 1), parse_header(b"PROXY UNKNOWN\r\n")) == {}
    assert via(("::1", 25)) == " via [::1]:25" and via(("::ffff:10.0.0.1", 7)) == " via 10.0.0.1:7"


@given(st.binary(max_size=108), st.binary(max_size=108), tlvs, st.binary(max_size=16))
def test_v2_unix_family_with_tlvs(src: bytes, dst: bytes, extra: tuple[tuple[int, bytes], ...],
                                  tail: bytes) -> None:
    # a client on a Unix socket of the balancer: no IP address, so served as the balancer
    block = src.ljust(108, b"\0") + dst.ljust(108, b"\0")
    body = block + b"".join(struct.pack("!BH", t, len(v)) + v for t, v in extra)
    wire = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body
    parser = ProxyParser()
    assert parser.feed(wire + tail) == len(wire)
    assert parser.header == ProxyHeader(2, Command.LOCAL, length=len(wire))
