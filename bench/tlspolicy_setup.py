#!/usr/bin/env python3
"""bench/tlspolicy.sh's fixtures: a test CA, the sink's certificate, the signed DNS of
relay.test (tests/dnssec.py: nsd + a validating unbound) and the MTA-STS policy server
(tests/stsserver.py), all on loopback, running until SIGTERM.

  tlspolicy_setup.py serve DIR SIZE SINK_IP STS_IP

writes into DIR:
  ca.pem            the test CA (the bench installs it as control/tlsca.pem)
  sink.pem          the sink's certificate for mx.relay.test, then its key (ECDSA P-256)
  message.eml       a plain message of about SIZE bytes to user@relay.test
  tlsa.txt          the TLSA record published at _25._tcp.mx.relay.test ("3 1 1 <hex>")
  records.json      every record published, for env.txt
  pids              nsd's and unbound's pids (the bench kills them should this process die)
  dnsservers        control/dnsservers' line (unbound's address), written last: ready

The zone relay.test is SIGNED (a DS in the private root: answers carry AD): MX 10
mx.relay.test, mx.relay.test A SINK_IP, _25._tcp.mx.relay.test TLSA 3 1 1 (the sink's
SPKI), _mta-sts.relay.test TXT ``v=STSv1; id=...``, mta-sts.relay.test A STS_IP.  The
policy at https://mta-sts.relay.test/.well-known/mta-sts.txt (STS_IP port 443, a
certificate of the same CA) is ``mode: enforce``, ``mx: mx.relay.test``, max_age one
day.  So the sink's certificate satisfies DANE and MTA-STS alike.  Needs root (port
443) and the venv's python (cryptography, dnspython); nothing leaves loopback.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from certs import CA, cert_pem, key_pem  # noqa: E402
from dnssec import DnssecWorld, Signing, tlsa_text  # noqa: E402
from stsserver import Site, StsServer, policy  # noqa: E402

DOMAIN = "relay.test"
MX = "mx.relay.test"
POLICY_ID = "20261208bench"


def message(size: int) -> bytes:
    head = (f"From: Bench <bench@bench.test>\nTo: user@{DOMAIN}\nSubject: TLS policy bench\n"
            "Date: Tue, 8 Dec 2026 00:00:00 +0000\nMessage-ID: <tlspolicy-bench@bench.test>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times.\n"
    return head + line * max(1, (size - len(head)) // len(line))


def loopback(ip: str) -> str:
    if not ipaddress.ip_address(ip).is_loopback:
        sys.exit(f"{ip}: only loopback addresses")
    return ip


def serve(out: Path, size: int, sink_ip: str, sts_ip: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ca = CA.create("eqmail bench test CA")
    sink = ca.server(MX)
    (out / "ca.pem").write_bytes(ca.pem)
    (out / "sink.pem").write_bytes(cert_pem(sink.cert) + key_pem(sink.key))
    (out / "message.eml").write_bytes(message(size))
    tlsa = tlsa_text(sink.cert, 3, 1, 1)
    (out / "tlsa.txt").write_text(tlsa + "\n")
    records = {
        DOMAIN: {"MX": [(10, MX)]},
        MX: {"A": [sink_ip]},
        f"_25._tcp.{MX}": {"TLSA": [tlsa]},
        f"_mta-sts.{DOMAIN}": {"TXT": [f'"v=STSv1; id={POLICY_ID}"']},
        f"mta-sts.{DOMAIN}": {"A": [sts_ip]},
    }
    (out / "records.json").write_text(json.dumps(records, indent=1))
    world = DnssecWorld(records, {DOMAIN: Signing.SECURE})
    sts = StsServer(ca, sts_ip, 443, {DOMAIN: Site(policy("enforce", MX, max_age=86400))})
    stop = False

    def term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, term)
    try:
        world.start()
        (out / "pids").write_text("".join(f"{p.pid}\n" for p in world.procs))
        sts.start()
        (out / "dnsservers").write_text(world.dnsservers + "\n")
        while not stop:
            time.sleep(0.2)
    finally:
        sts.stop()
        world.stop()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), loopback(sys.argv[4]), loopback(sys.argv[5]))
    else:
        sys.exit(__doc__)
