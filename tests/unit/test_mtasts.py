"""MTA-STS's pure parts (eqmail.delivery.mtasts): the TXT record (RFC 8461 §3.1), the
policy (§3.2), the HTTP answer (§3.3) and the names a cache file may have.  Untrusted
bytes give a value or an StsError, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.delivery import mtasts
from eqmail.delivery.mtasts import HttpAnswer, StsError, check_answer, parse_http, parse_policy
from eqmail.delivery.tlspolicy import ResultType, StsMode, StsPolicy

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mx.example.test\r\nmax_age: 604800\r\n"


# ---- TXT --------------------------------------------------------------------------------


@pytest.mark.parametrize(("records", "expected"), [
    ([b"v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    ([b"v=STSv1;id=abc"], "abc"),
    ([b"v=STSv1; id=abc; ext_1=val.ue"], "abc"),
    ([b"v=spf1 -all", b"v=STSv1; id=abc"], "abc"),
    ([b"v=STSv1; id=abc", b"v=STSv1; id=def"], None),   # not exactly one
    ([b"v=STSv1; id=a-b"], None),                       # id is ALPHA / DIGIT
    ([b"v=STSv1; id=" + b"a" * 33], None),              # at most 32
    ([b"v=STSv1"], None),                               # no id
    ([b"v=STSv1; id=abc; id=def"], None),
    ([b"v=STSv2; id=abc"], None),
    ([b"V=STSv1; id=abc"], None),
    ([b"v=STSv1; id=abc; junk"], None),
    ([b"v=STSv1; id=abc; e=a;b"], None),
    ([], None),
    ([b"v=STSv1; id=\xff"], None),
])
def test_txt_records(records: list[bytes], expected: str | None) -> None:
    assert mtasts.txt_id(records) == expected


@given(st.lists(st.binary(max_size=80), max_size=4))
def test_txt_of_any_bytes_is_an_id_or_none(records: list[bytes]) -> None:
    got = mtasts.txt_id(records)
    assert got is None or (got.isalnum() and got.isascii() and len(got) <= 32)


# ---- the policy -------------------------------------------------------------------------


def test_a_policy() -> None:
    p = parse_policy(GOOD, "id1", 1000.0)
    assert p == StsPolicy(StsMode.ENFORCE, ("mx1.example.test", "*.mx.example.test"), 604800,
                          "id1", GOOD.decode(), 1000.0)
    assert p.allows("MX1.example.test.") and p.allows("a.mx.example.test")
    assert not p.allows("a.b.mx.example.test") and not p.allows("mx.example.test")
    assert not p.expired(1000.0 + 604799) and p.expired(1000.0 + 604800)
    assert mtasts.policy_lines(p.text) == [
        "version: STSv1", "mode: enforce", "mx: mx1.example.test", "mx: *.mx.example.test",
        "max_age: 604800"]


def test_lf_lines_unknown_keys_whitespace_and_a_first_value_that_counts() -> None:
    body = (b"version: STSv1\nmode:testing\nfoo: bar baz\nmx:   MX.Example.Test.  \n"
            b"max_age: 86400\nmode: enforce\n")
    p = parse_policy(body, "x", 0.0)
    assert isinstance(p, StsPolicy)
    assert (p.mode, p.mx, p.max_age) == (StsMode.TESTING, ("mx.example.test",), 86400)


def test_mode_none_needs_no_mx() -> None:
    p = parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n", "x", 0.0)
    assert isinstance(p, StsPolicy) and p.mode is StsMode.NONE and p.mx == ()


@pytest.mark.parametrize("body", [
    b"",
    b"mode: enforce\nmx: a.test\nmax_age: 1\n",                   # no version
    b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
    b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmx: a.test\n",               # no max_age
    b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
    b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
    b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n",
    b"version: STSv1\nmode: enforce\nmax_age: 1\n",                # no mx
    b"version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmx: a/b.test\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\nthis is not a field\n",
    b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n\xff\n",
    b"<html>version: STSv1</html>",
    GOOD + b"x: " + b"y" * mtasts.MAX_BODY,
])
def test_invalid_policies(body: bytes) -> None:
    got = parse_policy(body, "x", 0.0)
    assert isinstance(got, StsError) and got.result is ResultType.STS_POLICY_INVALID


@given(st.binary(max_size=400))
def test_a_policy_of_any_bytes_is_a_policy_or_invalid(body: bytes) -> None:
    got = parse_policy(body, "x", 0.0)
    assert isinstance(got, StsPolicy) or got.result is ResultType.STS_POLICY_INVALID


@given(st.lists(st.sampled_from([b"version: STSv1", b"mode: enforce", b"mode: testing",
                                 b"mx: a.test", b"mx: *.b.test", b"max_age: 60", b"k: v",
                                 b"bad", b"max_age: x", b"mx: -"]), max_size=8),
       st.sampled_from([b"\n", b"\r\n"]))
def test_policies_of_field_lines(lines: list[bytes], end: bytes) -> None:
    got = parse_policy(end.join(lines), "x", 0.0)
    if isinstance(got, StsPolicy):
        assert got.mode in (StsMode.ENFORCE, StsMode.TESTING) and got.mx and got.max_age == 60


# ---- HTTP -------------------------------------------------------------------------------


def http(status: str, headers: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}\r\n".encode() + body


def test_a_200_text_plain() -> None:
    raw = http("200 OK", f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(GOOD)}\r\n", GOOD)
    assert parse_http(raw[:20], eof=False) is None
    assert parse_http(raw[:-3], eof=False) is None
    got = parse_http(raw, eof=False)
    assert got == HttpAnswer(200, "text/plain", GOOD) and check_answer(got) == GOOD
    assert isinstance(parse_http(raw[:-3], eof=True), StsError)


def test_chunked_and_close_delimited_bodies() -> None:
    chunked = http("200 OK", "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
                   b"5\r\nversi\r\n3;x=y\r\non:\r\n0\r\n\r\n")
    assert parse_http(chunked, eof=False) == HttpAnswer(200, "text/plain", b"version:")
    closed = http("200 OK", "Content-Type: text/plain\r\n", GOOD)
    assert parse_http(closed, eof=False) is None
    assert parse_http(closed, eof=True) == HttpAnswer(200, "text/plain", GOOD)


@pytest.mark.parametrize(("raw", "result"), [
    (http("301 Moved", "Location: https://elsewhere.test/\r\nContent-Length: 0\r\n", b""),
     ResultType.STS_POLICY_FETCH_ERROR),
    (http("404 Not Found", "Content-Length: 0\r\n", b""), ResultType.STS_POLICY_FETCH_ERROR),
    (http("200 OK", "Content-Type: text/html\r\nContent-Length: 1\r\n", b"x"),
     ResultType.STS_POLICY_INVALID),
    (http("200 OK", "Content-Length: 1\r\n", b"x"), ResultType.STS_POLICY_INVALID),
])
def test_what_is_not_a_policy_answer(raw: bytes, result: ResultType) -> None:
    got = parse_http(raw, eof=True)
    assert isinstance(got, HttpAnswer)
    checked = check_answer(got)
    assert isinstance(checked, StsError) and checked.result is result


@pytest.mark.parametrize("raw", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000,
])
def test_broken_answers(raw: bytes) -> None:
    assert isinstance(parse_http(raw, eof=True), StsError)


def test_oversize_bodies_are_refused_as_soon_as_known() -> None:
    big = mtasts.MAX_BODY + 1
    by_length = http("200 OK", f"Content-Type: text/plain\r\nContent-Length: {big}\r\n", b"")
    closed = http("200 OK", "Content-Type: text/plain\r\n", b"x" * big)
    chunked = http("200 OK", "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
                   f"{big:x}\r\n".encode())
    for raw in (by_length, closed, chunked):
        got = parse_http(raw, eof=False)
        assert isinstance(got, StsError) and got.result is ResultType.STS_POLICY_INVALID


@given(st.binary(max_size=600), st.booleans())
def test_an_answer_of_any_bytes_is_an_answer_none_or_an_error(raw: bytes, eof: bool) -> None:
    got = parse_http(raw, eof)
    assert got is None or isinstance(got, (HttpAnswer, StsError))
    if eof:
        assert got is not None


# ---- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ok"), [
    ("example.test", "example.test"), ("Example.TEST.", "example.test"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("localhost", None), ("..", None), ("a/b.test", None), (".a.test", None),
    ("a..test", None), ("10.0.0.1", None), ("[10.0.0.1]", None), ("-a.test", None),
    ("bücher.test", None), ("a" * 64 + ".test", None), ("", None),
])
def test_names_a_policy_may_be_looked_up_and_cached_under(name: str, ok: str | None) -> None:
    assert mtasts.normal_domain(name) == ok


@given(st.text(max_size=60))
def test_a_valid_name_never_walks_out_of_a_directory(name: str) -> None:
    d = mtasts.normal_domain(name)
    if d is not None:
        assert "/" not in d and not d.startswith(".") and ".." not in d and "\0" not in d


def test_the_request() -> None:
    assert mtasts.http_request("example.test") == (
        b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.test\r\n"
        b"User-Agent: eqmail-mta-sts\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
