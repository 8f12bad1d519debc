"""eqmail.certs and ServerTLS.load: the files ``eqmailctl setup``/``cert`` write and how
the listener's TLS context is built from them."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from eqmail import certs
from eqmail.tls import CertError, ServerTLS, dh_prime_bits


def test_self_signed_servercert(tmp_path: Path) -> None:
    path = certs.make_servercert(tmp_path, "mx.example.org")
    assert path.stat().st_mode & 0o777 == 0o600
    data = path.read_bytes()
    assert data.index(b"BEGIN CERTIFICATE") < data.index(b"BEGIN PRIVATE KEY")  # chain, key
    info = certs.describe(path)
    assert info.names == ("mx.example.org",) and info.self_signed
    assert info.key == "ECDSA secp256r1"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(path))  # what the supervisor does
    rsa_path = certs.make_servercert(tmp_path, "192.0.2.1", rsa_key=True, days=30)
    info = certs.describe(rsa_path)
    assert info.key == "RSA 3072" and info.names == ("192.0.2.1",)


def test_dh_params_at_least_2048_bits(tmp_path: Path) -> None:
    path = certs.make_dhparams(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert dh_prime_bits(path.read_bytes()) >= 2048
    with pytest.raises(CertError):
        certs.generate_dh(1024)
    with pytest.raises(CertError):
        dh_prime_bits(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_servertls_refuses_small_dh_and_old_protocols(tmp_path: Path) -> None:
    assert ServerTLS.load(tmp_path) is None  # no servercert.pem: no STARTTLS
    certs.make_servercert(tmp_path, "mx.example.org")
    small = subprocess.run(["openssl", "dhparam", "-dsaparam", "1024"], capture_output=True,
                           check=True).stdout
    (tmp_path / "dh2048.pem").write_bytes(small)
    tls = ServerTLS.load(tmp_path)
    assert tls is not None and tls.available
    assert tls.warning is not None and "1024-bit DH parameters refused" in tls.warning
    assert tls.context is not None
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.context.options & ssl.OP_NO_RENEGOTIATION
    (tmp_path / "servercert.pem").write_text("garbage\n")
    broken = ServerTLS.load(tmp_path)
    assert broken is not None and not broken.available and broken.error


def test_request_and_install(tmp_path: Path) -> None:
    csr_path, key_path = certs.make_request(tmp_path, "mx.example.org")
    assert key_path.stat().st_mode & 0o777 == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    other = certs.self_signed("mx.example.org", certs.new_key())
    with pytest.raises(CertError, match="does not match"):
        certs.install_signed(tmp_path, certs.cert_pem(other))
    key = certs.serialization.load_pem_private_key(key_path.read_bytes(), None)
    signed = certs.self_signed("mx.example.org", key)  # type: ignore[arg-type]
    certs.install_signed(tmp_path, certs.cert_pem(signed))
    assert not key_path.exists() and not csr_path.exists()
    assert (tmp_path / "servercert.pem").stat().st_mode & 0o777 == 0o600


def test_setup_keeps_existing_files(tmp_path: Path) -> None:
    report: list[str] = []
    certs.ensure_tls_files(tmp_path, "mx.example.org", False, report)
    before = (tmp_path / "servercert.pem").read_bytes()
    certs.ensure_tls_files(tmp_path, "mx.example.org", False, report)
    assert (tmp_path / "servercert.pem").read_bytes() == before
    assert sum(line.startswith("kept") for line in report) == 2
    certs.ensure_tls_files(tmp_path, "mx.example.org", True, report)
    assert (tmp_path / "servercert.pem").read_bytes() != before
