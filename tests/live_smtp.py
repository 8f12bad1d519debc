"""Helpers for tests that talk SMTP to a live eqmail listener over TCP.

:class:`RawClient` is a byte-exact client (no smtplib normalisation), so tests can send
exactly what a transcript or a smuggling attempt needs and read reply lines one by one.
The other helpers look at what a user of the instance sees: the delivered Maildir
files (found by the ``qp`` number the 250 reply announced, which qmail-queue's
``Received: (qmail QP invoked from network)`` line repeats) and eQmail's
``qmail-smtpd: ...`` log lines.  Everything waits with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import ssl
import time
from pathlib import Path

from harness import IS_ROOT, TEST_USER, Instance

# eQmail's date: local time with a numeric offset, day not zero-padded.
DATE_RE = rb"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}"
QP_RE = re.compile(rb"^250 ok \d+ qp (\d+)\r\n$")


class RawClient:
    """One TCP connection; reply lines are read with a deadline each."""

    def __init__(self, host: str, port: int, source: str | None = None,
                 timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout, source_address=(source, 0) if source else None)
        self.local_port = int(self.sock.getsockname()[1])
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""  # a reset after the server's last reply counts as its close
        if not data:
            self.eof = True
        self.buf += data

    def line(self, timeout: float | None = None) -> bytes:
        """The next reply line including CRLF; AssertionError on EOF or timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while (lf := self.buf.find(b"\n")) < 0:
            if self.eof:
                raise AssertionError(f"connection closed; pending {bytes(self.buf)!r}")
            try:
                self._fill(deadline)
            except TimeoutError:
                raise AssertionError(f"no reply line in time; pending {bytes(self.buf)!r}") from None
        out = bytes(self.buf[:lf + 1])
        del self.buf[:lf + 1]
        return out

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        """A complete (multi-line) reply: code and text lines."""
        lines = []
        while True:
            raw = self.line(timeout)
            lines.append(raw[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
            if raw[3:4] != b"-":
                return int(raw[:3]), lines

    def command(self, text: str | bytes) -> tuple[int, list[str]]:
        data = text.encode() if isinstance(text, str) else text
        self.send(data + b"\r\n")
        return self.reply()

    def read_to_eof(self, timeout: float | None = None) -> bytes:
        """Everything the server still sends until it closes (AssertionError if it
        does not close in time)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.eof:
            try:
                self._fill(deadline)
            except TimeoutError:
                raise AssertionError(f"server did not close; got {bytes(self.buf)!r}") from None
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def starttls(self) -> str:
        """Client half of the TLS handshake (any certificate); the cipher name."""
        assert not self.buf, f"plain text after 220 ready for tls: {bytes(self.buf)!r}"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock.settimeout(self.timeout)
        self.sock = ctx.wrap_socket(self.sock)
        cipher = self.sock.cipher()
        return cipher[0] if cipher else "unknown"

    def shutdown_write(self) -> None:
        if isinstance(self.sock, ssl.SSLSocket):
            return  # SSLSocket.shutdown drops the TLS layer; the server closes after QUIT
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def qp_of(reply_line: bytes) -> int | None:
    m = QP_RE.match(reply_line)
    return int(m.group(1)) if m else None


def deliveries(maildir: Path, qp: int) -> list[bytes]:
    """Every delivered file of the message whose queue trace number is ``qp``."""
    marker = f"(qmail {qp} invoked from network)".encode()
    out = []
    new = maildir / "new"
    for path in sorted(new.iterdir()) if new.exists() else []:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if marker in data[:4096]:
            out.append(data)
    return out


def wait_deliveries(inst: Instance, qp: int, count: int = 1, maildir: Path | None = None,
                    timeout: float = 20.0) -> list[bytes]:
    box = maildir or inst.home / "Maildir"
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(box, qp)
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) >= count, (f"qp {qp}: {len(found)} of {count} deliveries in {box}\n"
                                 f"--- log:\n{inst.log()[-4000:]}")
    return found


def split_delivery(data: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(Return-Path value, Delivered-To value, qmail-queue's Received line, the SMTP
    Received header (all its lines), the message as the client sent it)."""
    rp, dt, qq, rest = data.split(b"\n", 3)
    assert rp.startswith(b"Return-Path: <") and dt.startswith(b"Delivered-To: "), data[:300]
    m = re.match(rb"Received: from [^\n]*\n(?:  [^\n]*\n)*?  [^\n]*; " + DATE_RE + rb"\n", rest)
    assert m, f"no SMTP Received line: {rest[:300]!r}"
    return rp[14:-1], dt[14:], qq + b"\n", m.group(0), rest[m.end():]


def smtpd_log(inst: Instance, remote_ip: str, since: int = 0) -> list[str]:
    """eQmail's ``qmail-smtpd: ...`` lines about sessions from ``remote_ip`` logged after
    byte offset ``since`` of the log (timestamps cut off)."""
    try:
        with open(inst.root / "log" / "eqmail.log", "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        at = line.find("qmail-smtpd: ")
        if at >= 0 and f" from {remote_ip} to " in line:
            out.append(line[at:])
    return out


def log_size(inst: Instance) -> int:
    try:
        return os.path.getsize(inst.root / "log" / "eqmail.log")
    except OSError:
        return 0


def wait_log(inst: Instance, predicate: str, since: int = 0, timeout: float = 10.0) -> str:
    """The log text after ``since`` once it contains ``predicate``."""
    deadline = time.monotonic() + timeout
    while True:
        with open(inst.root / "log" / "eqmail.log", "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        if predicate in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"log never showed {predicate!r}:\n{text[-4000:]}")
        time.sleep(0.02)


CHECKPASSWORD = '''#!{python} -I
"""Test checkpassword (DJB interface): records its input and environment and answers
as the test told it to, per client port (TCPREMOTEPORT)."""
import json, os, signal, sys
state = sys.argv[1]
data = b""
while True:
    chunk = os.read(3, 4096)
    if not chunk:
        break
    data += chunk
user, password, challenge = (data.split(b"\\0") + [b"", b"", b""])[:3]
port = os.environ.get("TCPREMOTEPORT", "0")
calls = os.path.join(state, port + ".calls")
n = 0
if os.path.exists(calls):
    with open(calls) as f:
        n = sum(1 for _ in f)
with open(calls, "a") as f:
    f.write(json.dumps({{"user": user.decode("latin-1"), "password": password.decode("latin-1"),
                        "challenge": challenge.decode("latin-1"), "env": dict(os.environ)}}) + "\\n")
outcome = "ok"
try:
    with open(os.path.join(state, port + ".outcomes")) as f:
        wanted = f.read().split()
    if n < len(wanted):
        outcome = wanted[n]
except OSError:
    pass
if outcome == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(0 if outcome == "ok" else 1)
'''


def install_checkpassword(root: Path, python: str) -> tuple[Path, Path]:
    """Write the test checkpassword program and its state directory (writable by the
    listener's user, eqmaild when root); returns (program, state dir)."""
    state = root / "cpw-state"
    state.mkdir()
    os.chmod(state, 0o1777)
    prog = root / "checkpassword.py"
    prog.write_text(CHECKPASSWORD.format(python=python))
    os.chmod(prog, 0o755)
    return prog, state


def add_catchall_mailbox(inst: Instance) -> None:
    """users/assign ``+testuser-`` plus a .qmail-default: every virtual recipient
    ``testuser-<address>`` (control/virtualdomains ``:testuser``) lands in the Maildir,
    so each message of a transcript can be read back without any remote delivery."""
    assign = inst.root / "users" / "assign"
    lines = assign.read_text().splitlines()
    owner = TEST_USER if IS_ROOT else pwd.getpwuid(inst.uid).pw_name
    lines.insert(lines.index("."), f"+testuser-:{owner}:{inst.uid}:{inst.gid}:{inst.home}:-::")
    assign.write_text("\n".join(lines) + "\n")
    dot = inst.home / ".qmail-default"
    dot.write_text("./Maildir/\n")
    os.chown(dot, inst.uid, inst.gid)
    os.chmod(dot, 0o644)
