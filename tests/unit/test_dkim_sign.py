"""eqmail.dkim.sign: what a signature covers, line ends, several keys, bad keys, and the
signing domain.  Verification here is dkimpy through eqmail.dkim.verify; the interop
tests (tests/integration/test_dkim_interop.py) check the same with Mail::DKIM and OpenDKIM.
"""

from __future__ import annotations

import re

import pytest
from dkimkeys import ed_key, pem, records, rsa_key, short_rsa_pem, signing_keys

from eqmail.dkim.sign import (
    Canon,
    KeyLoadError,
    KeyType,
    MessageError,
    SigningKey,
    SigningPolicy,
    sign,
    signing_domain,
)
from eqmail.dkim.verify import Result, verify

MESSAGE = (b"From: Ada <ada@example.com>\nTo: grace@example.org\nCc: x@example.org\n"
           b"Subject: Hello\nDate: Mon, 7 Dec 2026 22:00:00 +0000\n"
           b"Message-ID: <m1@example.com>\nReceived: from x by y\nX-Mailer: test\n"
           b"\nHi.\n\nA body line   with  spaces \n")


def lookup(name: str) -> list[bytes]:
    return records()[name]


def h_tags(fields: bytes) -> list[list[str]]:
    unfolded = re.sub(rb"\r?\n", b"", fields)
    return [[n.strip() for n in h.decode().split(":")]
            for h in re.findall(rb"[;\s]h=([^;]*);", unfolded)]


def test_one_signature_per_key_both_verify_lf_and_crlf() -> None:
    fields = sign(MESSAGE, signing_keys())
    assert fields.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in fields and b"a=ed25519-sha256" in fields
    assert b"\r" not in fields and fields.endswith(b"\n")  # the message's own LF
    signed = fields + MESSAGE
    for form in (signed, signed.replace(b"\n", b"\r\n")):  # as queued, as sent
        assert [r.result for r in verify(form, lookup)] == [Result.PASS, Result.PASS]


def test_crlf_message_gets_crlf_fields() -> None:
    crlf = MESSAGE.replace(b"\n", b"\r\n")
    fields = sign(crlf, signing_keys())
    assert fields.endswith(b"\r\n") and b"\n" not in fields.replace(b"\r\n", b"")
    assert [r.result for r in verify(fields + crlf, lookup)] == [Result.PASS] * 2


def test_header_list_only_present_fields_from_oversigned_no_l() -> None:
    fields = sign(MESSAGE, signing_keys()[:1])
    (h,) = h_tags(fields)
    assert h == ["from", "subject", "date", "message-id", "to", "cc", "from"]
    assert b"l=" not in re.sub(rb"[a-z]l=", b"", fields)  # no l= tag (bh= contains no "l=")
    assert b"c=relaxed/relaxed" in fields and b"x=" not in fields


def test_every_instance_signed_and_added_from_breaks_it() -> None:
    two_to = MESSAGE.replace(b"To: grace", b"To: first@example.org\nTo: grace")
    (h,) = h_tags(sign(two_to, signing_keys()[:1]))
    assert h.count("to") == 2
    signed = sign(MESSAGE, signing_keys()) + MESSAGE
    forged = signed.replace(b"From: Ada", b"From: Mallory <m@evil.example>\nFrom: Ada")
    assert [r.result for r in verify(forged, lookup)] == [Result.FAIL, Result.FAIL]
    # an unsigned field may be added in transit
    added = signed.replace(b"X-Mailer: test", b"X-Mailer: test\nX-Spam: no")
    assert [r.result for r in verify(added, lookup)] == [Result.PASS, Result.PASS]


def test_policy_options() -> None:
    policy = SigningPolicy(header_canon=Canon.SIMPLE,
                           headers=("from", "subject"), oversign=("from", "subject"),
                           expire=3600)
    fields = sign(MESSAGE, signing_keys(), policy)
    assert b"c=simple/relaxed" in fields
    t = int(re.search(rb"t=(\d+)", fields).group(1))  # type: ignore[union-attr]
    x = int(re.search(rb"x=(\d+)", fields).group(1))  # type: ignore[union-attr]
    assert x == t + 3600
    assert h_tags(fields)[0] == ["from", "subject", "from", "subject"]
    assert [r.result for r in verify(fields + MESSAGE, lookup)] == [Result.PASS] * 2
    with pytest.raises(ValueError):
        SigningPolicy(headers=("subject",))
    with pytest.raises(ValueError):
        SigningPolicy(headers=("from", "received"))
    with pytest.raises(ValueError):
        SigningPolicy(expire=0)


@pytest.mark.parametrize("key", [
    SigningKey("example.com", "bad", KeyType.RSA, b"not a key"),
    SigningKey("example.com", "bad", KeyType.RSA, pem(ed_key())),        # wrong type
    SigningKey("example.com", "bad", KeyType.ED25519, pem(rsa_key())),   # wrong type
    SigningKey("example.com", "bad", KeyType.RSA, short_rsa_pem()),     # too short
    SigningKey("example.com", "bad", KeyType.RSA, pem(rsa_key())[:-60]),  # truncated
])
def test_key_that_does_not_load_names_domain_and_selector(key: SigningKey) -> None:
    with pytest.raises(KeyLoadError) as info:
        sign(MESSAGE, [signing_keys()[0], key])
    assert info.value.domain == "example.com" and info.value.selector == "bad"
    assert "bad._domainkey.example.com" in str(info.value)
    assert "PRIVATE" not in str(info.value) and "PRIVATE" not in repr(key)


def test_message_errors() -> None:
    with pytest.raises(MessageError):
        sign(b"To: x@example.org\nSubject: no from\n\nbody\n", signing_keys())
    with pytest.raises(MessageError):
        sign(b" continuation first\nFrom: a@example.com\n\nbody\n", signing_keys())


@pytest.mark.parametrize("from_domain, expected", [
    ("example.com", "example.com"),
    ("EXAMPLE.com.", "example.com"),
    ("mail.example.com", "example.com"),
    ("a.b.shop.example.com", "shop.example.com"),
    ("example.org", None),
    ("com", None),
    ("notexample.com", None),
    ("bücher.example", "xn--bcher-kva.example"),
    ("", None),
])
def test_signing_domain(from_domain: str, expected: str | None) -> None:
    available = ["example.com", "shop.example.com", "xn--bcher-kva.example", "com.invalid"]
    assert signing_domain(from_domain, available) == expected
    assert signing_domain("x.com", ["com"]) is None  # a top-level key never covers below


def test_openssl_rsa_signature_is_dkimpys_byte_for_byte() -> None:
    """The RSA step runs in OpenSSL for keys the signer loaded; PKCS#1 v1.5 is
    deterministic, so its bytes must be exactly those of dkimpy's own arithmetic."""
    import hashlib

    import dkim
    import dkim.crypto

    from eqmail.dkim import sign as signmod

    key = SigningKey("example.com", "rsa", KeyType.RSA, pem(rsa_key()))
    parsed = dkim.crypto.parse_pem_private_key(signmod._dkimpy_key(key))
    assert parsed["modulus"] in signmod._OPENSSL_RSA
    for name in ("sha256", "sha1"):
        digest = hashlib.new(name, b"the canonicalised header fields")
        ours = signmod._rsa_sign(digest, parsed)
        theirs = signmod._dkimpy_rsa_sign(digest, parsed)
        assert ours == bytes(theirs)
    assert dkim.RSASSA_PKCS1_v1_5_sign is signmod._rsa_sign
    # a key dkimpy parsed itself (not loaded here) still signs, by dkimpy's code
    other = dkim.crypto.parse_pem_private_key(signmod._dkimpy_key(
        SigningKey("example.com", "other", KeyType.RSA, pem(rsa_key(1024)))))
    signmod._OPENSSL_RSA.pop(other["modulus"])
    digest = hashlib.sha256(b"x")
    assert signmod._rsa_sign(digest, other) == bytes(signmod._dkimpy_rsa_sign(digest, other))


def test_dkimpy_parses_each_pem_once_and_still_refuses_garbage() -> None:
    import dkim

    from eqmail.dkim import sign as signmod

    data = signmod._dkimpy_key(SigningKey("example.com", "rsa", KeyType.RSA, pem(rsa_key())))
    assert dkim.parse_pem_private_key is signmod._parsed_pem
    assert signmod._parsed_pem(data) is signmod._parsed_pem(data)
    assert signmod._parsed_pem(data) == signmod._dkimpy_parse_pem(data)
    with pytest.raises(dkim.UnparsableKeyError):
        signmod._parsed_pem(b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
