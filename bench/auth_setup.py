#!/usr/bin/env python3
"""bench/auth.sh's fixtures: the test messages, the DKIM key and DNS zone, and the
loopback DNS server (tests/dnsserver.py) that publishes them.

  auth_setup.py make DIR SIZE   write DIR/signed.eml (From: sender.test, DKIM-signed by
                                eqmail.dkim.sign with a fresh RSA-2048 key), DIR/plain-signed-domain.eml
                                (From: signed.test, unsigned), DIR/plain-unsigned-domain.eml
                                (From: plain.test, unsigned), DIR/zone.json; bodies of about SIZE bytes
  auth_setup.py dns DIR         serve DIR/zone.json on 127.0.0.1 (UDP+TCP, a free port written
                                to DIR/dns.port) until killed

The zone: sender.test has SPF ``v=spf1 ip4:127.0.0.0/8 -all``, its key record
``bench._domainkey.sender.test`` and DMARC ``p=reject``; so a verified message gets
spf=pass, dkim=pass, dmarc=pass and needs three TXT lookups.  Run with the venv's python.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def body(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times.\n"
    return line * max(1, size // len(line))


def message(frm: str, subject: str, size: int) -> bytes:
    head = (f"From: Bench <{frm}>\nTo: mbench@bench.test\nSubject: {subject}\n"
            "Date: Tue, 8 Dec 2026 00:00:00 +0000\nMessage-ID: <auth-bench@bench.test>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n").encode()
    return head + body(size - len(head))


def make(out: Path, size: int) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from eqmail.dkim.sign import KeyType, SigningKey, sign

    key = rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    msg = message("bench@sender.test", "verification bench", size)
    signed = sign(msg, [SigningKey("sender.test", "bench", KeyType.RSA, pem)]) + msg
    out.mkdir(parents=True, exist_ok=True)
    (out / "signed.eml").write_bytes(signed)
    (out / "plain-signed-domain.eml").write_bytes(message("bench@signed.test", "signing bench", size))
    (out / "plain-unsigned-domain.eml").write_bytes(message("bench@plain.test", "signing bench", size))
    chunks = [record[i:i + 255] for i in range(0, len(record), 255)]
    zone = {
        "sender.test": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']},
        "bench._domainkey.sender.test": {"TXT": [" ".join(f'"{c}"' for c in chunks)]},
        "_dmarc.sender.test": {"TXT": ['"v=DMARC1; p=reject"']},
    }
    (out / "zone.json").write_text(json.dumps(zone, indent=1))


def serve(out: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from dnsserver import DnsServer

    server = DnsServer(json.loads((out / "zone.json").read_text()))
    port = server.start()
    (out / "dns.port").write_text(f"{port}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "dns":
        serve(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
