"""Server certificates and DH parameters, as eQmail's ``make cert``, ``make cert-req``
and ``update_tmprsadh`` make them.

Owns: ``control/servercert.pem`` (certificate chain then private key, one file, as the
netqmail TLS patch reads it), ``control/dh2048.pem`` (DH parameters for DHE cipher
suites, never fewer than 2048 bits), and a pending certificate request
(``control/servercert.csr`` with its new key in ``control/servercert.key.pending``)
until the signed certificate is installed.

Privilege: run by ``eqmailctl setup`` / ``eqmailctl cert`` — as root on a system
install.  Private keys are written 0600 and, as root, owned by root: the supervisor
loads them before the listener drops to eqmaild (the worker inherits the built
``ssl.SSLContext`` through fork and never needs to read the file).  Every file is
written to a temporary name created 0600 with O_EXCL, fsynced and renamed, so a key is
never readable by others, not even for a moment, and a crash leaves the old file.

Defaults: ECDSA P-256 (fast to make, cheap handshakes; every TLS 1.2 client has it) or
RSA 3072 with ``rsa=True``; SAN = ``me``; 366 days (``make cert``).  DH parameters come
from ``openssl dhparam -dsaparam 2048`` (a fraction of a second; safe-prime generation
takes up to a minute and buys nothing since OpenSSL never reuses a DH key); without the
openssl command they are generated with ``cryptography`` (slow).

Failure modes: OSError from file operations, CertError for a bad input (a certificate
that does not match the pending key, DH parameters below 2048 bits).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from eqmail.tls import DH_MIN_BITS
from eqmail.tls import CertError as CertError  # re-exported: eqmailctl catches it from here

CERT_DAYS = 366           # eQmail's Makefile-cert.mk
RSA_BITS = 3072
SERVERCERT = "servercert.pem"
DHPARAMS = "dh2048.pem"
CSR = "servercert.csr"
PENDING_KEY = "servercert.key.pending"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# ------------------------------------------------------------------ keys and certificates


def new_key(rsa_key: bool = False) -> PrivateKey:
    if rsa_key:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _name_for(me: str) -> tuple[x509.Name, x509.GeneralName]:
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(me))
    except ValueError:
        san = x509.DNSName(me)
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, me)]), san


def self_signed(me: str, key: PrivateKey, days: int = CERT_DAYS) -> x509.Certificate:
    """A self-signed server certificate for ``me`` (CN and subjectAltName)."""
    name, san = _name_for(me)
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                          content_commitment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False)
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))


def certificate_request(me: str, key: PrivateKey) -> x509.CertificateSigningRequest:
    name, san = _name_for(me)
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(name)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(key, hashes.SHA256()))


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def servercert_pem(chain: list[x509.Certificate], key: PrivateKey) -> bytes:
    """servercert.pem's layout: the chain (leaf first), then the key."""
    return b"".join(cert_pem(c) for c in chain) + key_pem(key)


# ------------------------------------------------------------------ DH parameters


def generate_dh(bits: int = DH_MIN_BITS) -> bytes:
    """PEM DH parameters of ``bits`` (>= 2048) bits."""
    if bits < DH_MIN_BITS:
        raise CertError(f"DH parameters below {DH_MIN_BITS} bits are refused")
    openssl = shutil.which("openssl")
    if openssl is not None:
        proc = subprocess.run([openssl, "dhparam", "-dsaparam", str(bits)],
                              capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
        if proc.returncode == 0 and b"PARAMETERS-----" in proc.stdout:
            return proc.stdout
    with warnings.catch_warnings():  # finite-field DH is deprecated in cryptography
        warnings.simplefilter("ignore")
        from cryptography.hazmat.primitives.asymmetric import dh

        params = dh.generate_parameters(generator=2, key_size=bits)
        return params.parameter_bytes(serialization.Encoding.PEM,
                                      serialization.ParameterFormat.PKCS3)


# ------------------------------------------------------------------ files


def write_private(path: Path, data: bytes, owner: tuple[int, int] | None = None,
                  mode: int = 0o600) -> None:
    """Atomically replace ``path``; the temporary file is 0600 from its creation."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _root_owner() -> tuple[int, int] | None:
    return (0, 0) if os.geteuid() == 0 else None


def make_servercert(control: Path, me: str, rsa_key: bool = False, days: int = CERT_DAYS) -> Path:
    key = new_key(rsa_key)
    path = control / SERVERCERT
    write_private(path, servercert_pem([self_signed(me, key, days)], key), _root_owner())
    return path


def make_dhparams(control: Path, bits: int = DH_MIN_BITS) -> Path:
    path = control / DHPARAMS
    # update_tmprsadh writes it 0600 (owner qmaild); eqmail's supervisor reads it as root.
    write_private(path, generate_dh(bits), _root_owner())
    return path


def ensure_tls_files(control: Path, me: str, force: bool, report: list[str]) -> None:
    """``eqmailctl setup``: a self-signed certificate and DH parameters unless present."""
    makers: tuple[tuple[str, Callable[[], Path]], ...] = (
        (SERVERCERT, lambda: make_servercert(control, me)),
        (DHPARAMS, lambda: make_dhparams(control)))
    for name, make in makers:
        path = control / name
        if path.exists() and not force:
            report.append(f"kept {path}")
        else:
            make()
            report.append(f"wrote {path}")


def make_request(control: Path, me: str, rsa_key: bool = False) -> tuple[Path, Path]:
    """A new key (kept aside) and a CSR for it; servercert.pem stays in service."""
    key = new_key(rsa_key)
    key_path, csr_path = control / PENDING_KEY, control / CSR
    write_private(key_path, key_pem(key), _root_owner())
    csr = certificate_request(me, key).public_bytes(serialization.Encoding.PEM)
    write_private(csr_path, csr, _root_owner(), mode=0o644)
    return csr_path, key_path


def install_signed(control: Path, signed_pem: bytes) -> x509.Certificate:
    """Combine a signed certificate (plus chain) with the pending key into servercert.pem."""
    key_path = control / PENDING_KEY
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"no pending key {key_path}: run 'eqmailctl cert request' first") from None
    try:
        chain = x509.load_pem_x509_certificates(signed_pem)
    except ValueError as e:
        raise CertError(f"not a PEM certificate: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertError("unsupported key type")
    if chain[0].public_key() != key.public_key():
        raise CertError("the certificate does not match the pending key")
    write_private(control / SERVERCERT, servercert_pem(chain, key), _root_owner())
    os.unlink(key_path)
    try:
        os.unlink(control / CSR)
    except FileNotFoundError:
        pass
    return chain[0]


@dataclass(frozen=True)
class CertInfo:
    subject: str
    names: tuple[str, ...]
    not_after: datetime.datetime
    key: str
    self_signed: bool


def describe(path: Path) -> CertInfo:
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(v) for v in san.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        kind = f"RSA {pub.key_size}"
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        kind = f"ECDSA {pub.curve.name}"
    else:
        kind = type(pub).__name__
    return CertInfo(cert.subject.rfc4514_string(), names, cert.not_valid_after_utc, kind,
                    cert.issuer == cert.subject)
