"""Server-side TLS for the SMTP listeners (netqmail's TLS patch, eQmail 1.09 keys).

Owns: building the server TLS context from control/ (servercert.pem = chain + key,
tlsserverciphers or TLSCIPHERS, dh2048.pem, clientca.pem, clientcrl.pem) and upgrading
an asyncio stream to TLS (STARTTLS, or at once for SMTPS).

The context is built by the supervisor, as root, before the listener worker drops its
privileges; the worker inherits it through fork, so the key file can stay readable by
root alone.  The asyncio TLS transport needs the standard library's ``ssl`` module
(pyOpenSSL has no asyncio transport) — see docs/design-notes.md.  TLS 1.2 is the
minimum: no SSLv2/v3, TLS 1.0 or 1.1.

Failure modes: :meth:`ServerTLS.load` never raises — a missing certificate means no
STARTTLS (``available`` False); a broken one is kept as ``error`` for the 454 reply and
the log.  :meth:`upgrade` raises on a failed or stalled handshake.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerTLS:
    context: ssl.SSLContext | None
    error: str | None = None
    client_ca: bool = False

    @property
    def available(self) -> bool:
        return self.context is not None

    @classmethod
    def load(cls, control: Path, env: dict[str, str] | None = None) -> ServerTLS | None:
        """None when control/servercert.pem does not exist (STARTTLS not offered)."""
        cert = control / "servercert.pem"
        if not cert.exists():
            return None
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
            ctx.load_cert_chain(str(cert))
            ciphers = (env or {}).get("TLSCIPHERS") or _cipher_list(control / "tlsserverciphers")
            if ciphers:
                ctx.set_ciphers(ciphers)
            dh = control / "dh2048.pem"
            if dh.exists():
                ctx.load_dh_params(str(dh))
            client_ca = False
            ca = control / "clientca.pem"
            if ca.exists() and (control / "tlsclients").exists():
                ctx.load_verify_locations(str(ca))
                crl = control / "clientcrl.pem"
                if crl.exists():
                    ctx.load_verify_locations(str(crl))
                    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
                # TLS 1.3 has no renegotiation: the certificate is asked for during the
                # handshake and only consulted when rcpthosts refuses a recipient.
                ctx.verify_mode = ssl.CERT_OPTIONAL
                client_ca = True
            return cls(ctx, None, client_ca)
        except (OSError, ssl.SSLError, ValueError) as e:
            return cls(None, f"{e.__class__.__name__}: {e}")

    async def upgrade(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                      timeout: float) -> str:
        """Handshake as the server; returns the cipher name for the Received line."""
        assert self.context is not None
        # STARTTLS command injection (CVE-2011-0411): plain-text bytes that arrived after
        # the STARTTLS line must never be read as if they came through TLS.
        buffered = getattr(reader, "_buffer", None)
        if buffered is not None:
            buffered.clear()
        await asyncio.wait_for(
            writer.start_tls(self.context, ssl_handshake_timeout=timeout), timeout + 1)
        ssl_object = writer.get_extra_info("ssl_object")
        cipher = ssl_object.cipher() if ssl_object is not None else None
        return cipher[0] if cipher else "unknown"


def _cipher_list(path: Path) -> str | None:
    """tlsserverciphers: one entry per line, joined with ':' (eQmail)."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f.read(64 * 1024).splitlines()]
    except FileNotFoundError:
        return None
    return ":".join(ln for ln in lines if ln and not ln.startswith("#")) or None


def client_cert_email(writer: asyncio.StreamWriter) -> tuple[str | None, str | None]:
    """The verified client certificate's emailAddress, or (None, reason)."""
    ssl_object = writer.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None, "no client certificate"
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "emailAddress":
                return value, None
    return None, "contains no email address"


def read_tlsclients(control: Path) -> frozenset[str]:
    try:
        with open(control / "tlsclients") as f:
            return frozenset(ln.strip() for ln in f.read(1 << 20).splitlines()
                             if ln.strip() and not ln.startswith("#"))
    except OSError:
        return frozenset()


def key_is_private(path: Path) -> bool:
    try:
        return os.stat(path).st_mode & 0o077 == 0
    except OSError:
        return True
