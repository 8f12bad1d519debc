"""``eqmailctl cert publish``: the DNS records and the policy file that tell other MTAs
how to reach this one securely (issue 17, the receiving side of what remote delivery
now honours).

Prints, for control/servercert.pem (and the pending key of ``eqmailctl cert request``,
so a key rollover can be announced before it happens — RFC 7671 §8.1's "current +
next"):

* DANE: ``_25._tcp.<me>. IN TLSA 3 1 1 <SHA-256 of the public key>`` — DANE-EE with the
  SubjectPublicKeyInfo, the form RFC 7672 §3.1.1 recommends: it survives certificate
  renewals that keep the key (``eqmailctl cert install`` of a CA-signed certificate
  for the same key), and needs a DNSSEC-signed zone to mean anything;
* MTA-STS (RFC 8461): the ``_mta-sts.<domain>`` TXT record with a fresh id, and the
  policy text to serve at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (a web
  server with a certificate a public CA signed: eqmail does not serve it);
* TLS-RPT (RFC 8460): the ``_smtp._tls.<domain>`` TXT record asking for reports at
  ``tlsrpt@<domain>`` (or ``--rua``).

Pure text building on the certificate and key files; the caller prints it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from eqmail.certs import PENDING_KEY, SERVERCERT


class PublishError(ValueError):
    """A file needed for the records is missing or unreadable."""


def spki_sha256(public_key_der: bytes) -> str:
    return hashlib.sha256(public_key_der).hexdigest()


def _spki_of_cert(pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _spki_of_key(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def tlsa_lines(control: Path, me: str) -> list[str]:
    """The TLSA records of the server certificate's key and of a pending key."""
    try:
        current = _spki_of_cert((control / SERVERCERT).read_bytes())
    except (OSError, ValueError) as e:
        raise PublishError(f"cannot read {control / SERVERCERT}: {e}") from None
    owner = f"_25._tcp.{me.rstrip('.')}."
    lines = [f"{owner} IN TLSA 3 1 1 {spki_sha256(current)}"]
    pending = control / PENDING_KEY
    if pending.exists():
        try:
            nxt = _spki_of_key(pending.read_bytes())
        except (OSError, ValueError, TypeError) as e:
            raise PublishError(f"cannot read {pending}: {e}") from None
        if nxt != current:
            lines.append(f"{owner} IN TLSA 3 1 1 {spki_sha256(nxt)}   ; the pending key "
                         "(eqmailctl cert request): publish it before installing it")
    return lines


def sts_policy(mode: str, mx: list[str], max_age: int) -> str:
    """An RFC 8461 §3.2 policy body (CRLF lines, as the RFC writes them)."""
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx]
    lines.append(f"max_age: {max_age}")
    return "\r\n".join(lines) + "\r\n"


def publish_text(control: Path, me: str, domain: str, mode: str, mx: list[str],
                 max_age: int, rua: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    d = domain.rstrip(".")
    out = ["; DANE (RFC 7672) -- only in a DNSSEC-signed zone:"]
    out += tlsa_lines(control, me)
    out += ["", "; MTA-STS (RFC 8461): the TXT record (a new id whenever the policy changes)",
            f'_mta-sts.{d}. IN TXT "v=STSv1; id={stamp}"',
            f"; and this policy at https://mta-sts.{d}/.well-known/mta-sts.txt "
            "(text/plain, a certificate from a public CA):"]
    out += ["; " + ln for ln in sts_policy(mode, mx or [me], max_age).splitlines()]
    out += ["", "; TLS-RPT (RFC 8460): where other MTAs send their daily reports",
            f'_smtp._tls.{d}. IN TXT "v=TLSRPTv1; rua=mailto:{rua or "tlsrpt@" + d}"']
    return "\n".join(out) + "\n"
