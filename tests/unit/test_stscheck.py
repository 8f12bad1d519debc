"""eqmailctl check's lines about MTA-STS (eqmail.cli.stscheck through eqmail.cli.check):
control/mtasts 0 is noted, a control/tlsca.pem that will not work is named."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from certs import CA
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from eqmail.cli.check import check_report, format_check
from eqmail.instance import Instance


def instance(tmp_path: Path, **files: bytes) -> Instance:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    for name, data in files.items():
        (tmp_path / "control" / name.replace("_", ".")).write_bytes(data)
    return Instance(tmp_path)


def expired_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def sts_lines(report: dict[str, list[str]]) -> list[str]:
    return [w for w in report["warnings"] + report["notes"] if "tlsca" in w or "mtasts" in w]


def test_defaults_say_nothing(tmp_path: Path) -> None:
    report = check_report(instance(tmp_path))
    assert sts_lines(report) == []
    rows = {r["file"]: r for r in report["controls"]}
    assert rows["mtasts"]["value"] == 1


def test_mtasts_off_is_noted(tmp_path: Path) -> None:
    report = check_report(instance(tmp_path, mtasts=b"0\n"))
    (note,) = sts_lines(report)
    assert note.startswith("note: control/mtasts is 0: receiving domains' MTA-STS policies")
    assert note in format_check(report)


def test_a_good_tlsca(tmp_path: Path) -> None:
    inst = instance(tmp_path, tlsca_pem=CA.create().pem)
    os.chmod(inst.control / "tlsca.pem", 0o644)
    assert sts_lines(check_report(inst)) == []


def test_tlsca_problems_are_named(tmp_path: Path) -> None:
    inst = instance(tmp_path, tlsca_pem=b"not a certificate\n")
    assert sts_lines(check_report(inst)) == [
        "warning: control/tlsca.pem: no PEM certificate in it: MTA-STS trusts the system's CAs only"]
    (inst.control / "tlsca.pem").write_bytes(CA.create().pem + expired_ca())
    os.chmod(inst.control / "tlsca.pem", 0o600)
    lines = sts_lines(check_report(inst))
    assert lines[0].startswith("warning: control/tlsca.pem: CN=old CA expired on ")
    if os.geteuid() == 0:
        assert lines[1] == ("warning: control/tlsca.pem: mode 0600: the MTA-STS policy worker "
                            "(eqmailt) cannot read it; make it 0644")
