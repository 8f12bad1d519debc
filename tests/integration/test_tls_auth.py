"""STARTTLS, SMTPS, SMTP AUTH, the submission port and TLSREQUIRED, with real clients.

One instance (module scope) serves every live test here on IPv4 and IPv6, four services:

=========  ==============================================================================
smtp       STARTTLS, AUTH checked by a DJB-interface checkpassword written in shell
submission SUBMISSIONPORT = its port, TLSREQUIRED=1, tcp rules giving RELAYCLIENT (which
           must not count), AUTH checked by the shipped ``eqmail-checkpassword``
smtps      implicit TLS (SMTPS=1), eqmail-checkpassword
tlsreq     like smtp, but tcp rules set TLSREQUIRED=1 for 127.0.0.1 only (per session)
=========  ==============================================================================

The server certificate (RSA, so that DHE and dh2048.pem are in play) and the client
certificates come from a CA minted by tests/certs.py.  Failed AUTHs come from their own
127.0.0.N source address each, so the per-address lock-out of one test does not touch
another.  A second instance (set up, started, reloaded) checks the certificate files an
admin gets, the privilege split, and a certificate swap on reload.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CA
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from harness import IS_ROOT, ME, Instance, bin_path

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (privilege split, eqmaild)")

PASSWORD = "Secret1"
FOREIGN = "someone@remote.example"
TIMEOUTSMTPD = 4
AUTH_DELAY = 0.3

# Where and how checkpassword runs (for connections from 127.0.0.23): its user, the fds
# it has, its cwd; printed to the log, and the check fails.
WHOAMI = ('import os, pwd, sys; u = pwd.getpwuid(os.getuid()).pw_name; '
          'fds = [str(fd) for fd in range(1024) if os.path.exists("/dev/fd/%d" % fd)]; '
          'print("checkpassword ran as", u, "with fds", *fds, "in", os.getcwd(), file=sys.stderr); '
          'sys.exit(1)')
SHELL_CHECKER = f"""#!/bin/sh
# DJB's checkpassword interface, as an admin writes one: fd 3 carries
# user NUL password NUL challenge NUL; exit 0 = yes, then run the rest of argv.
[ "$TCPREMOTEIP" = 127.0.0.23 ] && exec /usr/bin/python3 -S -c '{WHOAMI}'
input=$(tr '\\0' '\\n' <&3)
user=$(printf '%s\\n' "$input" | sed -n 1p)
pass=$(printf '%s\\n' "$input" | sed -n 2p)
challenge=$(printf '%s\\n' "$input" | sed -n 3p)
[ "$user" = crash ] && kill -9 $$
[ "$user" = alice ] || exit 1
if [ -n "$challenge" ]; then
  want=$(printf '%s' "$challenge" | openssl dgst -md5 -hmac '{PASSWORD}' | sed 's/^.*= //')
  [ "$pass" = "$want" ] || exit 1
else
  [ "$pass" = '{PASSWORD}' ] || exit 1
fi
exec "$@"
"""


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    """A port free on both 127.0.0.1 and ::1 (the listeners bind both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@dataclass
class World:
    inst: Instance
    tmp: Path
    ports: dict[str, int]
    ca: CA
    ca_file: Path
    client: dict[str, tuple[Path, Path]]


def swaks(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(["swaks", "--timeout", "15", "--helo", "client.example",
                           "--from", "sender@client.example", *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.stdout + proc.stderr


def got(out: str, reply: str) -> bool:
    """swaks printed ``reply`` from the server (``<-`` in clear, ``<~`` inside TLS, a
    ``*`` for an error reply)."""
    return any(f"{prefix} {reply}" in out for prefix in ("<- ", "<~ ", "<-*", "<~*", "<**"))


def server_args(host: str, port: int) -> list[str]:
    return ["--server", host, "--port", str(port)]


class Raw:
    """A line-level SMTP client on a plain socket (exact bytes, injection tests)."""

    def __init__(self, host: str, port: int, source: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply, raw."""
        out = b""
        while True:
            line = self.line()
            out += line
            if line[3:4] != b"-":
                return out

    def cmd(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext, host: str) -> None:
        assert not self.buf, "plain-text bytes left over before the handshake"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=host)

    def close(self) -> None:
        self.sock.close()


def client_ctx(world: World, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(world.ca_file))
    if cert is not None:
        crt, key = world.client[cert]
        ctx.load_cert_chain(str(crt), str(key))
    return ctx


def delivered_headers(inst: Instance, before: set[Path]) -> str:
    """The header of the one message delivered since ``before`` was taken."""
    new = set(inst.wait_for_mail(len(before) + 1)) - before
    assert len(new) == 1, new
    return new.pop().read_text(errors="replace").split("\n\n", 1)[0]


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


# ------------------------------------------------------------------ the shared instance


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    ports = {name: free_port() for name in ("smtp", "submission", "smtps", "tlsreq")}
    inst = Instance.create(listen=None)
    tmp = inst.root / "client"
    tmp.mkdir()
    checker = inst.root / "checkpw.sh"
    checker.write_text(SHELL_CHECKER)
    checker.chmod(0o755)
    passwords = inst.root / "passwords"
    for user, cram in (("alice", True), ("bob", False)):
        args = [bin_path("eqmail-checkpassword"), "passwd", "add", user, "--file", str(passwords)]
        subprocess.run(args + (["--cram"] if cram else []), input=f"{PASSWORD}\n", text=True,
                       check=True, capture_output=True)
    ours = f"{bin_path('eqmail-checkpassword')} --file {passwords} /bin/true"
    lines = []
    for host in ("127.0.0.1", "[::1]"):
        lines += [
            f"smtp {host}:{ports['smtp']} checkpassword='{checker} /bin/true'",
            f"submission {host}:{ports['submission']} SUBMISSIONPORT={ports['submission']} "
            f"TLSREQUIRED=1 rules=tcp.submission checkpassword='{ours}'",
            f"smtps {host}:{ports['smtps']} checkpassword='{ours}'",
            f"smtp {host}:{ports['tlsreq']} rules=tcp.tlsreq checkpassword='{checker} /bin/true'",
        ]
    inst.write_control("listen", "\n".join(lines))
    inst.write_control("tcp.submission", ':allow,RELAYCLIENT=""')
    inst.write_control("tcp.tlsreq", '127.0.0.1:allow,TLSREQUIRED="1"\n:allow')
    inst.write_control("timeoutsmtpd", str(TIMEOUTSMTPD))
    inst.write_control("authlimit", f"3 60 {AUTH_DELAY}")
    ca = CA.create()
    server = ca.server(ME, "127.0.0.1", "::1", rsa_bits=2048)
    (inst.root / "control" / "servercert.pem").write_bytes(server.chain_and_key)
    os.chmod(inst.root / "control" / "servercert.pem", 0o600)
    inst.write_control("clientca.pem", ca.pem.decode())
    inst.write_control("tlsclients", "relay@client.example")
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.pem)
    client = {
        "listed": ca.client("relay client", "relay@client.example").write(tmp, "listed"),
        "unlisted": ca.client("other client", "other@client.example").write(tmp, "unlisted"),
        "noemail": ca.client("no email").write(tmp, "noemail"),
        "foreign": CA.create("another CA").client("x", "relay@client.example").write(tmp, "foreign"),
    }
    try:
        inst.start()
        yield World(inst, tmp, ports, ca, ca_file, client)
    finally:
        inst.destroy()


HOSTS = pytest.mark.parametrize("host", ["127.0.0.1", "::1"])


# ------------------------------------------------------------------ STARTTLS and SMTPS


@HOSTS
def test_swaks_starttls_delivers_with_esmtps(world: World, host: str) -> None:
    before = set(world.inst.maildir_files())
    out = swaks(*server_args(host, world.ports["smtp"]), "--tls", "--tls-verify",
                "--tls-ca-path", str(world.ca_file), "--to", f"testuser@{ME}")
    assert "TLS started with cipher TLSv1.3" in out or "TLS started with cipher TLSv1.2" in out, out
    assert re.search(r"<~  250 ok \d+ qp \d+", out), out
    headers = delivered_headers(world.inst, before)
    assert re.search(r"by mx\.test\.example with ESMTPS \(TLS_\w+ encrypted\)", headers), headers


@HOSTS
def test_swaks_smtps_with_auth_login(world: World, host: str) -> None:
    before = set(world.inst.maildir_files())
    out = swaks(*server_args(host, world.ports["smtps"]), "--tlsc", "--tls-verify",
                "--tls-ca-path", str(world.ca_file), "--auth", "LOGIN", "--auth-user", "bob",
                "--auth-password", PASSWORD, "--to", f"testuser@{ME}")
    assert "<~  220 mx.test.example ESMTP" in out, out  # the banner came through TLS
    assert got(out, "334 Username:") and got(out, "334 Password:"), out
    assert got(out, "235 ok, bob, go ahead (#2.0.0)"), out
    headers = delivered_headers(world.inst, before)
    addr = "127.0.0.1" if host == "127.0.0.1" else "::1"
    assert f"(bob@{addr})" in headers and "with ESMTPA;" in headers, headers


def _s_client(port: int, host: str, *extra: str, starttls: bool = True) -> str:
    cmd = ["openssl", "s_client", "-ign_eof", "-connect", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if starttls:
        cmd += ["-starttls", "smtp"]
    proc = subprocess.run(cmd + list(extra), input=b"QUIT\r\n", capture_output=True, timeout=30)
    return (proc.stdout + proc.stderr).decode(errors="replace")


@HOSTS
def test_openssl_s_client_certificate_protocol_and_key_exchange(world: World, host: str) -> None:
    port = world.ports["smtp"]
    out = _s_client(port, host, "-CAfile", str(world.ca_file), "-verify_return_error")
    assert "Verify return code: 0 (ok)" in out, out
    assert f"CN = {ME}" in out, out
    assert re.search(r"Protocol\s*: TLSv1\.[23]", out) or "New, TLSv1.3" in out, out
    # ECDHE by default ...
    assert re.search(r"Server Temp Key: (X25519|ECDH)", out), out
    # ... and DHE with dh2048.pem's 2048-bit group when a client asks for it (RSA cert).
    dhe = _s_client(port, host, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256")
    assert "Server Temp Key: DH, 2048 bits" in dhe, dhe
    # TLS 1.0 and 1.1 are refused even when the client would go down to them, with an
    # alert the client can read (STARTTLS and SMTPS).
    for old in ("-tls1", "-tls1_1"):
        refused = _s_client(port, host, old, "-cipher", "DEFAULT@SECLEVEL=0")
        assert "alert protocol version" in refused, refused
        refused = _s_client(world.ports["smtps"], host, old, "-cipher", "DEFAULT@SECLEVEL=0", starttls=False)
        assert "alert protocol version" in refused, refused
    smtps = _s_client(world.ports["smtps"], host, starttls=False)
    assert "220 mx.test.example ESMTP" in smtps, smtps


def test_starttls_injection_is_not_executed(world: World) -> None:
    """CVE-2011-0411: a command sent in the same packet as STARTTLS must be dropped,
    not answered inside TLS."""
    raw = Raw("127.0.0.1", world.ports["smtp"])
    raw.reply()
    raw.cmd(b"EHLO client.example")
    raw.send(b"STARTTLS\r\nRSET\r\n")
    assert raw.reply() == b"220 ready for tls\r\n"
    raw.starttls(client_ctx(world), ME)
    # The first reply inside TLS must be the one to our NOOP, not a 250 for the RSET.
    raw.send(b"NOOP\r\nQUIT\r\n")
    assert raw.reply() == b"250 ok\r\n"
    assert raw.reply().startswith(b"221 ")
    with pytest.raises(EOFError):
        raw.line()
    raw.close()


def test_starttls_replies(world: World) -> None:
    raw = Raw("::1", world.ports["smtp"])
    raw.reply()
    assert b"250-STARTTLS\r\n" in raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"STARTTLS now") == b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
    assert raw.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    raw.starttls(client_ctx(world), ME)
    ehlo = raw.cmd(b"EHLO client.example")
    assert b"STARTTLS" not in ehlo
    assert raw.cmd(b"STARTTLS") == b"502 unimplemented (#5.5.1)\r\n"
    raw.close()


def test_stalled_handshakes_are_bounded_by_timeoutsmtpd(world: World) -> None:
    results: dict[str, float] = {}

    def stall(name: str, port: int, starttls: bool) -> None:
        raw = Raw("127.0.0.1", port)
        raw.sock.settimeout(TIMEOUTSMTPD + 10)
        start = time.monotonic()
        if starttls:
            raw.reply()
            raw.cmd(b"EHLO client.example")
            assert raw.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
            start = time.monotonic()
        try:  # say nothing; the server must hang up on its own
            while raw.sock.recv(4096):
                pass
        except OSError:
            pass
        results[name] = time.monotonic() - start
        raw.close()

    threads = [threading.Thread(target=stall, args=("starttls", world.ports["smtp"], True)),
               threading.Thread(target=stall, args=("smtps", world.ports["smtps"], False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, took in results.items():
        assert TIMEOUTSMTPD - 0.5 <= took <= TIMEOUTSMTPD + 3, (name, took)
    assert len(results) == 2


# ------------------------------------------------------------------ AUTH


MECHS = ["PLAIN", "LOGIN", "CRAM-MD5"]


@HOSTS
@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
@pytest.mark.parametrize("mech", MECHS)
def test_swaks_auth_with_shell_checkpassword_allows_relay(world: World, host: str, tls: bool,
                                                          mech: str) -> None:
    out = swaks(*server_args(host, world.ports["smtp"]), *(["--tls"] if tls else []),
                "--auth", mech, "--auth-user", "alice", "--auth-password", PASSWORD,
                "--to", FOREIGN, "--quit-after", "RCPT")
    assert got(out, "235 ok, alice, go ahead (#2.0.0)"), out
    assert got(out.split("RCPT TO:")[1], "250 ok"), out  # RELAYCLIENT set by AUTH


def test_auth_prompts_and_initial_responses(world: World) -> None:
    raw = Raw("127.0.0.1", world.ports["smtp"])
    raw.reply()
    raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"AUTH LOGIN") == b"334 Username:\r\n"       # eQmail 1.09: clear text
    assert raw.cmd(b64("alice")) == b"334 Password:\r\n"
    assert raw.cmd(b64(PASSWORD)) == b"235 ok, alice, go ahead (#2.0.0)\r\n"
    assert raw.cmd(b"AUTH PLAIN") == b"503 you're already authenticated (#5.5.0)\r\n"
    raw.close()
    raw = Raw("127.0.0.1", world.ports["smtp"])
    raw.reply()
    raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"AUTH LOGIN " + b64("alice")) == b"334 Password:\r\n"
    assert raw.cmd(b"*") == b"501 auth exchange canceled (#5.0.0)\r\n"
    assert raw.cmd(b"AUTH PLAIN") == b"334 \r\n"
    assert raw.cmd(b64(f"\0alice\0{PASSWORD}")) == b"235 ok, alice, go ahead (#2.0.0)\r\n"
    raw.close()
    raw = Raw("::1", world.ports["smtp"])
    raw.reply()
    raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"AUTH PLAIN " + b64(f"\0alice\0{PASSWORD}")) == b"235 ok, alice, go ahead (#2.0.0)\r\n"
    raw.close()
    raw = Raw("127.0.0.1", world.ports["smtp"])
    raw.reply()
    raw.cmd(b"EHLO client.example")
    challenge = raw.cmd(b"AUTH CRAM-MD5")
    assert challenge.startswith(b"334 ")
    text = base64.b64decode(challenge[4:].strip())
    assert re.fullmatch(rb"<\d+\.\d+@mx\.test\.example>", text), text
    digest = hmac.new(PASSWORD.encode(), text, hashlib.md5).hexdigest()
    assert raw.cmd(b64(f"alice {digest}")) == b"235 ok, alice, go ahead (#2.0.0)\r\n"
    raw.close()


def test_wrong_password_gets_535_after_the_delay(world: World) -> None:
    raw = Raw("127.0.0.1", world.ports["smtp"], source="127.0.0.21")
    raw.reply()
    raw.cmd(b"EHLO client.example")
    start = time.monotonic()
    assert raw.cmd(b"AUTH PLAIN " + b64("\0alice\0wrong")) == b"535 authentication failed (#5.7.1)\r\n"
    assert time.monotonic() - start >= AUTH_DELAY
    raw.close()


def test_crashing_checkpassword_gets_454(world: World) -> None:
    out = swaks(*server_args("127.0.0.1", world.ports["smtp"]), "--local-interface", "127.0.0.22",
                "--auth", "PLAIN", "--auth-user", "crash", "--auth-password", "x",
                "--to", FOREIGN, "--quit-after", "AUTH")
    assert got(out, "454 oops, problem with child and I can't auth (#4.3.0)"), out


def test_checkpassword_runs_in_the_plugin_sandbox(world: World) -> None:
    out = swaks(*server_args("127.0.0.1", world.ports["smtp"]), "--local-interface", "127.0.0.23",
                "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
                "--to", FOREIGN, "--quit-after", "AUTH")
    assert got(out, "535 authentication failed (#5.7.1)"), out
    deadline = time.monotonic() + 5
    while "checkpassword ran as" not in world.inst.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [ln for ln in world.inst.log().splitlines() if "checkpassword ran as" in ln]
    # eqmailp, not the listener's eqmaild; only fds 0-3; in the instance root
    assert line.endswith(f"checkpassword ran as eqmailp with fds 0 1 2 3 in {world.inst.root}"), line


def test_smtplib_starttls_login_on_submission(world: World) -> None:
    for host in ("127.0.0.1", "::1"):
        before = set(world.inst.maildir_files())
        with smtplib.SMTP(host, world.ports["submission"], local_hostname="client.example",
                          timeout=20) as smtp:
            smtp.starttls(context=client_ctx(world))
            smtp.ehlo("client.example")
            assert "PLAIN" in smtp.esmtp_features["auth"]
            smtp.login("bob", PASSWORD)  # eqmail-checkpassword, Argon2id hash
            smtp.sendmail("bob@client.example", [f"testuser@{ME}"],
                          b"Subject: submission\r\n\r\nhello\r\n")
        headers = delivered_headers(world.inst, before)
        assert "(bob@" in headers and "with ESMTPA;" in headers, headers


def test_submission_refuses_mail_before_auth(world: World) -> None:
    # tcp.submission sets RELAYCLIENT="" for everybody: that must not count here,
    # and neither does a client certificate.
    raw = Raw("127.0.0.1", world.ports["submission"])
    raw.reply()
    raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"MAIL FROM:<a@client.example>") == b"530 Authorization required (#5.7.1) \r\n"
    assert raw.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    raw.starttls(client_ctx(world, "listed"), ME)
    raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"MAIL FROM:<a@client.example>") == b"530 Authorization required (#5.7.1) \r\n"
    assert raw.cmd(b"AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}")).startswith(b"235 ")
    assert raw.cmd(b"MAIL FROM:<a@client.example>") == b"250 ok\r\n"
    raw.close()


def test_tlsrequired_per_listener(world: World) -> None:
    for host in ("127.0.0.1", "::1"):
        raw = Raw(host, world.ports["submission"])
        raw.reply()
        ehlo = raw.cmd(b"EHLO client.example")
        assert b"250 AUTH CRAM-MD5\r\n" in ehlo and b"PLAIN" not in ehlo, ehlo
        required = b"538 AUTH PLAIN/LOGIN not available without TLS (#5.3.3)\r\n"
        assert raw.cmd(b"AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}")) == required
        assert raw.cmd(b"AUTH LOGIN") == required
        for name in (b"cram-md5", b"CRAM-MD5"):  # eqmail: case-insensitive exemption
            assert raw.cmd(b"AUTH " + name).startswith(b"334 ")
            assert raw.cmd(b"*") == b"501 auth exchange canceled (#5.0.0)\r\n"
        raw.close()
    # Real clients: CRAM-MD5 in clear with eqmail-checkpassword's stored HMAC states;
    # a user stored without them fails cleanly; PLAIN works after STARTTLS.
    port = world.ports["submission"]
    out = swaks(*server_args("::1", port), "--auth", "CRAM-MD5", "--auth-user", "alice",
                "--auth-password", PASSWORD, "--to", f"testuser@{ME}", "--quit-after", "RCPT")
    assert got(out, "235 ok, alice, go ahead (#2.0.0)"), out
    out = swaks(*server_args("127.0.0.1", port), "--local-interface", "127.0.0.23",
                "--auth", "CRAM-MD5", "--auth-user", "bob", "--auth-password", PASSWORD,
                "--to", f"testuser@{ME}", "--quit-after", "AUTH")
    assert "535 authentication failed (#5.7.1)" in out, out
    out = swaks(*server_args("127.0.0.1", port), "--tls", "--auth", "PLAIN", "--auth-user", "bob",
                "--auth-password", PASSWORD, "--to", f"testuser@{ME}", "--quit-after", "RCPT")
    assert got(out, "235 ok, bob, go ahead (#2.0.0)"), out


def test_tlsrequired_per_session_from_tcp_rules(world: World) -> None:
    port = world.ports["tlsreq"]
    raw = Raw("127.0.0.1", port)
    raw.reply()
    assert b"250 AUTH CRAM-MD5\r\n" in raw.cmd(b"EHLO client.example")
    assert raw.cmd(b"AUTH PLAIN " + b64(f"\0alice\0{PASSWORD}")) == (
        b"538 AUTH PLAIN/LOGIN not available without TLS (#5.3.3)\r\n")
    raw.close()
    out = swaks(*server_args("127.0.0.1", port), "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                "--auth-password", PASSWORD, "--to", FOREIGN, "--quit-after", "AUTH")
    assert got(out, "235 ok, alice, go ahead (#2.0.0)"), out
    out = swaks(*server_args("::1", port), "--auth", "PLAIN", "--auth-user", "alice",
                "--auth-password", PASSWORD, "--to", FOREIGN, "--quit-after", "AUTH")
    assert got(out, "235 ok, alice, go ahead (#2.0.0)"), out  # the rule is for 127.0.0.1 only


# ------------------------------------------------------------------ client certificates


REFUSED = "553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying"


@pytest.mark.parametrize("cert, expect", [
    ("listed", "<~  250 ok"),
    ("unlisted", f"{REFUSED}: email address not in my list of tlsclients (#5.7.1)"),
    ("noemail", f"{REFUSED}: contains no email address (#5.7.1)"),
    (None, f"{REFUSED} (#5.7.1)"),
])
@HOSTS
def test_client_certificate_relay(world: World, host: str, cert: str | None, expect: str) -> None:
    args = [*server_args(host, world.ports["smtp"]), "--tls", "--to", FOREIGN, "--quit-after", "RCPT"]
    if cert is not None:
        crt, key = world.client[cert]
        args += ["--tls-cert", str(crt), "--tls-key", str(key)]
    out = swaks(*args)
    assert expect in out.split("RCPT TO:")[1], out
    # Outside TLS the refusal is qmail's plain one.
    if cert is None:
        out = swaks(*server_args(host, world.ports["smtp"]), "--to", FOREIGN, "--quit-after", "RCPT")
        assert "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)" in out, out


@HOSTS
def test_client_certificate_from_another_ca_is_served_but_does_not_relay(world: World, host: str) -> None:
    # The handshake completes (as netqmail's verify_cb); only the relay is refused, with
    # OpenSSL's verify text.  tests/integration/test_tls_interop.py has the rest.
    crt, key = world.client["foreign"]
    out = swaks(*server_args(host, world.ports["smtp"]), "--tls", "--tls-cert", str(crt),
                "--tls-key", str(key), "--to", FOREIGN, "--quit-after", "RCPT")
    assert f"{REFUSED}: unable to verify the first certificate (#5.7.1)" in out.split("RCPT TO:")[1], out


# ------------------------------------------------------------------ brute force


def test_repeated_failures_lock_the_address_out(world: World) -> None:
    source = "127.0.0.31"
    raw = Raw("127.0.0.1", world.ports["smtp"], source=source)
    raw.reply()
    raw.cmd(b"EHLO client.example")
    took = []
    for n in range(3):  # control/authlimit: 3 failures within 60 s
        start = time.monotonic()
        answer = raw.cmd(b"AUTH PLAIN " + b64("\0alice\0guess"))
        took.append(time.monotonic() - start)
        if n < 2:
            assert answer == b"535 authentication failed (#5.7.1)\r\n"
    # the session's third failure closes it (eqmail.smtp.session.MAX_AUTH_FAILURES)
    assert answer == b"421 too many authentication failures, closing connection (#4.7.0)\r\n"
    assert raw.sock.recv(100) == b""
    assert took[0] >= AUTH_DELAY and took[2] >= 3 * AUTH_DELAY, took  # slowed down
    raw.close()
    raw = Raw("127.0.0.1", world.ports["smtp"], source=source)
    raw.reply()
    raw.cmd(b"EHLO client.example")
    locked = b"454 too many authentication failures, try later (#4.7.0)\r\n"
    start = time.monotonic()
    assert raw.cmd(b"AUTH PLAIN " + b64(f"\0alice\0{PASSWORD}")) == locked  # even the right one
    assert time.monotonic() - start < AUTH_DELAY  # refused at once, checker not run
    raw.close()
    # Another connection from the same address is refused too; other addresses are not.
    out = swaks(*server_args("127.0.0.1", world.ports["smtp"]), "--local-interface", source,
                "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
                "--to", FOREIGN, "--quit-after", "AUTH")
    assert "454 too many authentication failures, try later (#4.7.0)" in out, out
    out = swaks(*server_args("127.0.0.1", world.ports["smtp"]), "--local-interface", "127.0.0.32",
                "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
                "--to", FOREIGN, "--quit-after", "AUTH")
    assert got(out, "235 ok, alice, go ahead (#2.0.0)"), out
    log = world.inst.log()
    assert f"qmail-smtpd: auth failed: plain alice from {source} (locked out)" in log
    assert f"qmail-smtpd: auth refused (too many failures): login alice from {source}" in log


# ------------------------------------------------------------------ certificates as an admin sees them


def _peer_cert(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=ctx)
        assert smtp.sock is not None
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der
    return x509.load_der_x509_certificate(der)


def test_setup_certificates_privileges_and_reload(tmp_path: Path) -> None:
    port = free_port()
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}")
    try:
        control = inst.root / "control"
        cert_file, dh_file = control / "servercert.pem", control / "dh2048.pem"
        for f in (cert_file, dh_file):
            st = f.stat()
            assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0), f
        cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [ME]
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert 366 <= days <= 367
        show = inst.ctl("cert", "show").stdout
        assert "key: ECDSA secp256r1" in show and "dh2048.pem: 2048 bits" in show, show
        old = cert_file.read_bytes(), dh_file.read_bytes()
        assert "kept" in inst.ctl("setup", "--me", ME).stdout
        assert (cert_file.read_bytes(), dh_file.read_bytes()) == old  # never overwritten

        # make cert-req: a CSR and a pending key; the CA signs; install; mismatch refused.
        inst.ctl("cert", "request")
        csr = x509.load_pem_x509_csr((control / "servercert.csr").read_bytes())
        assert csr.subject.rfc4514_string() == f"CN={ME}"
        assert (control / "servercert.key.pending").stat().st_mode & 0o777 == 0o600
        ca = CA.create()
        wrong = tmp_path / "wrong.pem"
        wrong.write_bytes(ca.server(ME).chain_and_key.split(b"-----BEGIN PRIVATE")[0])
        bad = inst.ctl("cert", "install", str(wrong), check=False)
        assert bad.returncode == 1 and "does not match the pending key" in bad.stderr
        signed = _sign_csr(ca, csr)
        good = tmp_path / "signed.pem"
        good.write_bytes(signed)
        inst.ctl("cert", "install", str(good))
        assert not (control / "servercert.key.pending").exists()

        inst.start()
        status = json.loads(inst.ctl("status", "--json").stdout)
        listener = next(w for w in status["workers"] if w["kind"] == "listener")
        assert listener["uid"] == pwd.getpwnam("eqmaild").pw_uid  # the key file is root's 0600
        first = _peer_cert(port)
        assert first.issuer == ca.cert.subject

        # A session open across the reload keeps going on the old certificate.
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
        smtp.starttls(context=ctx)
        smtp.ehlo("client.example")
        smtp.mail("sender@client.example")
        renew = inst.ctl("cert", "renew", "--rsa")
        assert "self-signed" in renew.stdout and "reload" in renew.stdout
        inst.ctl("reload")
        deadline = time.monotonic() + 15
        while True:
            now = _peer_cert(port)
            if now.serial_number != first.serial_number:
                break
            assert time.monotonic() < deadline, "the reload did not pick up the new certificate"
            time.sleep(0.2)
        assert now.issuer == now.subject and now.public_key().key_size == 3072  # type: ignore[union-attr]
        smtp.rcpt(f"testuser@{ME}")
        code, _ = smtp.data(b"Subject: across a reload\r\n\r\nstill here\r\n")
        assert code == 250
        smtp.quit()
        inst.wait_for_mail(1)
    finally:
        inst.destroy()


def _sign_csr(ca: CA, csr: x509.CertificateSigningRequest) -> bytes:
    import datetime

    from certs import cert_pem

    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.name)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(ca.key, hashes.SHA256()))
    return cert_pem(cert) + ca.pem  # leaf, then the chain
