"""The connection under the SMTP client: a deadline-bound socket, outbound TLS.

Owns: deciding whether a failure to connect counts for tcpto (the connection itself is
opened by eqmail.delivery.nexthop: smtp/ opens no sockets); :class:`Transport`, the
socket (plain, or under a pyOpenSSL connection after STARTTLS / implicit TLS) on which every read and write has the
``timeoutremote`` deadline; the outbound TLS policy by host name (:class:`TlsConfig`:
tlshosts/, notls, tlsclientciphers, clientcert.pem, eQmail §6) and the cached
client contexts it builds; strict certificate name checks (subjectAltName DNS names,
else CN; for a relay given as an IP address, an iPAddress subjectAltName).  Runs in the remote delivery worker (eqmailr); reads control/clientcert.pem and
control/tlshosts/<host>.pem through OpenSSL, nothing else.

Inputs: a connected socket, the TLS control values.  Outputs:
bytes read (with a deadline, or only what has already arrived), a handshaken :class:`OpenSSL.SSL.Connection`, a :class:`TlsMode` and the
.pem to verify with, certificate name problems as text for qmail-remote's reports.

Failures: a read or write that dies, times out or fails inside TLS raises
:class:`Dropped` (its text from :func:`ssl_error_text`); an unusable .pem raises
:class:`OpenSSL.SSL.Error` from :meth:`TlsConfig.context`; :func:`eqmail.delivery.nexthop.connect`
raises OSError/TimeoutError.  The report texts built from these are eqmail.smtp.client's.
"""

from __future__ import annotations

import enum
import ipaddress
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from eqmail.control import TLS_INTERMEDIATE_CIPHERS

CHUNK = 65536
_T = TypeVar("_T")


class Dropped(Exception):
    """The connection died, timed out or spoke garbage."""


def counts_for_tcpto(exc: BaseException) -> bool:
    """Timeouts (qmail) and refused connections (eQmail) mark an address in tcpto."""
    return isinstance(exc, (TimeoutError, socket.timeout, ConnectionRefusedError))


# ------------------------------------------------------------------ TLS policy


class TlsMode(enum.Enum):
    OFF = "off"
    OPPORTUNISTIC = "opportunistic"
    MANDATORY = "mandatory"


def ssl_error_text(e: Exception) -> str:
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        return "; ".join(str(x[-1]) for x in e.args[0] if x) or "handshake failed"
    return str(e) or e.__class__.__name__


@dataclass(frozen=True)
class TlsConfig:
    """The outbound TLS control files (eQmail §6), by MX/relay host name."""

    control: Path
    ciphers: str = TLS_INTERMEDIATE_CIPHERS
    clientcert: bool = False
    tlshosts: frozenset[str] = frozenset()  # names with control/tlshosts/<name>.pem
    exhaustive: bool = False
    notls: frozenset[str] = frozenset()

    def mode_for(self, host: str) -> tuple[TlsMode, str]:
        """By the MX or relay host name; a relay given as an IP address goes by that
        address as written in smtproutes (``tlshosts/127.0.0.1.pem``,
        ``tlshosts/2001:db8::1.pem``), then by its canonical form."""
        names = [host.lower()]
        ip = ip_literal(host)
        if ip is not None and ip != names[0]:
            names.append(ip)
        for name in names:
            if name and name in self.tlshosts:
                return TlsMode.MANDATORY, f"control/tlshosts/{name}.pem"
        if self.exhaustive or any(name and name in self.notls for name in names):
            return TlsMode.OFF, ""
        return TlsMode.OPPORTUNISTIC, ""

    def context(self, pem: str, webpki: bool = False) -> SSL.Context:
        """The client context for a host: ``pem`` (a tlshosts/ pin) verifies against
        that file; ``webpki`` (MTA-STS, issue 17) against the system's CA store plus
        control/tlsca.pem; neither: no verification (opportunistic TLS, and DANE, which
        checks the chain itself after the handshake)."""
        stamp = _stamp(self.control / "tlsca.pem") if webpki else None
        return _context(self.control, self.ciphers, self.clientcert, pem, stamp)


SYSTEM_CA_FILE = Path("/etc/ssl/certs/ca-certificates.crt")


def _stamp(path: Path) -> tuple[int, int]:
    """(mtime, size) of a CA file, (0, -1) when absent: a changed file gets a new
    context (the cache below is keyed by it)."""
    try:
        st = path.stat()
    except OSError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=64)
def _context(control: Path, ciphers: str, clientcert: bool, pem: str,
             webpki: tuple[int, int] | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    # Mozilla "intermediate" unless control/tlsclientciphers says otherwise (eqmail.control
    # refuses a string that selects no cipher, so the fallback is only for direct callers).
    try:
        ctx.set_cipher_list((ciphers or TLS_INTERMEDIATE_CIPHERS).encode())
    except SSL.Error:
        ctx.set_cipher_list(TLS_INTERMEDIATE_CIPHERS.encode())
    if clientcert:  # offered when loadable, silently skipped otherwise (eQmail)
        try:
            ctx.use_certificate_chain_file(str(control / "clientcert.pem"))
            ctx.use_privatekey_file(str(control / "clientcert.pem"))
        except SSL.Error:
            pass
    if pem or webpki is not None:
        if pem:
            ctx.load_verify_locations(str(control.parent / pem))
        else:
            if SYSTEM_CA_FILE.is_file():
                ctx.load_verify_locations(str(SYSTEM_CA_FILE))
            else:
                ctx.set_default_verify_paths()
            if webpki is not None and webpki[1] >= 0:
                ctx.load_verify_locations(str(control / "tlsca.pem"))

        def record(conn: SSL.Connection, _c: object, errnum: int, depth: int, ok: int) -> bool:
            if not ok and conn.get_app_data() is None:
                conn.set_app_data(_verify_error_text(errnum))
            return True  # decide after the handshake, with our own texts

        ctx.set_verify(SSL.VERIFY_PEER, record)
    else:
        ctx.set_verify(SSL.VERIFY_NONE, lambda *_: True)
    return ctx


def _verify_error_text(errnum: int) -> str:
    try:
        from OpenSSL._util import ffi, lib

        return str(ffi.string(lib.X509_verify_cert_error_string(errnum)).decode())
    except Exception:  # pragma: no cover - private API moved
        return f"verify error {errnum}"


# ------------------------------------------------------------------ certificate names


def ip_literal(host: str) -> str | None:
    """``host`` in canonical IP form when it is an IP address (an IP relay's TLS name),
    else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def name_matches(host: str, pattern: str) -> bool:
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*.") and "." in host:
        return host.split(".", 1)[1] == pattern[2:]
    return False


def peer_name_problem(host: str, dns_sans: list[str], cns: list[str],
                      ip_sans: list[str] | None = None) -> str | None:
    """Strict name check: DNS subjectAltNames if any (CN then ignored), else the CN.
    ``host`` an IP address (a relay given as one): an iPAddress subjectAltName must be
    that address; a certificate without any subjectAltName may name it in its CN."""
    ip = ip_literal(host)
    if ip is not None:
        return _ip_name_problem(ip, dns_sans, cns, ip_sans or [])
    if dns_sans:
        if any(name_matches(host, s) for s in dns_sans):
            return None
        return "received certificate for " + ", ".join(dns_sans)[:200]
    if not cns:
        return "certificate contains no valid commonName"
    if any(name_matches(host, c) for c in cns):
        return None
    return "received certificate for " + cns[0][:200]


def _ip_name_problem(ip: str, dns_sans: list[str], cns: list[str],
                     ip_sans: list[str]) -> str | None:
    if ip in ip_sans:
        return None
    if not dns_sans and not ip_sans and ip in (ip_literal(c) for c in cns):
        return None
    names = ip_sans + dns_sans or cns
    if not names:
        return "certificate contains no valid commonName"
    return "received certificate for " + ", ".join(names)[:200]


def certificate_names(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    """The names :func:`peer_name_problem` checks: DNS subjectAltNames, commonNames,
    iPAddress subjectAltNames (canonical text)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = list(ext.value.get_values_for_type(x509.DNSName))
        ips = [str(a) for a in ext.value.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans, ips = [], []
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return sans, cns, ips


# ------------------------------------------------------------------ transport


class Transport:
    """A socket, maybe under TLS, where every read and write has a deadline."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.conn: SSL.Connection | None = None
        self.timeout = timeout

    def _wait(self, write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Dropped("timeout")
        r, w, _ = select.select([] if write else [self.sock], [self.sock] if write else [], [], left)
        if not r and not w:
            raise Dropped("timeout")

    def _io(self, op: Callable[..., _T], *args: Any) -> _T:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return op(*args)
            except (BlockingIOError, SSL.WantReadError):
                self._wait(False, deadline)
            except SSL.WantWriteError:
                self._wait(True, deadline)
            except SSL.ZeroReturnError:
                return cast(_T, b"")  # only the reads meet a closed TLS stream
            except (OSError, SSL.Error) as e:
                raise Dropped(ssl_error_text(e)) from None

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.conn is None:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    self._wait(True, time.monotonic() + self.timeout)
                    continue
                except OSError as e:
                    raise Dropped(str(e)) from None
            else:
                n = self._io(self.conn.send, bytes(view[:16384]))
            view = view[n:]

    def recv(self) -> bytes:
        if self.conn is None:
            return self._io(self._plain_recv)
        return self._io(self.conn.recv, CHUNK)

    def _plain_recv(self) -> bytes:
        return self.sock.recv(CHUNK)

    def pending_input(self) -> bytes | None:
        """What the peer has sent that nobody has read yet, without waiting: None when
        nothing has arrived (or only part of a TLS record), b"" at end of stream.  The
        SMTP client's lockstep check: between a reply and our next command the server
        has nothing to say."""
        try:
            if self.conn is None:
                return self.sock.recv(CHUNK)
            return self.conn.recv(CHUNK)
        except (BlockingIOError, InterruptedError, SSL.WantReadError, SSL.WantWriteError):
            return None
        except SSL.ZeroReturnError:
            return b""
        except (OSError, SSL.Error) as e:
            raise Dropped(ssl_error_text(e)) from None

    def start_tls(self, ctx: SSL.Context, server_name: str) -> SSL.Connection:
        conn = SSL.Connection(ctx, self.sock)
        conn.set_connect_state()
        if server_name and ip_literal(server_name) is None:  # RFC 6066: no IP in SNI
            conn.set_tlsext_host_name(server_name.encode("idna"))
        self.conn = conn
        self._io(conn.do_handshake)
        return conn

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
