"""DANE for SMTP (RFC 7672, RFC 7671): does the certificate chain an MX host presented
match its authenticated TLSA records?

Owns: which TLSA records SMTP may use (:func:`usable`: DANE-TA(2) and DANE-EE(3), SPKI or
full certificate, exact/SHA-256/SHA-512 matching, data of the right form -- PKIX-TA(0)
and PKIX-EE(1) are unusable in SMTP, RFC 7672 §3.1.3) and the verdict on a chain
(:func:`verify`):

- DANE-EE(3): the leaf certificate (selector 0) or its public key (selector 1) matches;
  nothing else is checked -- no name, no expiry, no chain (RFC 7672 §3.1.1).
- DANE-TA(2): a certificate of the presented chain above the leaf (selector 0) or its
  public key (selector 1) matches; the leaf must chain to that trust anchor (OpenSSL's
  verification with the anchor as the only trusted certificate, PARTIAL_CHAIN: it need
  not be self-signed), every certificate from leaf to anchor be valid at ``now``, and
  the leaf carry one of the reference identifiers ``names`` (the MX host name and its
  CNAME-expanded name, RFC 7672 §3.2.2; RFC 6125 rules: SAN dNSNames, the subject CN
  only without any, ``*`` as a whole leftmost label matching one label).
- Records present but none usable (RFC 7672 §2.2: "mandatory unauthenticated TLS"): the
  verdict is ``ok`` -- the caller delivers over TLS without authenticating -- but not
  :attr:`DaneVerdict.authenticated`, and ``result`` is tlsa-invalid for TLS-RPT.

Pure: no I/O; the caller found the records (eqmail.dns.Resolver.tlsa) and did the TLS
handshake.  Nothing here raises for hostile input: TLSA data and certificates that do
not parse are unusable records and mismatches.

Used by remote delivery (eqmailr), which logs ``detail`` (e.g. ``TLSA 3 1 1 3f1a9c0b2d4e5f60...``)
and records ``result`` with TLS-RPT.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_der_public_key
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from eqmail.delivery.tlspolicy import ResultType, Tlsa

DANE_TA, DANE_EE = 2, 3
DIGEST_LEN = {1: 32, 2: 64}  # matching type -> length of its data
MAX_EXACT = 16384  # a full certificate or key in a TLSA record (matching type 0)
HEX_SHOWN = 16  # hex digits of a record's data in a log detail


@dataclass(frozen=True)
class DaneVerdict:
    """``ok``: the peer's chain matches a usable TLSA record (``detail`` says which,
    for the log); otherwise ``result`` is the TLS-RPT failure type and ``detail`` why.

    ``matched``: the record that authenticated the peer.  A verdict that is ``ok``
    without ``matched`` is RFC 7672 §2.2's "no usable records": TLS is mandatory but
    the server is not authenticated (``result`` tlsa-invalid, for TLS-RPT)."""

    ok: bool
    result: ResultType | None
    detail: str
    matched: Tlsa | None = None

    @property
    def authenticated(self) -> bool:
        return self.ok and self.matched is not None


def short(record: Tlsa) -> str:
    """``TLSA 3 1 1 3f1a9c0b2d4e5f60...``: a record as a log line names it."""
    data = record.data.hex()
    shown = data[:HEX_SHOWN] + ("..." if len(data) > HEX_SHOWN else "")
    return f"TLSA {record.usage} {record.selector} {record.mtype} {shown}"


def _well_formed(record: Tlsa) -> bool:
    if record.mtype in DIGEST_LEN:
        return len(record.data) == DIGEST_LEN[record.mtype]
    if not 0 < len(record.data) <= MAX_EXACT:
        return False
    try:  # an exact-match record that is no certificate or key can never match
        if record.selector == 0:
            x509.load_der_x509_certificate(record.data)
        else:
            load_der_public_key(record.data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records RFC 7672 §3.1 lets SMTP use: DANE-TA(2)/DANE-EE(3), selector 0/1,
    matching type 0/1/2, data of the right length."""
    return tuple(r for r in records
                 if r.usage in (DANE_TA, DANE_EE) and r.selector in (0, 1)
                 and r.mtype in (0, 1, 2) and _well_formed(r))


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def matches(record: Tlsa, cert: x509.Certificate) -> bool:
    """The record's data is the certificate's (selector 0) or its key's (1) DER, or
    its SHA-256 (1) or SHA-512 (2) digest."""
    try:
        data = _selected(cert, record.selector)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False  # a key type cryptography cannot re-encode: no match
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def describe(cert: x509.Certificate) -> str:
    """``certificate for NAME, issuer CN`` (the first DNS name, else the subject CN)."""
    names = dns_names(cert) or common_names(cert) or ["(no name)"]
    issuer = [str(a.value) for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return f"certificate for {names[0]}, issuer {issuer[0] if issuer else cert.issuer.rfc4514_string()}"


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [n for n in san.value.get_values_for_type(x509.DNSName) if isinstance(n, str)]


def common_names(cert: x509.Certificate) -> list[str]:
    try:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError:
        return []


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4: case-insensitive, a ``*`` leftmost label matching one label."""
    p, n = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if not p or not n:
        return False
    if p.startswith("*."):
        return "." in n and n.split(".", 1)[1] == p[2:] and "." in p[2:]
    return p == n


def host_matches(cert: x509.Certificate, names: Sequence[str]) -> bool:
    presented = dns_names(cert) or common_names(cert)
    return any(name_matches(p, n) for p in presented for n in names)


def _chain_error(leaf: x509.Certificate, untrusted: Sequence[x509.Certificate],
                 anchor: x509.Certificate, now: float) -> tuple[ResultType, str] | None:
    """OpenSSL's verification of ``leaf`` up to ``anchor`` (trusted even when it is
    not self-signed), at time ``now``; None when it passes."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    store.set_time(datetime.datetime.fromtimestamp(now, datetime.UTC).replace(tzinfo=None))
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                  [crypto.X509.from_cryptography(c) for c in untrusted])
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as e:
        code = e.errors[0] if e.errors else 0
        # X509_V_ERR_CERT_HAS_EXPIRED 10, _CERT_NOT_YET_VALID 9
        result = ResultType.CERTIFICATE_EXPIRED if code in (9, 10) else \
            ResultType.CERTIFICATE_NOT_TRUSTED
        return result, str(e.errors[2] if len(e.errors) > 2 else e)
    return None


def _verify_ta(record: Tlsa, chain: Sequence[x509.Certificate], names: Sequence[str],
               now: float) -> tuple[bool, ResultType, str]:
    """One DANE-TA record: (matched, failure type, why) -- matched True means done."""
    leaf = chain[0]
    failure: tuple[ResultType, str] = (ResultType.CERTIFICATE_NOT_TRUSTED, "")
    for depth in range(1, len(chain)):
        anchor = chain[depth]
        if not matches(record, anchor):
            continue
        error = _chain_error(leaf, chain[1:depth], anchor, now)
        if error is not None:
            failure = (error[0], f"{short(record)} matches {describe(anchor)} but the chain "
                                 f"to it fails: {error[1]}")
            continue
        if not host_matches(leaf, names):
            return (False, ResultType.CERTIFICATE_HOST_MISMATCH,
                    f"{short(record)} matches, but received {describe(leaf)}, "
                    f"not for {' or '.join(names)}")
        return True, ResultType.VALIDATION_FAILURE, ""
    return False, *failure


def verify(records: Sequence[Tlsa], chain: Sequence[x509.Certificate],
           names: Sequence[str], now: float) -> DaneVerdict:
    """``chain`` (leaf first, as the server sent it) against the usable ``records``;
    ``names``: the reference identifiers for DANE-TA (RFC 7672 §3.2.2)."""
    good = usable(records)
    if not good:
        return DaneVerdict(True, ResultType.TLSA_INVALID,
                           f"no usable TLSA record among {len(records)}: TLS without "
                           "authentication (RFC 7672 §2.2)")
    if not chain:
        return DaneVerdict(False, ResultType.VALIDATION_FAILURE, "the server sent no certificate")
    leaf = chain[0]
    for r in good:  # DANE-EE first: the cheapest, and the commonest
        if r.usage == DANE_EE and matches(r, leaf):
            return DaneVerdict(True, None, short(r), r)
    problems: list[tuple[ResultType, str]] = []
    for r in good:
        if r.usage != DANE_TA:
            continue
        try:
            ok, result, why = _verify_ta(r, chain, names, now)
        except (ValueError, TypeError, UnsupportedAlgorithm, crypto.Error) as e:
            # a certificate OpenSSL or cryptography refuses: this record cannot match
            problems.append((ResultType.VALIDATION_FAILURE, f"{short(r)}: {e}"))
            continue
        if ok:
            return DaneVerdict(True, None, f"{short(r)}, {describe(leaf)}", r)
        if why:
            problems.append((result, why))
    if problems:  # a TA that matched says more than "nothing matched"
        result, why = problems[0]
        return DaneVerdict(False, result, why)
    return DaneVerdict(False, ResultType.CERTIFICATE_NOT_TRUSTED,
                       f"no TLSA record matches the {describe(leaf)} "
                       f"({', '.join(short(r) for r in good[:3])}{'...' if len(good) > 3 else ''})")
