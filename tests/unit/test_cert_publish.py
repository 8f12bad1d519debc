"""``eqmailctl cert publish`` (eqmail.cli.publish): the TLSA record matches what OpenSSL's
own tools compute for the certificate's key, a pending key gets its own record, and the
MTA-STS / TLS-RPT records have the RFCs' forms."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eqmail import certs
from eqmail.cli import publish


def _openssl_spki_sha256(cert: Path) -> str:
    """The DANE 3 1 1 value by the openssl command line (not our code)."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"],
                         check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                         check=True, capture_output=True).stdout
    return hashlib.sha256(der).hexdigest()


def test_tlsa_record_is_the_sha256_of_the_certificates_public_key(tmp_path: Path) -> None:
    certs.make_servercert(tmp_path, "mx.example.test")
    text = publish.publish_text(tmp_path, "mx.example.test", "example.test", "enforce",
                                ["mx.example.test", "*.backup.example.test"], 86400, "", 0.0)
    want = _openssl_spki_sha256(tmp_path / certs.SERVERCERT)
    assert f"_25._tcp.mx.example.test. IN TLSA 3 1 1 {want}\n" in text
    assert '_mta-sts.example.test. IN TXT "v=STSv1; id=19700101T000000"\n' in text
    assert ("; version: STSv1\n; mode: enforce\n; mx: mx.example.test\n"
            "; mx: *.backup.example.test\n; max_age: 86400\n") in text
    assert '_smtp._tls.example.test. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.test"\n' in text
    assert "pending key" not in text


def test_a_pending_key_is_announced_before_it_is_installed(tmp_path: Path) -> None:
    certs.make_servercert(tmp_path, "mx.example.test")
    certs.make_request(tmp_path, "mx.example.test")
    lines = publish.tlsa_lines(tmp_path, "mx.example.test")
    assert len(lines) == 2 and lines[1].split()[6] != lines[0].split()[6]
    assert "pending key" in lines[1]


def test_the_policy_body_has_crlf_lines() -> None:
    assert publish.sts_policy("testing", ["a.test"], 60) == (
        "version: STSv1\r\nmode: testing\r\nmx: a.test\r\nmax_age: 60\r\n")


def test_without_a_certificate_the_command_says_which_file(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.test\n")
    with pytest.raises(publish.PublishError, match="servercert.pem"):
        publish.tlsa_lines(tmp_path / "control", "mx.example.test")
    r = subprocess.run([sys.executable, "-m", "eqmail.cli.eqmailctl", "--root", str(tmp_path),
                        "cert", "publish"], capture_output=True, text=True,
                       env={**os.environ, "EQMAIL_ROOT": str(tmp_path)})
    assert r.returncode == 1 and "servercert.pem" in r.stderr
    certs.make_servercert(tmp_path / "control", "mx.example.test")
    r = subprocess.run([sys.executable, "-m", "eqmail.cli.eqmailctl", "--root", str(tmp_path),
                        "cert", "publish", "--mode", "enforce"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "_25._tcp.mx.example.test. IN TLSA 3 1 1 " in r.stdout
    assert "_mta-sts.example.test. IN TXT" in r.stdout and "; mode: enforce" in r.stdout
