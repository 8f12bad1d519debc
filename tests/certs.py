"""Test certificates minted on the fly with ``cryptography``: a CA, server certificates
and client certificates (with an emailAddress in the subject, as the tlsclients relay
wants them).  Nothing is checked in; every test run makes new keys.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def key_pem(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    cert: x509.Certificate
    key: Key

    @property
    def chain_and_key(self) -> bytes:
        """servercert.pem's layout: certificate, then key."""
        return cert_pem(self.cert) + key_pem(self.key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``stem``.crt and ``stem``.key (for swaks/openssl ``--tls-cert``/``--tls-key``)."""
        crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(cert_pem(self.cert))
        key.write_bytes(key_pem(self.key))
        return crt, key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class CA:
    name: x509.Name
    key: Key
    cert: x509.Certificate

    @classmethod
    def create(cls, cn: str = "eqmail test CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(hours=1))
                .not_valid_after(_now() + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def _issue(self, subject: x509.Name, key: Key, extensions: list[tuple[x509.ExtensionType, bool]],
               days: int = 2) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(_now() - datetime.timedelta(hours=1))
             .not_valid_after(_now() + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                            critical=False))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical)
        return b.sign(self.key, hashes.SHA256())

    def server(self, *names: str, rsa_bits: int = 0) -> Issued:
        """A server certificate for DNS names and IP addresses; RSA when ``rsa_bits``."""
        key: Key = (rsa.generate_private_key(65537, rsa_bits) if rsa_bits
                    else ec.generate_private_key(ec.SECP256R1()))
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = self._issue(subject, key, [
            (x509.SubjectAlternativeName(sans), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
        return Issued(cert, key)

    def client(self, cn: str, email: str | None = None) -> Issued:
        """A client certificate; ``email`` goes into the subject's emailAddress."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if email:
            attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
        cert = self._issue(x509.Name(attrs), key, [
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
        return Issued(cert, key)
