"""A tiny scriptable SMTP server for tests, plus certificates minted on the fly.

``SmtpSink(Script(...)).listen(host, port)`` binds (in the caller's network namespace,
so tests can place it at 127.0.0.x, ::1 or inside a namespace of their own) and serves
each connection in a thread.  The script says what to answer at each stage, whether to
offer STARTTLS (or speak TLS at once, port-465 style), to require AUTH LOGIN, to hang
(never answer), to drop the connection in the middle of DATA or right after the final
dot, or to send raw bytes (multi-line garbage, extra lines, replies with plain text
behind them) instead of a reply — a hostile peer for the client's lockstep checks.
Every transaction is recorded: HELO name, MAIL FROM line, RCPT addresses, the data as
received (CRLF, still dot-stuffed, without the final dot), TLS yes/no, the
authenticated user; every command line received is in ``commands``.

Certificates come from :func:`mint` (cryptography): a CA and a leaf for given names,
written to a temporary directory — never checked in.
"""

from __future__ import annotations

import base64
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Transaction:
    helo: str = ""
    mail: str = ""
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""
    tls: bool = False
    auth_user: str | None = None
    peer: str = ""


@dataclass
class Script:
    banner: str = "220 sink.test ESMTP"
    ehlo: bool = True
    starttls: bool = False
    implicit_tls: bool = False
    auth: tuple[str, str] | None = None  # require AUTH LOGIN with these credentials
    mail: str = "250 ok"
    rcpt: Callable[[str], str] = lambda _addr: "250 ok"
    data: str = "354 go ahead"
    final: str = "250 ok 1234 qp 5"
    size: int | None = 10000000  # the EHLO SIZE keyword's value (None: no SIZE keyword)
    tls_keywords: tuple[str, ...] = ()  # EHLO keywords offered only inside TLS (REQUIRETLS)
    chunking: bool = False  # offer CHUNKING and take BDAT (RFC 3030); data recorded as sent
    hang_at: str = ""  # "banner", "mail", "final": stop answering there
    drop_in_data: bool = False
    # Drop the connection after the final dot without answering it: the message was
    # received whole (recorded in SmtpSink.unanswered), the client cannot know that.
    drop_after_dot: bool = False
    # Raw bytes sent *instead of* the normal reply at a stage ("banner", "ehlo",
    # "starttls", "mail", "rcpt", "data", "final"), e.g. multi-line garbage; the dialogue
    # then goes on as if the normal reply had been sent.  Data answered with raw bytes at "final"
    # is recorded in ``unanswered`` too (the client may not have taken it as accepted).
    raw: dict[str, bytes] = field(default_factory=dict)


class SmtpSink:
    def __init__(self, script: Script | None = None, cert: Path | None = None,
                 key: Path | None = None) -> None:
        self.script = script or Script()
        self.transactions: list[Transaction] = []
        # Messages received whole but never (properly) answered: drop_after_dot, raw "final".
        self.unanswered: list[Transaction] = []
        self.connections = 0
        self.commands: list[bytes] = []  # every command line received (not DATA lines)
        self.sockets: list[socket.socket] = []
        self.stopping = False
        self.ssl_ctx: ssl.SSLContext | None = None
        if cert is not None:
            self.ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_ctx.load_cert_chain(str(cert), str(key))
        self.lock = threading.Lock()

    def listen(self, host: str, port: int = 0) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        self.sockets.append(s)
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return int(s.getsockname()[1])

    def stop(self) -> None:
        self.stopping = True
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, s: socket.socket) -> None:
        while not self.stopping:
            try:
                conn, addr = s.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._session, args=(conn, addr[0]), daemon=True).start()

    # ------------------------------------------------------------ one session
    def _session(self, conn: socket.socket, peer: str) -> None:
        conn.settimeout(30)
        io = _LineIO(conn)
        try:
            if self.script.implicit_tls:
                assert self.ssl_ctx is not None
                io.wrap(self.ssl_ctx)
            self._dialogue(io, peer)
        except (OSError, ssl.SSLError, EOFError):
            pass
        finally:
            io.close()

    def _reply(self, io: _LineIO, stage: str, normal: str) -> None:
        """The normal reply, or the script's raw bytes for this stage."""
        raw = self.script.raw.get(stage)
        if raw is not None:
            io.conn.sendall(raw)
        else:
            io.send(normal)

    def _hang(self, io: _LineIO) -> None:
        while not self.stopping and io.readline(timeout=0.2, allow_timeout=True) != b"":
            pass

    def _dialogue(self, io: _LineIO, peer: str) -> None:
        sc = self.script
        if sc.hang_at == "banner":
            return self._hang(io)
        self._reply(io, "banner", sc.banner)
        tr = Transaction(peer=peer, tls=io.tls)
        while True:
            line = io.readline()
            if not line:
                return
            with self.lock:
                self.commands.append(line)
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                tr.helo = cmd.split(" ", 1)[1] if " " in cmd else ""
                if verb == "EHLO" and not sc.ehlo:
                    io.send("502 no EHLO here")
                    continue
                self._reply(io, "ehlo", self._ehlo_reply(io) if verb == "EHLO" else "250 sink.test")
            elif verb == "STARTTLS" and sc.starttls and not io.tls:
                self._reply(io, "starttls", "220 ready for TLS")
                assert self.ssl_ctx is not None
                io.wrap(self.ssl_ctx)
                tr = Transaction(peer=peer, tls=True)
            elif verb == "AUTH" and sc.auth is not None:
                tr.auth_user = self._auth_login(io, cmd)
            elif verb == "MAIL":
                if sc.hang_at == "mail":
                    return self._hang(io)
                if sc.auth is not None and tr.auth_user is None:
                    io.send("530 authentication required")
                    continue
                tr.mail = cmd[5:]
                self._reply(io, "mail", sc.mail)
            elif verb == "RCPT":
                addr = cmd[8:].strip("<>")
                reply = sc.rcpt(addr)
                if reply.startswith("2"):
                    tr.rcpts.append(addr)
                self._reply(io, "rcpt", reply)
            elif verb == "BDAT" and sc.chunking:
                if self._bdat(io, tr, cmd) is False:
                    return
                if cmd.upper().endswith(" LAST"):
                    tr = Transaction(peer=peer, tls=io.tls, auth_user=tr.auth_user, helo=tr.helo)
            elif verb == "DATA":
                if self._data(io, tr) is False:
                    return
                tr = Transaction(peer=peer, tls=io.tls, auth_user=tr.auth_user, helo=tr.helo)
            elif verb == "RSET":
                tr = Transaction(peer=peer, tls=io.tls, auth_user=tr.auth_user, helo=tr.helo)
                io.send("250 flushed")
            elif verb == "QUIT":
                io.send("221 bye")
                return
            else:
                io.send("502 unimplemented")

    def _ehlo_reply(self, io: _LineIO) -> str:
        lines = ["250-sink.test", "250-PIPELINING", "250-8BITMIME"]
        if self.script.chunking:
            lines.append("250-CHUNKING")
        if self.script.starttls and not io.tls:
            lines.append("250-STARTTLS")
        if self.script.auth is not None:
            lines.append("250-AUTH PLAIN LOGIN")
        if io.tls:
            lines += [f"250-{k}" for k in self.script.tls_keywords]
        lines.append("250 HELP" if self.script.size is None else f"250 SIZE {self.script.size}")
        return "\r\n".join(lines)

    def _auth_login(self, io: _LineIO, cmd: str) -> str | None:
        assert self.script.auth is not None
        if cmd.upper() != "AUTH LOGIN":
            io.send("504 only LOGIN")
            return None
        io.send("334 VXNlcm5hbWU6")
        user = base64.b64decode(io.readline().strip()).decode()
        io.send("334 UGFzc3dvcmQ6")
        password = base64.b64decode(io.readline().strip()).decode()
        if (user, password) != self.script.auth:
            io.send("535 authentication failed")
            return None
        io.send("235 ok, go ahead")
        return user

    def _bdat(self, io: _LineIO, tr: Transaction, cmd: str) -> bool:
        """``BDAT <n> [LAST]``: exactly n octets, recorded as they came."""
        words = cmd.split()
        size = int(words[1])
        chunk = io.read_exact(size)
        if chunk is None:
            return False
        tr.data += chunk
        if len(words) < 3:
            io.send(f"250 {size} octets received")
            return True
        with self.lock:
            (self.unanswered if "final" in self.script.raw else self.transactions).append(tr)
        self._reply(io, "final", self.script.final)
        return True

    def _data(self, io: _LineIO, tr: Transaction) -> bool:
        sc = self.script
        self._reply(io, "data", sc.data)
        if not sc.data.startswith("3"):
            return True
        chunks: list[bytes] = []
        while True:
            line = io.readline()
            if not line:
                return False
            if line == b".\r\n":
                break
            chunks.append(line)
            if sc.drop_in_data and len(chunks) >= 2:
                return False
        tr.data = b"".join(chunks)
        if sc.hang_at == "final":
            self._hang(io)
            return False
        if sc.drop_after_dot:
            with self.lock:
                self.unanswered.append(tr)
            return False
        with self.lock:
            (self.unanswered if "final" in sc.raw else self.transactions).append(tr)
        self._reply(io, "final", sc.final)
        return True


class _LineIO:
    """CRLF lines over a socket that may switch to TLS."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn: socket.socket = conn
        self.buf = b""
        self.tls = False

    def wrap(self, ctx: ssl.SSLContext) -> None:
        self.conn = ctx.wrap_socket(self.conn, server_side=True)
        self.tls = True
        self.buf = b""

    def send(self, reply: str) -> None:
        self.conn.sendall(reply.encode() + b"\r\n")

    def readline(self, timeout: float = 30, allow_timeout: bool = False) -> bytes | None:
        self.conn.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.conn.recv(65536)
            except TimeoutError:
                if allow_timeout:
                    return None
                raise
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def read_exact(self, size: int) -> bytes | None:
        """``size`` octets (None: the connection ended first)."""
        self.conn.settimeout(30)
        while len(self.buf) < size:
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def mint(directory: Path, names: list[str], ca: tuple[Path, Path] | None = None,
         cn: str | None = None) -> tuple[Path, Path, Path]:
    """(leaf cert, leaf key, CA cert) for ``names`` (subjectAltName DNS names; none = CN
    only).  Pass ``ca`` = (ca cert, ca key) to reuse a CA; else a new one is made."""
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"{(names or [cn or 'leaf'])[0]}-{time.monotonic_ns()}"
    now = datetime.datetime.now(datetime.UTC)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {tag}")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        ca_path = directory / f"ca-{tag}.pem"
        ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"ca-{tag}.key").write_bytes(_key_pem(ca_key))
        ca = (ca_path, directory / f"ca-{tag}.key")
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or (names[0] if names else "leaf"))])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30)))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path, key_path = directory / f"{tag}.crt", directory / f"{tag}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    return cert_path, key_path, ca[0]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
