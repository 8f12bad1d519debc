"""eqmail.dkim.verify: the RFC examples with their published keys, hostile input (each
gets a result, never an exception or a hang), the bounds, and a sign/verify property.
DNS is a dict-backed TxtLookup here; tests/integration/test_dkim_interop.py uses a real
DNS server on loopback."""

from __future__ import annotations

import base64
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from dkimkeys import record, records, rsa_key, short_rsa_pem, signing_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.dkim.dns import DnsPermError, DnsTempError, TxtLookup
from eqmail.dkim.sign import DEFAULT_HEADERS, _dkimpy_key, _Signer, sign
from eqmail.dkim.verify import MAX_KEY_RECORD, DkimResult, Result, verify

# RFC 8463 Appendix A.3 (the signed message) and A.2 (the two key records).
RFC8463 = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
    b"\r\n")
RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com":
        [b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="],
    "test._domainkey.football.example.com":
        [b"v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
         b"iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
         b"DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
         b"Ip3G+2kryOTIKT+l/K4w3QIDAQAB"],
}

# RFC 6376 Appendix A.2 (simple/simple: the whitespace is part of the test), with the
# Appendix A.3 key in SubjectPublicKeyInfo form (the form §3.6.1 publishes; the RFC
# prints the bare RSAPublicKey, see the errata: both verify, dkimpy reads either).
RFC6376 = b"""DKIM-Signature: v=1; a=rsa-sha256; s=brisbane; d=example.com;
      c=simple/simple; q=dns/txt; i=joe@football.example.com;
      h=Received : From : To : Subject : Date : Message-ID;
      bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
      b=AuUoFEfDxTDkHlLXSZEpZj79LICEps6eda7W3deTVFOk4yAUoqOB
        4nujc7YopdG5dWLSdNg6xNAZpOPr+kHxt1IrE+NahM6L/LbvaHut
        KVdkLLkpVaVVQPzeRDI009SO2Il5Lu7rDNH6mZckBdrIx0orEtZV
        4bmp/YzhwvcubU4=;
Received: from client1.football.example.com  [192.0.2.1]
      by submitserver.example.com with SUBMISSION;
      Fri, 11 Jul 2003 21:01:54 -0700 (PDT)
From: Joe SixPack <joe@football.example.com>
To: Suzie Q <suzie@shopping.example.net>
Subject: Is dinner ready?
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)
Message-ID: <20030712040037.46341.5F8J@football.example.com>

Hi.

We lost the game. Are you hungry yet?

Joe.
""".replace(b"\n", b"\r\n")
RFC6376_SPKI = (b"MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDwIRP/UC3SBsEmGqZ9ZJW3/DkMoGeLnQg1fWn7/zYt"
                b"IxN2SnFCjxOCKG9v3b4jYfcTNh5ijSsq631uBItLa7od+v/RtdC2UzJ1lWT947qR+Rcac2gbto/NMqJ0"
                b"fzfVjH4OuKhitdY9tf6mcwGjaNBcWToIMmPSPDdQPNUYckcQ2QIDAQAB")


def dict_lookup(zone: dict[str, list[bytes]]) -> TxtLookup:
    def lookup(name: str) -> list[bytes]:
        if name not in zone:
            raise DnsPermError(f"{name}: NXDOMAIN")
        return zone[name]
    return lookup


def results(message: bytes, zone: dict[str, list[bytes]], **kw: float) -> list[Result]:
    return [r.result for r in verify(message, dict_lookup(zone), **kw)]  # type: ignore[arg-type]


# ---- the RFC examples -----------------------------------------------------------------

def test_rfc8463_example_both_signatures_pass() -> None:
    got = verify(RFC8463, dict_lookup(RFC8463_KEYS))
    assert got == [
        DkimResult(Result.PASS, "football.example.com", "brisbane", "ed25519-sha256", "",
                   "/gCrinpc"),
        DkimResult(Result.PASS, "football.example.com", "test", "rsa-sha256", "", "F45dVWDf"),
    ]
    assert results(RFC8463.replace(b"hungry", b"angry"), RFC8463_KEYS) == [Result.FAIL] * 2
    assert results(RFC8463.replace(b"dinner", b"lunch"), RFC8463_KEYS) == [Result.FAIL] * 2


def test_rfc6376_example_passes_with_either_key_form() -> None:
    der = base64.b64decode(RFC6376_SPKI)
    pkcs1 = base64.b64encode(der[22:])  # the RSAPublicKey inside the SubjectPublicKeyInfo
    for p in (RFC6376_SPKI, pkcs1):
        zone = {"brisbane._domainkey.example.com": [b"v=DKIM1; p=" + p]}
        assert results(RFC6376, zone) == [Result.PASS]
        assert results(RFC6376.replace(b"\r\n", b"\n"), zone) == [Result.PASS]
        # simple header canonicalisation: one more space in a signed field fails it
        assert results(RFC6376.replace(b"Subject: Is", b"Subject:  Is"), zone) == [Result.FAIL]


# ---- hostile input --------------------------------------------------------------------

MESSAGE = b"From: a@example.com\nTo: b@example.org\nSubject: s\n\nbody line\n"


def signed(message: bytes = MESSAGE) -> bytes:
    return sign(message, signing_keys()) + message


def first_rsa(message: bytes = MESSAGE) -> bytes:
    return sign(message, signing_keys()[:1]) + message


def test_no_signature_is_none() -> None:
    assert verify(MESSAGE, dict_lookup({})) == [DkimResult(Result.NONE, reason="no signature")]


@pytest.mark.parametrize("header", [
    b"DKIM-Signature: garbage\n",
    b"DKIM-Signature: v=1; v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; s=rsa; h=from; bh=AAAA; b=AAAA\n",          # no d=
    b"DKIM-Signature: v=1; a=rsa-md5; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=to; bh=AAAA; b=AAAA\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=!!!\n",
    b"DKIM-Signature: v=2; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA\n",
    b"DKIM-Signature: v=1; a=rsa-sha1; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA;"
    b" i=@evil.example\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA;"
    b" l=xyz\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA;"
    b" c=fancy/simple\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=ex\xc3\xa4mple.com; s=rsa; h=from; bh=AAAA; b=AAAA\n",
    b"DKIM-Signature: \n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA;"
    b" t=99999999999\n",                                                             # future
])
def test_malformed_signature_is_permerror(header: bytes) -> None:
    got = verify(header + signed(), dict_lookup(records()))
    assert [r.result for r in got] == [Result.PERMERROR, Result.PASS, Result.PASS]
    assert got[0].reason


def test_unparseable_header_section() -> None:
    assert results(b" leading continuation\n" + signed(), records()) == [Result.PERMERROR] * 2
    assert results(b" leading continuation\n" + MESSAGE, records()) == [Result.NONE]


def test_duplicated_signature_is_verified_once() -> None:
    calls: list[str] = []

    def counting(name: str) -> list[bytes]:
        calls.append(name)
        return records()[name]
    msg = first_rsa()
    field = msg[: msg.index(b"From:")]
    got = verify(field + msg, counting)
    assert [r.result for r in got] == [Result.PASS, Result.PASS]
    assert got[1].reason == "repeats signature 1" and len(calls) == 1


def test_l_tag_verifies_but_reports_unsigned_content() -> None:
    # eqmail never writes l=, so dkimpy signs directly (a mailing-list style sender)
    rsa_pem = signing_keys()[0]
    field = dkim.DKIM(MESSAGE).sign(b"rsa", b"example.com", _dkimpy_key(rsa_pem), include_headers=[b"from"],
                   canonicalize=(b"relaxed", b"relaxed"), length=True)
    base = field + MESSAGE
    (ok,) = verify(base, dict_lookup(records()))
    assert ok.result is Result.PASS and ok.body_length == len(b"body line\r\n")
    assert ok.unsigned_body == 0
    appended = base + b"Click here: http://evil.example/\n"
    (more,) = verify(appended, dict_lookup(records()))
    assert more.result is Result.PASS and more.unsigned_body == len(b"Click here: http://evil.example/\r\n")
    assert "not signed" in more.reason
    # an l= longer than the body cannot be honoured (RFC 6376 §3.5)
    longer = field.replace(b"l=11", b"l=99") + MESSAGE
    assert b"l=99" in longer
    assert results(longer, records()) == [Result.PERMERROR]


def key_zone(value: bytes) -> dict[str, list[bytes]]:
    return {"rsa._domainkey.example.com": [value]}


@pytest.mark.parametrize("value, why", [
    (b"v=DKIM1; k=rsa; p=" + b"A" * 10_000, "bytes"),                 # 10,000-byte record
    (b"v=DKIM1; k=rsa; p=" + b"A" * ((MAX_KEY_RECORD - 18) // 4 * 4), "RSA"),  # fits: no key
    (b"v=DKIM1; k=rsa; p=", "revoked"),
    (b"v=DKIM1; k=rsa", "no p="),
    (b"v=DKIM2; k=rsa; p=AAAA", "DKIM1"),
    (b"v=DKIM1; k=rsa; p=not base64!", "base64"),
    (b"v=DKIM1; k=dsa; p=AAAA", "k=dsa"),
    (b"\x00\xff garbage", "syntax"),
    (b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", "does not match"),
])
def test_bad_key_records_are_permerror(value: bytes, why: str) -> None:
    (r,) = verify(first_rsa(), dict_lookup(key_zone(value)))
    assert r.result is Result.PERMERROR and why in r.reason, r


def test_short_rsa_key_is_permerror_rfc8301() -> None:
    short = serialization.load_pem_private_key(short_rsa_pem(), None)
    traditional = short.private_bytes(serialization.Encoding.PEM,  # type: ignore[union-attr]
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
    # eqmail refuses to sign with it, so dkimpy signs directly (a careless sender)
    field = _Signer(MESSAGE).sign(b"rsa", b"example.com", traditional,
                                  include_headers=[b"from"])
    (r,) = verify(field + MESSAGE, dict_lookup(key_zone(record(short))))  # type: ignore[arg-type]
    assert r.result is Result.PERMERROR and "512 bits" in r.reason


def test_several_records_and_missing_record() -> None:
    assert results(first_rsa(), key_zone(record(rsa_key())) | {
        "rsa._domainkey.example.com": [record(rsa_key()), b"v=DKIM1; p="]}) == [Result.PERMERROR]
    assert results(first_rsa(), {}) == [Result.PERMERROR]
    assert results(first_rsa(), {"rsa._domainkey.example.com": []}) == [Result.PERMERROR]


def test_dns_trouble() -> None:
    def temp(name: str) -> list[bytes]:
        raise DnsTempError("timed out after 2 s")
    (r,) = verify(first_rsa(), temp)
    assert r.result is Result.TEMPERROR and "timed out" in r.reason

    def wrong(name: str) -> list[bytes]:
        return ["not bytes"]  # type: ignore[list-item]
    assert [x.result for x in verify(first_rsa(), wrong)] == [Result.PERMERROR]


def test_max_signatures_and_deadline() -> None:
    fields = b"".join(sign(MESSAGE + bytes([i]), signing_keys()[:1]) for i in range(8))
    msg = fields + sign(MESSAGE, signing_keys()[:1]) + MESSAGE  # 8 failing, then 1 good
    got = verify(msg, dict_lookup(records()), max_signatures=3)
    assert [r.result for r in got] == [Result.FAIL] * 3 + [Result.POLICY] * 6
    assert "more than 3" in got[-1].reason and got[-1].domain == "example.com"
    now = [0.0]

    def slow(name: str) -> list[bytes]:
        now[0] += 4.0  # each lookup takes 4 s of the fake clock
        return records()[name]
    got = verify(msg, slow, max_signatures=100, deadline=10.0, clock=lambda: now[0])
    assert [r.result for r in got] == [Result.FAIL] * 3 + [Result.TEMPERROR] * 6
    assert "time budget" in got[-1].reason


def test_big_message_is_bounded() -> None:
    body = (b"x" * 998 + b"\n") * 10_000  # 10 MB
    msg = signed(MESSAGE + body)
    start = time.monotonic()
    assert results(msg, records()) == [Result.PASS, Result.PASS]
    assert time.monotonic() - start < 30


# ---- property: sign -> verify passes; any one-byte change in what is signed fails -----

names = st.sampled_from(["Subject", "To", "Cc", "Reply-To", "X-Other", "Message-ID"])
values = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)
lines = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    headers = [("From", "a@example.com")] + draw(st.lists(st.tuples(names, values), max_size=5))
    draw(st.randoms()).shuffle(headers)
    body = draw(st.lists(lines, min_size=1, max_size=6))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    head = eol.join(f"{n}: {v}".encode() for n, v in headers)
    return head + eol + eol + eol.join(x.encode() for x in body) + eol, eol


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.data())
def test_sign_verify_property(sample: tuple[bytes, bytes], data: st.DataObject) -> None:
    message, eol = sample
    fields = sign(message, signing_keys())
    zone = records()
    assert results(fields + message, zone) == [Result.PASS, Result.PASS]
    # change one byte of a signed header value or of the body's visible text
    head, _, body = message.partition(eol + eol)
    targets, at = [], 0
    for line in head.split(eol):  # every byte of every signed field's value
        name, _, value = line.partition(b": ")
        if name.decode().lower() in DEFAULT_HEADERS:
            start = at + len(name) + 2
            targets += range(start, start + len(value))
        at += len(line) + len(eol)
    body_at = len(head) + 2 * len(eol)
    targets += [body_at + i for i, c in enumerate(body) if c > 32]
    at = data.draw(st.sampled_from(targets))
    old = message[at]
    new = data.draw(st.sampled_from([c for c in range(33, 127) if c != old]))
    changed = message[:at] + bytes([new]) + message[at + 1:]
    assert results(fields + changed, zone) == [Result.FAIL, Result.FAIL]


# ---- a real (misbehaving) DNS server, a 50 MB message ---------------------------------

def test_dns_that_hangs_or_answers_garbage() -> None:
    from dnsserver import Behaviour, DnsServer, txt

    from eqmail.dkim.dns import dnspython_txt_lookup
    zone = {n: {"TXT": [txt(v[0].decode())]} for n, v in records().items()}
    server = DnsServer(zone)
    port = server.start()
    try:
        lookup = dnspython_txt_lookup((("127.0.0.1", port),), 0.5)
        assert results(signed(), {}) == [Result.PERMERROR] * 2  # (dict: no records)
        assert [r.result for r in verify(signed(), lookup)] == [Result.PASS, Result.PASS]
        server.behaviour = Behaviour.SILENT
        start = time.monotonic()
        got = verify(signed(), lookup)
        assert [r.result for r in got] == [Result.TEMPERROR] * 2
        assert time.monotonic() - start < 5
        # the whole message's budget: the second signature is not even tried
        got = verify(signed(), lookup, deadline=time.monotonic() + 0.2)
        assert [r.result for r in got] == [Result.TEMPERROR] * 2
        assert got[1].reason == "not evaluated: time budget used up"
        # broken answers on the wire: the lookup cannot tell, so "try later"
        server.behaviour = Behaviour.GARBAGE
        assert [r.result for r in verify(signed(), lookup)] == [Result.TEMPERROR] * 2
    finally:
        server.stop()


@pytest.mark.slow
def test_50_mb_message_with_forged_signatures_is_bounded() -> None:
    body = b"x" * 998 + b"\n"
    message = MESSAGE + body * 50_000  # 50 MB
    forged = sign(MESSAGE, signing_keys()) + message  # signatures over another body
    start = time.monotonic()
    # the budget is checked before each signature; a clock that says the first one's
    # 50 MB body hash used it all up (whatever this machine's real speed): the second
    # is never started
    ticks = iter([0.0, 2.0, 2.0])
    got = verify(forged, dict_lookup(records()), deadline=1.0, clock=lambda: next(ticks))
    assert [r.result for r in got] == [Result.FAIL, Result.TEMPERROR]
    assert got[0].reason == "body hash did not verify"
    assert time.monotonic() - start < 60


# ---- how dkimpy is fed (eqmail.dkim.verify._parse, _dkimpy_verify) ----------------------

def _dkimpy_parse(message: bytes) -> tuple[list[list[bytes]], bytes] | str:
    try:
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    except Exception as e:
        return type(e).__name__


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b":", b"\r", b"\n", b"\r\n", b"X-A: v",
                                 b"From: x@y", b"\n\n", b"\r\n\r\n", b"\xff"]),
                max_size=30).map(b"".join))
def test_parse_is_dkimpys_parse(message: bytes) -> None:
    """Fed differently, dkimpy holds the same header fields and CRLF body as when it
    parses the whole message itself (or fails the same way)."""
    from eqmail.dkim.verify import _parse
    want = _dkimpy_parse(message)
    try:
        checker = _parse(message)
    except Exception as e:
        assert want == type(e).__name__
        return
    assert not isinstance(want, str)
    if message:
        assert (checker.headers, checker.body) == want


def test_signature_over_some_fields_among_many_still_verifies() -> None:
    """dkimpy is handed only the fields h= names: a signature over a few of many fields
    (repeated names, unsigned Received fields between them) verifies as before, and a
    change to a signed field that is not the last of its name still fails."""
    base = (b"Received: from a\r\nX-Top: 1\r\nFrom: a@example.com\r\nReceived: from b\r\n"
            b"Subject: hi\r\nX-Top: 2\r\nTo: b@example.net\r\n\r\nbody  text \r\n")
    fields = sign(base, signing_keys())
    zone = records()
    assert results(fields + base, zone) == [Result.PASS, Result.PASS]
    added = base.replace(b"Received: from b\r\n", b"Received: from b\r\nReceived: from c\r\n")
    assert results(fields + added, zone) == [Result.PASS, Result.PASS]
    changed = base.replace(b"Subject: hi", b"Subject: ho")
    assert results(fields + changed, zone) == [Result.FAIL, Result.FAIL]
