"""Server-side TLS for the SMTP listeners (netqmail's TLS patch, eQmail 1.09 keys).

Owns: building the server TLS context from control/ (servercert.pem = chain + key,
the cipher list — control/tlsserverciphers as parsed by eqmail.control, Mozilla's
"intermediate" list by default, or TLSCIPHERS — dh2048.pem, clientca.pem,
clientcrl.pem) and upgrading an asyncio stream to TLS for STARTTLS (SMTPS connections
are TLS from the first byte: the listener hands the context to
``connect_accepted_socket``).

The context is built by the supervisor, as root, before the listener worker drops its
privileges; the worker inherits it through fork, so the key file can stay readable by
root alone.  The asyncio TLS transport needs the standard library's ``ssl`` module
(pyOpenSSL has no asyncio transport) — see docs/design-notes.md.  TLS 1.2 is the
minimum: no SSLv2/v3, TLS 1.0 or 1.1.

Client certificates (clientca.pem and tlsclients present, and the listener's
``clientcert`` option not 0) are requested in every handshake, naming clientca.pem's
CAs, and never fail it: as netqmail's ``verify_cb``, verification only decides whether
the client is a certificate relay client (eqmail.tlslib; checked after the handshake
by :func:`client_cert_email`).

A handshake that fails sends its TLS alert before the connection closes (asyncio and
uvloop drop the alert OpenSSL queued: they abort the transport at once), so a client
sees "handshake failure" or "protocol version" rather than a bare close.

DH parameters (dh2048.pem, for DHE with an RSA certificate) below 2048 bits are not
loaded (a ``warning``; DHE is then off, ECDHE still works).  Client-initiated
renegotiation is refused (a CPU-exhaustion vector; TLS 1.3 has none anyway).

Failure modes: :meth:`ServerTLS.load` never raises — a missing certificate means no
STARTTLS; a broken one is kept as ``error`` (``available`` False): the listener logs
it and does not advertise STARTTLS, and an SMTPS connection gets eQmail's 454 and is
closed.  :meth:`upgrade` raises on a failed or stalled handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from eqmail import tlslib
from eqmail.control import TLS_INTERMEDIATE_CIPHERS

DH_MIN_BITS = 2048

# The socket a handshake in this session runs on (set by bind_alert_socket before the
# transport is made: asyncio and uvloop run the handshake in the transport's context).
_ALERT_FD: contextvars.ContextVar[int] = contextvars.ContextVar("eqmail_tls_alert_fd", default=-1)


class CertError(Exception):
    """A certificate or DH parameter file that cannot be used (eqmail.certs raises it)."""


class _AlertingSSLObject(ssl.SSLObject):
    """An SSLObject that, when its handshake fails, sends the alert OpenSSL queued for
    the peer straight to the socket before the error reaches asyncio (which aborts the
    transport without flushing it)."""

    _alert_bio: ssl.MemoryBIO | None = None
    _alert_fd: int = -1

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            self._send_alert()
            raise

    def _send_alert(self) -> None:
        if self._alert_bio is None or self._alert_fd < 0:
            return
        data = self._alert_bio.read()
        if not data:
            return
        try:
            # A dup: the transport owns the descriptor and closes it right after.
            with socket.fromfd(self._alert_fd, socket.AF_INET, socket.SOCK_STREAM) as s:
                s.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass  # the peer is gone or its window is full: nothing more to do


class ServerContext(ssl.SSLContext):
    """The listener's SSLContext: its SSLObjects flush a failed handshake's alert."""

    sslobject_class = _AlertingSSLObject

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,  # type: ignore[override]
                 server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(obj, _AlertingSSLObject):
            obj._alert_bio, obj._alert_fd = outgoing, _ALERT_FD.get()
        return obj


def bind_alert_socket(fd: int) -> None:
    """Call in the session's task before its transport is made: a failed handshake on
    that connection sends its alert to ``fd``."""
    _ALERT_FD.set(fd)


@dataclass
class ServerTLS:
    context: ssl.SSLContext | None
    error: str | None = None
    client_ca: bool = False
    warning: str | None = None

    @property
    def available(self) -> bool:
        return self.context is not None

    @classmethod
    def load(cls, control: Path, env: dict[str, str] | None = None,
             ciphers: str = TLS_INTERMEDIATE_CIPHERS, client_cert: bool = True) -> ServerTLS | None:
        """None when control/servercert.pem does not exist (STARTTLS not offered).
        ``ciphers`` is control/tlsserverciphers (TLSCIPHERS in ``env`` wins, as in
        netqmail); ``client_cert`` False is the listener option clientcert=0."""
        cert = control / "servercert.pem"
        if not cert.exists():
            return None
        try:
            ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                            | ssl.OP_NO_RENEGOTIATION)
            ctx.load_cert_chain(str(cert))
            ctx.set_ciphers((env or {}).get("TLSCIPHERS") or ciphers)
            warning = _load_dh(ctx, control / "dh2048.pem")
            client_ca = False
            ca = control / "clientca.pem"
            if client_cert and ca.exists() and (control / "tlsclients").exists():
                client_ca, why = _request_client_certs(ctx, control, ca)
                warning = "; ".join(w for w in (warning, why) if w) or None
            return cls(ctx, None, client_ca, warning)
        except (OSError, ssl.SSLError, ValueError) as e:
            return cls(None, f"{e.__class__.__name__}: {e}")

    async def upgrade(self, writer: asyncio.StreamWriter, timeout: float) -> str:
        """STARTTLS: handshake as the server; returns the cipher name for the Received
        line.  Call :func:`freeze_plaintext` before the ``220 ready for tls``."""
        assert self.context is not None
        await asyncio.wait_for(
            writer.start_tls(self.context, ssl_handshake_timeout=timeout), timeout + 1)
        return cipher_name(writer)


def freeze_plaintext(writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
    """STARTTLS command injection (CVE-2011-0411): before ``220 ready for tls`` goes
    out, stop reading and drop what was read but not yet taken: those bytes came in
    clear text with the STARTTLS.  Reading stays paused until the TLS layer takes the
    connection over, so the client's ClientHello (sent only after it saw the 220) stays
    in the kernel for the handshake; plain text still queued behind the STARTTLS goes
    into the handshake too and fails it, but is never read as a command."""
    # asyncio's and uvloop's socket transports read as well as write
    cast(asyncio.Transport, writer.transport).pause_reading()
    buffered = getattr(reader, "_buffer", None)  # asyncio.StreamReader keeps a bytearray
    if buffered is not None:
        buffered.clear()


def cipher_name(writer: asyncio.StreamWriter) -> str:
    ssl_object = writer.get_extra_info("ssl_object")
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return cipher[0] if cipher else "unknown"


def _load_dh(ctx: ssl.SSLContext, path: Path) -> str | None:
    """Load DH parameters of at least 2048 bits; a warning text otherwise."""
    try:
        with open(path, "rb") as f:
            pem = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    try:
        bits = dh_prime_bits(pem)
    except CertError as e:
        return f"{path.name}: {e}; DHE cipher suites disabled"
    if bits < DH_MIN_BITS:
        return f"{path.name}: {bits}-bit DH parameters refused (need >= {DH_MIN_BITS}); DHE disabled"
    ctx.load_dh_params(str(path))
    return None


def dh_prime_bits(pem: bytes) -> int:
    """Size of the prime in PEM DH parameters (PKCS#3 or X9.42: both start with the
    INTEGER p).  A tiny DER walk: cryptography warns on every finite-field DH use."""
    lines = pem.decode("ascii", "replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN") and "DH PARAMETERS" in ln)
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("-----END"))
        der = base64.b64decode("".join(lines[start + 1:end]))
        pos = _der_header(der, 0, 0x30)[0]          # SEQUENCE
        pos, length = _der_header(der, pos, 0x02)    # INTEGER p
        return int.from_bytes(der[pos:pos + length], "big").bit_length()
    except (StopIteration, ValueError, IndexError) as e:
        raise CertError("not PEM DH parameters") from e


def _der_header(der: bytes, pos: int, tag: int) -> tuple[int, int]:
    if der[pos] != tag:
        raise ValueError("unexpected DER tag")
    length = der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    return pos, length


def _request_client_certs(ctx: ssl.SSLContext, control: Path, ca: Path) -> tuple[bool, str | None]:
    """Ask every client for a certificate, naming clientca.pem's CAs; one that does
    not verify never fails the handshake.  (False, why) when this Python's ssl module
    cannot be told so: then no certificate is asked for (no certificate relay) rather
    than foreign certificates breaking mail."""
    try:
        tlslib.probe()
    except tlslib.Unsupported as e:
        return False, f"client certificates not requested: {e}"
    ctx.load_verify_locations(str(ca))
    crl = control / "clientcrl.pem"
    if crl.exists():
        ctx.load_verify_locations(str(crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    # TLS 1.3 has no renegotiation: the certificate is asked for during the handshake
    # and only consulted when rcpthosts refuses a recipient.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    tlslib.verify_without_failing(ctx)  # after verify_mode, which would reset it
    tlslib.set_client_ca_names(ctx, str(ca))
    return True, None


def client_cert_email(writer: asyncio.StreamWriter) -> tuple[str | None, str | None]:
    """The verified client certificate's emailAddress, or (None, reason).  No
    certificate at all has no reason (eQmail: ``...no valid cert for gatewaying (#5.7.1)``);
    one that does not verify against clientca.pem (or is revoked by clientcrl.pem)
    has OpenSSL's text, as netqmail's ``X509_verify_cert_error_string``."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.getpeercert(binary_form=True) is None:
        return None, None
    verified, why = tlslib.verify_result(ssl_object)
    if not verified:
        return None, why
    cert = ssl_object.getpeercert()
    for rdn in cert.get("subject", ()) if cert else ():
        for key, value in rdn:
            if key == "emailAddress":
                return value, None
    return None, "contains no email address"


def key_is_private(path: Path) -> bool:
    try:
        return os.stat(path).st_mode & 0o077 == 0
    except OSError:
        return True
