"""eqmail.delivery.dane: TLSA records against real certificate chains (tests/certs.py)."""

from __future__ import annotations

import datetime
import hashlib
import time

import pytest
from certs import CA
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.delivery.dane import DaneVerdict, name_matches, short, usable, verify
from eqmail.delivery.tlspolicy import ResultType, Tlsa

NOW = time.time()


def der(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def record(cert: x509.Certificate, usage: int, selector: int, mtype: int) -> Tlsa:
    data = der(cert, selector)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, mtype, data)


def sub_ca(parent: CA, cn: str, not_before: datetime.datetime | None = None,
           not_after: datetime.datetime | None = None) -> CA:
    """An intermediate CA certificate issued by ``parent``, valid from ``not_before``
    to ``not_after`` (default: an hour ago to two days ahead)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(parent.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(hours=1))
            .not_valid_after(not_after or now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(parent.key, hashes.SHA256()))
    return CA(name, key, cert)


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    root = CA.create("DANE test root")
    inter = sub_ca(root, "DANE test intermediate")
    leaf = inter.server("mx.example.test")
    other = CA.create("someone else").server("mx.example.test")
    wild = inter.server("*.example.test")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired_ta = sub_ca(root, "expired intermediate", past, past + datetime.timedelta(days=1))
    return {"root": root, "inter": inter, "leaf": leaf.cert,
            "chain": [leaf.cert, inter.cert, root.cert], "other": other.cert,
            "wild": [wild.cert, inter.cert],
            "expired_chain": [expired_ta.server("mx.example.test").cert, expired_ta.cert]}


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_without_name_or_expiry(pki, selector: int, mtype: int) -> None:  # type: ignore[no-untyped-def]
    r = record(pki["leaf"], 3, selector, mtype)
    v = verify([r], pki["chain"], ["some.other.name"], NOW + 10 * 365 * 86400)
    assert v == DaneVerdict(True, None, short(r), r) and v.authenticated
    assert v.detail.startswith(f"TLSA 3 {selector} {mtype} {r.data.hex()[:16]}")


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_mismatch(pki, selector: int, mtype: int) -> None:  # type: ignore[no-untyped-def]
    r = record(pki["other"], 3, selector, mtype)
    v = verify([r], pki["chain"], ["mx.example.test"], NOW)
    assert not v.ok and v.result is ResultType.CERTIFICATE_NOT_TRUSTED
    assert v.detail.startswith("no TLSA record matches the certificate for mx.example.test, "
                               "issuer DANE test intermediate (TLSA 3 ")


def test_dane_ee_only_looks_at_the_leaf(pki) -> None:  # type: ignore[no-untyped-def]
    r = record(pki["inter"].cert, 3, 1, 1)
    assert not verify([r], pki["chain"], ["mx.example.test"], NOW).ok


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
@pytest.mark.parametrize("anchor", ["inter", "root"])
def test_dane_ta_in_the_chain(pki, selector: int, mtype: int, anchor: str) -> None:  # type: ignore[no-untyped-def]
    r = record(pki[anchor].cert, 2, selector, mtype)
    v = verify([r], pki["chain"], ["mx.example.test"], NOW)
    assert v.ok and v.authenticated and v.matched == r
    assert v.detail == f"{short(r)}, certificate for mx.example.test, issuer DANE test intermediate"


def test_dane_ta_checks_the_name_against_every_reference_identifier(pki) -> None:  # type: ignore[no-untyped-def]
    r = record(pki["inter"].cert, 2, 1, 1)
    v = verify([r], pki["chain"], ["mx.cname-target.test"], NOW)
    assert not v.ok and v.result is ResultType.CERTIFICATE_HOST_MISMATCH
    assert "received certificate for mx.example.test" in v.detail
    assert "not for mx.cname-target.test" in v.detail
    # the CNAME-expanded name is a reference identifier too (RFC 7672 §3.2.2)
    assert verify([r], pki["chain"], ["mx.alias.test", "MX.Example.Test."], NOW).ok
    # a wildcard certificate: one leftmost label
    assert verify([r], pki["wild"], ["mx.example.test"], NOW).ok
    assert not verify([r], pki["wild"], ["a.mx.example.test"], NOW).ok


def test_dane_ta_checks_expiry(pki) -> None:  # type: ignore[no-untyped-def]
    chain = pki["expired_chain"]
    r = record(chain[1], 2, 0, 1)
    v = verify([r], chain, ["mx.example.test"], NOW)
    assert not v.ok and v.result is ResultType.CERTIFICATE_EXPIRED
    assert v.detail.startswith(f"{short(r)} matches certificate for expired intermediate")
    # the leaf expired (time moved on): the chain fails too
    leafish = verify([record(pki["inter"].cert, 2, 1, 1)], pki["chain"], ["mx.example.test"],
                     NOW + 30 * 86400)
    assert not leafish.ok and leafish.result is ResultType.CERTIFICATE_EXPIRED
    # DANE-EE never looks at dates
    assert verify([record(chain[0], 3, 1, 1)], chain, [], NOW).ok


def test_dane_ta_must_be_in_the_presented_chain(pki) -> None:  # type: ignore[no-untyped-def]
    r = record(pki["root"].cert, 2, 1, 1)
    v = verify([r], pki["chain"][:2], ["mx.example.test"], NOW)  # root not sent
    assert not v.ok and v.result is ResultType.CERTIFICATE_NOT_TRUSTED
    # the leaf itself is no trust anchor
    assert not verify([record(pki["leaf"], 2, 0, 1)], pki["chain"], ["mx.example.test"], NOW).ok


def test_dane_ta_of_another_pki_does_not_match(pki) -> None:  # type: ignore[no-untyped-def]
    stranger = CA.create("stranger")
    v = verify([record(stranger.cert, 2, 1, 1)], pki["chain"], ["mx.example.test"], NOW)
    assert not v.ok


def test_a_chain_that_does_not_chain_is_refused(pki) -> None:  # type: ignore[no-untyped-def]
    # a server sending someone's intermediate after its own (self-made) leaf
    r = record(pki["inter"].cert, 2, 1, 1)
    v = verify([r], [pki["other"], pki["inter"].cert], ["mx.example.test"], NOW)
    assert not v.ok and v.result is ResultType.CERTIFICATE_NOT_TRUSTED
    assert "but the chain to it fails" in v.detail


def test_one_matching_record_among_many_is_enough(pki) -> None:  # type: ignore[no-untyped-def]
    records = [Tlsa(3, 1, 1, b"\0" * 32), record(pki["other"], 3, 0, 2),
               record(pki["inter"].cert, 2, 1, 2), Tlsa(1, 1, 1, b"\1" * 32)]
    v = verify(records, pki["chain"], ["mx.example.test"], NOW)
    assert v.ok and v.matched == records[2]


def test_unusable_records(pki) -> None:  # type: ignore[no-untyped-def]
    good = record(pki["leaf"], 3, 1, 1)
    bad = [Tlsa(0, 1, 1, good.data), Tlsa(1, 1, 1, good.data),  # PKIX usages: not in SMTP
           Tlsa(4, 1, 1, good.data), Tlsa(3, 2, 1, good.data), Tlsa(3, 1, 3, good.data),
           Tlsa(3, 1, 1, good.data[:31]), Tlsa(3, 1, 2, good.data),  # wrong digest length
           Tlsa(3, 0, 0, b"not a certificate"), Tlsa(3, 1, 0, b""), Tlsa(2, 1, 0, b"\x30\x00")]
    assert usable(bad + [good]) == (good,)
    assert usable(bad) == ()
    v = verify(bad, pki["chain"], ["mx.example.test"], NOW)
    # RFC 7672 §2.2: TLS is mandatory, the server is not authenticated
    assert v.ok and not v.authenticated and v.matched is None
    assert v.result is ResultType.TLSA_INVALID
    assert v.detail == ("no usable TLSA record among 10: TLS without authentication "
                        "(RFC 7672 §2.2)")


def test_no_certificate_at_all(pki) -> None:  # type: ignore[no-untyped-def]
    v = verify([record(pki["leaf"], 3, 1, 1)], [], ["mx.example.test"], NOW)
    assert v == DaneVerdict(False, ResultType.VALIDATION_FAILURE, "the server sent no certificate")


def test_short_form() -> None:
    assert short(Tlsa(3, 1, 1, bytes.fromhex("ab12" * 16))) == "TLSA 3 1 1 ab12ab12ab12ab12..."
    assert short(Tlsa(2, 0, 0, b"\x01")) == "TLSA 2 0 0 01"


def test_name_matching_rules() -> None:
    assert name_matches("*.example.test", "mx.example.test")
    assert not name_matches("*.example.test", "example.test")
    assert not name_matches("*.test", "example.test")  # no wildcard over a TLD's children
    assert not name_matches("m*.example.test", "mx.example.test")
    assert name_matches("MX.example.test.", "mx.EXAMPLE.test")
    assert not name_matches("", "mx.example.test")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(Tlsa, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
                          st.binary(max_size=200)), max_size=6),
       st.lists(st.text(max_size=30), max_size=3))
def test_arbitrary_records_never_raise(pki, records: list[Tlsa], names: list[str]) -> None:  # type: ignore[no-untyped-def]
    for chain in (pki["chain"], pki["chain"][:1], [pki["other"], pki["root"].cert]):
        v = verify(records, chain, names, NOW)
        assert isinstance(v, DaneVerdict)
        # hostile data never authenticates anybody
        assert not v.authenticated
        assert v.ok == (usable(records) == ())


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([2, 3]), st.sampled_from([0, 1]), st.sampled_from([0, 1, 2]),
       st.integers(0, 4095))
def test_one_flipped_bit_never_matches(pki, usage: int, selector: int, mtype: int,  # type: ignore[no-untyped-def]
                                       bit: int) -> None:
    cert = pki["leaf"] if usage == 3 else pki["inter"].cert
    r = record(cert, usage, selector, mtype)
    data = bytearray(r.data)
    data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    v = verify([Tlsa(usage, selector, mtype, bytes(data))], pki["chain"], ["mx.example.test"], NOW)
    assert not v.authenticated
