"""Test keys and records for the DKIM tests (minted per run, never checked in)."""

from __future__ import annotations

import base64
import functools

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from eqmail.dkim.sign import KeyType, SigningKey


@functools.cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


@functools.cache
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """The TXT record value (strings joined) for ``key``."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def signing_keys(domain: str = "example.com") -> list[SigningKey]:
    return [SigningKey(domain, "rsa", KeyType.RSA, pem(rsa_key())),
            SigningKey(domain, "ed", KeyType.ED25519, pem(ed_key()))]


def records(domain: str = "example.com") -> dict[str, list[bytes]]:
    return {f"rsa._domainkey.{domain}": [record(rsa_key())],
            f"ed._domainkey.{domain}": [record(ed_key())]}


@functools.cache
def short_rsa_pem(bits: int = 512) -> bytes:
    """An RSA key shorter than cryptography will generate (openssl still does)."""
    import subprocess
    return subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                           f"rsa_keygen_bits:{bits}"], check=True, capture_output=True).stdout
