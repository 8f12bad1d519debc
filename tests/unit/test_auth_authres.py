"""The Authentication-Results field eqmail writes (RFC 8601: quoting, comments, folding,
no byte of the peer's able to break out of it) and ForgedResultsFilter (RFC 8601 §5),
with Hypothesis for both: authenticate() never raises on arbitrary input, the field it
writes always parses, and the filter removes exactly the fields claiming our id."""

from __future__ import annotations

import re
import time

import authres
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.auth import AuthPolicy, ForgedResultsFilter, Inbound, authenticate
from eqmail.auth.authres import ResInfo, authserv_id, format_field, value


class Nothing:
    """A Lookups that finds nothing anywhere (NXDOMAIN for every name)."""

    def txt(self, name: str, timeout: float) -> list[tuple[bytes, ...]]:
        return []

    def addresses(self, name: str, rdtype: str, timeout: float) -> list[str]:
        return []

    def mx(self, name: str, timeout: float) -> list[tuple[int, str]]:
        return []

    def ptr(self, name: str, timeout: float) -> list[str]:
        return []


def parse(field: bytes) -> authres.AuthenticationResultsHeader:
    return authres.AuthenticationResultsHeader.parse(
        field.decode("ascii").replace("\n", "\r\n").rstrip("\r\n"))


def well_formed(field: bytes) -> None:
    """ASCII, LF line ends only, every continuation line starts with a tab, no control
    byte but the line ends and tabs: nothing the peer sent can start a field of its own."""
    assert field.startswith(b"Authentication-Results: ") and field.endswith(b"\n")
    assert all(b == 9 or b == 10 or 32 <= b < 127 for b in field)
    for line in field[:-1].split(b"\n")[1:]:
        assert line.startswith(b"\t")


# ---------------------------------------------------------------- writing


def test_values_are_tokens_addresses_or_quoted_strings() -> None:
    assert value("example.com") == "example.com"
    assert value("user@example.com") == "user@example.com"
    assert value("a b@example.com") == '"a b@example.com"'
    assert value('x"y\\z') == '"x\\"y\\\\z"'
    assert value("a;b") == '"a;b"'
    assert value("bad\r\nX-Evil: 1\0") == '"bad??X-Evil: 1?"'


def test_folding_keeps_lines_short() -> None:
    field = format_field("mx.test", [
        ResInfo("dkim", "pass", "a reason that is long enough to need a fold of its own here",
                (("header", "d", "example.com"), ("header", "s", "selector2026"),
                 ("header", "b", "abcdEFGH"))),
        ResInfo("spf", "pass", "", (("smtp", "mailfrom", "someone@example.com"),))])
    assert all(len(line) <= 78 for line in field.decode().splitlines())
    assert [(r.method, r.result) for r in parse(field).results] == [("dkim", "pass"),
                                                                    ("spf", "pass")]
    assert format_field("mx.test", []) == b"Authentication-Results: mx.test; none\n"


def test_injection_in_identities_stays_inside_the_field() -> None:
    evil = "evil.example\r\nAuthentication-Results: mx.test; dkim=pass\0(x)"
    r = authenticate(Inbound("192.0.2.1", evil, "", b"From: a@b.example\n\nx\n"), Nothing(),
                     AuthPolicy("mx.test", 1))
    well_formed(r.header)
    assert [ln for ln in r.header.split(b"\n") if not ln.startswith(b"\t")] == [
        b"Authentication-Results: mx.test;", b""]
    assert b'smtp.helo="evil.example??Authentication-Results: mx.test; dkim=pass?(x)"' \
        in r.header
    assert [x.method for x in parse(r.header).results] == ["spf", "dkim", "dmarc"]
    r = authenticate(Inbound("192.0.2.1", "h", "a\n\tb;dkim=pass@example.com\0",
                             b"From: a@b.example\n\nx\n"), Nothing(), AuthPolicy("mx.test", 1))
    well_formed(r.header)
    assert [x.result for x in parse(r.header).results] == ["none", "none", "none"]


def test_comment_text_cannot_close_the_comment_early() -> None:
    field = format_field("mx.test", [ResInfo("spf", "fail", "a) dmarc=pass (b \\")])
    assert parse(field).results[0].result == "fail"
    assert len(parse(field).results) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.binary(max_size=3000), helo=st.text(max_size=80),
       sender=st.text(max_size=80), ip=st.sampled_from(["192.0.2.1", "2001:db8::1", "x", ""]))
def test_authenticate_never_raises_and_writes_a_parsable_field(
        message: bytes, helo: str, sender: str, ip: str) -> None:
    r = authenticate(Inbound(ip, helo, sender, message), Nothing(), AuthPolicy("mx.test", 1))
    well_formed(r.header)
    assert [x.method for x in parse(r.header).results][:1] == ["spf"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([
    b"From: a@example.com\n", b"From: b@other.example\n", b"From: <>\n", b"From:\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=x; h=from; bh=; b=\n",
    b"DKIM-Signature: v=1; l=99999999999999999999999; d=\xff\n",
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x; s=y; b=\n",
    b"ARC-Message-Signature: i=1; a=rsa-sha256; d=x; s=y; h=from; bh=; b=\n",
    b"ARC-Authentication-Results: i=1; x; spf=pass\n",
    b" folded\n", b"\tfolded\r\n", b"\n", b"body\n", b"\r\n", b"X: \x00\x01\x7f\xff\n",
]), max_size=12))
def test_hostile_structures_get_results(parts: list[bytes]) -> None:
    r = authenticate(Inbound("192.0.2.1", "h.example", "a@example.com", b"".join(parts)),
                     Nothing(), AuthPolicy("mx.test", 1))
    well_formed(r.header)
    parse(r.header)


# ---------------------------------------------------------------- the filter


def lines(data: bytes) -> list[bytes]:
    return re.findall(rb"[^\n]*\n|[^\n]+$", data)


def run(data: bytes, ours: str = "mx.test") -> bytes:
    f = ForgedResultsFilter(ours)
    return b"".join(f.feed(line) for line in lines(data)) + f.finish()


def test_filter_removes_ours_and_keeps_the_rest() -> None:
    data = (b"Received: from x\r\n\tby y\r\n"
            b"Authentication-Results: MX.Test; dkim=pass\r\n\theader.d=bank.example\r\n"
            b"Authentication-Results: other.example; spf=pass\r\n"
            b"authentication-results :\r\n (comment) \"mx.test\" 1; none\r\n"
            b"Authentication-Results:\r\n\tmx.test;\r\n\tspf=pass\r\n"
            b"Authentication-Results: mx.test.evil; spf=pass\r\n"
            b"ARC-Authentication-Results: i=1; mx.test; spf=pass\r\n"
            b"Subject: s\r\n\r\n"
            b"Authentication-Results: mx.test; body text, not a field\r\n")
    assert run(data) == (b"Received: from x\r\n\tby y\r\n"
                         b"Authentication-Results: other.example; spf=pass\r\n"
                         b"Authentication-Results: mx.test.evil; spf=pass\r\n"
                         b"ARC-Authentication-Results: i=1; mx.test; spf=pass\r\n"
                         b"Subject: s\r\n\r\n"
                         b"Authentication-Results: mx.test; body text, not a field\r\n")


def test_filter_holds_a_field_until_its_id_is_known() -> None:
    f = ForgedResultsFilter("mx.test")
    assert f.feed(b"Authentication-Results:\n") == b""
    assert f.feed(b"  other.example;\n") == b"Authentication-Results:\n  other.example;\n"
    assert f.feed(b"  spf=pass\n") == b"  spf=pass\n"
    assert f.feed(b"Authentication-Results: mx.test;\n") == b""
    assert f.feed(b"  spf=pass\n") == b""
    assert f.feed(b"Subject: x\n") == b"Subject: x\n"


def test_filter_on_a_message_ending_in_its_header() -> None:
    assert run(b"Subject: x\nAuthentication-Results: mx.test") == b"Subject: x\n"
    assert run(b"Authentication-Results: other") == b"Authentication-Results: other"


def test_filter_drops_a_field_whose_id_never_comes() -> None:
    """An endless comment before the id (many lines, or one huge line) is dropped within
    bounded work: it might name us after the comment."""
    endless = b"Authentication-Results: (\n" + b" x\n" * 5000 + b" ) mx.test; spf=pass\n"
    t0 = time.monotonic()
    assert run(endless + b"Subject: s\n\nbody\n") == b"Subject: s\n\nbody\n"
    huge = b"Authentication-Results: (" + b"x" * 5_000_000 + b") mx.test; spf=pass\n"
    assert run(huge + b"\n") == b"\n"
    long_id = b"Authentication-Results: " + b"a" * 9000 + b"; spf=pass\n"
    assert run(long_id) == long_id
    assert time.monotonic() - t0 < 2


def test_authserv_id_parsing() -> None:
    assert authserv_id(b"Authentication-Results: a.example; none", True) == b"a.example"
    assert authserv_id(b'Authentication-Results: "a\\.b" 1; none', True) == b"a.b"
    assert authserv_id(b"Authentication-Results: (c (nested)) x;", True) == b"x"
    assert authserv_id(b"Authentication-Results: (open", False) is None
    assert authserv_id(b"Authentication-Results:", True) == b""


FIELD_IDS = ["mx.test", "MX.TEST", '"mx.test"', "(c) mx.test", "mx.test(c)", "other.example",
             "mx.test.evil", "", "\"mx.\\test\""]


@st.composite
def header_sections(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a message, what the filter must leave of it), built from fields whose fate is
    known: an A-R field claiming mx.test (however written) goes, everything else stays."""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    data, kept = b"", b""
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["ar", "other", "arc"]))
        ident = draw(st.sampled_from(FIELD_IDS))
        fold = draw(st.sampled_from(["", "before", "after"]))
        name = draw(st.sampled_from([b"Authentication-Results", b"authentication-RESULTS",
                                     b"Authentication-Results "]))
        idb = ident.encode()
        if kind == "ar":
            text = name + b":" + (eol + b"\t" if fold == "before" else b" ") + idb + b";"
            text += (eol + b"\t" if fold == "after" else b" ") + b"spf=pass" + eol
            ours = ident.replace("(c)", "").strip().strip('"').replace("\\", "").lower() \
                == "mx.test"
        elif kind == "arc":
            text = b"ARC-Authentication-Results: i=1; " + idb + b"; spf=pass" + eol
            ours = False
        else:
            text = b"X-Other: " + idb + (eol + b" more" if fold else b"") + eol
            ours = False
        data += text
        kept += b"" if ours else text
    body = eol + draw(st.sampled_from([b"", b"Authentication-Results: mx.test; x" + eol]))
    return data + body, kept + body


@settings(max_examples=300)
@given(header_sections())
def test_filter_drops_exactly_our_fields(case: tuple[bytes, bytes]) -> None:
    data, kept = case
    assert run(data) == kept


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_filter_on_arbitrary_bytes(data: bytes) -> None:
    out = run(data)
    # what is left is the input with whole fields taken out: a subsequence of lines, and
    # no field in its header section claims our id
    it = iter(lines(data))
    assert all(any(line == x for x in it) for line in lines(out))
    head = re.split(rb"\r?\n\r?\n", out, maxsplit=1)[0]
    for field in re.split(rb"\n(?![ \t])", head):
        if re.match(rb"(?i)authentication-results[ \t]*:", field):
            assert (authserv_id(field, True) or b"").lower() != b"mx.test"
