"""TLS that interoperates: client certificates from any CA, the cipher policy, alerts.

One instance (module scope) with control/clientca.pem and control/tlsclients serves four
listeners on 127.0.0.1:

=========  ==============================================================================
smtp       STARTTLS, asks for a client certificate naming clientca.pem's CA
submission STARTTLS, likewise
smtps      implicit TLS, likewise
nocert     STARTTLS with the listener option clientcert=0: no certificate request
=========  ==============================================================================

The server certificate (RSA: RSA key exchange and the CBC suites would be possible if
the policy allowed them) comes from a "server CA"; the client certificates from the
"client CA" in clientca.pem (one listed in tlsclients, one not) or from a foreign CA
(with the very email address that tlsclients lists).  The clients are real ones:
``openssl s_client`` for TLS 1.2 and 1.3 and Python's smtplib; the remote-delivery side
meets ``openssl s_server``.
"""

from __future__ import annotations

import re
import select
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CA
from harness import IS_ROOT, ME, Instance, free_port, poll

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (privilege split, eqmaild)")

HOST = "127.0.0.1"
FOREIGN = "someone@remote.example"
RELAY_EMAIL = "relay@client.example"
REFUSED = "sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying"
SERVICES = ("smtp", "submission", "smtps", "nocert")


@dataclass
class World:
    inst: Instance
    ports: dict[str, int]
    server_ca: Path
    client: dict[str, tuple[Path, Path]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    ports = {name: free_port((HOST,)) for name in SERVICES}
    while len(set(ports.values())) < len(ports):
        ports = {name: free_port((HOST,)) for name in SERVICES}
    inst = Instance.create(listen="\n".join([
        f"smtp {HOST}:{ports['smtp']}",
        f"submission {HOST}:{ports['submission']}",
        f"smtps {HOST}:{ports['smtps']}",
        f"smtp {HOST}:{ports['nocert']} clientcert=0",
    ]))
    tmp = inst.root / "client"
    tmp.mkdir()
    server_ca, client_ca = CA.create("eqmail server CA"), CA.create("eqmail client CA")
    cert = inst.root / "control" / "servercert.pem"
    cert.write_bytes(server_ca.server(ME, HOST, rsa_bits=2048).chain_and_key)
    cert.chmod(0o600)
    inst.write_control("clientca.pem", client_ca.pem.decode())
    inst.write_control("tlsclients", RELAY_EMAIL)
    ca_file = tmp / "server-ca.pem"
    ca_file.write_bytes(server_ca.pem)
    client = {
        "listed": client_ca.client("listed", RELAY_EMAIL).write(tmp, "listed"),
        "unlisted": client_ca.client("unlisted", "other@client.example").write(tmp, "unlisted"),
        "foreign": CA.create("some other MTA's CA").client("mx.other.example", RELAY_EMAIL).write(tmp, "foreign"),
    }
    try:
        inst.start()
        yield World(inst, ports, ca_file, client)
    finally:
        inst.destroy()


def s_client(port: int, *args: str, dialogue: str = "QUIT\n", starttls: bool = True) -> str:
    cmd = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-ign_eof", "-crlf", *args]
    if starttls:
        cmd += ["-starttls", "smtp"]
    proc = subprocess.run(cmd, input=dialogue.encode(), capture_output=True, timeout=60)
    return (proc.stdout + proc.stderr).decode(errors="replace")


def after_handshake(out: str) -> str:
    """What the server said inside TLS (s_client prints it after the first session
    block; TLS 1.3 tickets print it again later)."""
    return out.split("Verify return code:", 1)[-1]


def client_ctx(world: World, cert: str | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(world.server_ca))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        crt, key = world.client[cert]
        ctx.load_cert_chain(str(crt), str(key))
    return ctx


def mail_with(world: World, service: str, cert: str | None, version: ssl.TLSVersion | None,
              rcpt: str) -> tuple[int, str, str]:
    """STARTTLS (or SMTPS) with smtplib: the RCPT reply and the cipher."""
    port, ctx = world.ports[service], client_ctx(world, cert, version)
    if service == "smtps":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(HOST, port, timeout=30, context=ctx)
    else:
        smtp = smtplib.SMTP(HOST, port, timeout=30)
        smtp.starttls(context=ctx)
    try:
        smtp.ehlo("client.example")
        smtp.mail("sender@client.example")
        code, text = smtp.rcpt(rcpt)
        cipher = smtp.sock.version()  # type: ignore[union-attr]
        return code, text.decode(), cipher or ""
    finally:
        smtp.quit()


# ------------------------------------------------------------------ client certificates


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("service", ["smtp", "smtps"])
def test_foreign_ca_certificate_completes_the_handshake_and_delivers(world: World, service: str,
                                                                     version: str) -> None:
    crt, key = world.client["foreign"]
    subject = f"foreign {uuid.uuid4().hex}"
    dialogue = (f"EHLO mx.other.example\nMAIL FROM:<sender@other.example>\nRCPT TO:<testuser@{ME}>\n"
                f"DATA\nSubject: {subject}\n\nfrom an MTA whose certificate we do not know\n.\nQUIT\n")
    before = set(world.inst.maildir_files())
    out = s_client(world.ports[service], "-cert", str(crt), "-key", str(key), version,
                   dialogue=dialogue, starttls=service != "smtps")
    assert "Acceptable client certificate CA names\nCN = eqmail client CA" in out, out
    inside = after_handshake(out)
    assert re.search(r"^250 ok \d+ qp \d+", inside, re.M), out
    assert "221 " in inside, out
    new = poll(lambda: set(world.inst.maildir_files()) - before, what="the delivery", inst=world.inst)
    assert any(subject in p.read_text(errors="replace") for p in new)  # type: ignore[union-attr]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_submission_port_completes_starttls_with_a_foreign_certificate(world: World,
                                                                       version: ssl.TLSVersion) -> None:
    # Whether mail needs AUTH there is the submission policy's business; the handshake
    # and the session inside TLS must work whatever certificate the client has.
    smtp = smtplib.SMTP(HOST, world.ports["submission"], timeout=30)
    try:
        smtp.starttls(context=client_ctx(world, "foreign", version))
        assert smtp.sock.version() == version.name.replace("v1_", "v1.")  # type: ignore[union-attr]
        code, text = smtp.ehlo("client.example")
        assert code == 250 and text.startswith(ME.encode()), text
        assert smtp.noop()[0] == 250
    finally:
        smtp.quit()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("service", ["smtp", "smtps"])
def test_smtplib_with_a_foreign_certificate_is_served_but_not_a_relay(world: World, service: str,
                                                                      version: ssl.TLSVersion) -> None:
    code, text, proto = mail_with(world, service, "foreign", version, f"testuser@{ME}")
    assert code == 250, text
    assert proto == version.name.replace("v1_", "v1."), proto
    code, text, _ = mail_with(world, service, "foreign", version, FOREIGN)
    # OpenSSL's verify text, as netqmail's X509_verify_cert_error_string
    assert (code, text) == (553, f"{REFUSED}: unable to verify the first certificate (#5.7.1)")


def test_smtplib_delivers_local_mail_with_a_foreign_certificate(world: World) -> None:
    before = set(world.inst.maildir_files())
    smtp = smtplib.SMTP(HOST, world.ports["smtp"], timeout=30)
    smtp.starttls(context=client_ctx(world, "foreign"))
    refused = smtp.sendmail("sender@other.example", [f"testuser@{ME}"],
                            b"Subject: smtplib foreign\r\n\r\nhello\r\n")
    smtp.quit()
    assert refused == {}
    world.inst.wait_for_mail(len(before) + 1)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize(("cert", "code", "text"), [
    ("listed", 250, "ok"),
    ("unlisted", 553, f"{REFUSED}: email address not in my list of tlsclients (#5.7.1)"),
    (None, 553, f"{REFUSED} (#5.7.1)"),
])
def test_only_a_clientca_certificate_listed_in_tlsclients_relays(world: World, version: ssl.TLSVersion,
                                                                 cert: str | None, code: int, text: str) -> None:
    for service in ("smtp", "smtps"):
        assert mail_with(world, service, cert, version, FOREIGN)[:2] == (code, text), service


def test_clientcert_0_sends_no_certificate_request(world: World) -> None:
    asked = s_client(world.ports["smtp"], "-tls1_2")
    assert "Acceptable client certificate CA names\nCN = eqmail client CA" in asked, asked
    for version in ("-tls1_2", "-tls1_3"):
        out = s_client(world.ports["nocert"], version)
        assert "No client certificate CA names sent" in out, out
        assert "Acceptable client certificate CA names" not in out, out
        assert "221 " in after_handshake(out), out
    # ... so even a listed certificate is never seen there: no certificate relay.
    code, text, _ = mail_with(world, "nocert", "listed", None, FOREIGN)
    assert (code, text) == (553, f"{REFUSED} (#5.7.1)")


# ------------------------------------------------------------------ cipher policy and alerts


@pytest.mark.parametrize("service", ["smtp", "smtps"])
def test_default_cipher_policy_is_mozilla_intermediate(world: World, service: str) -> None:
    port, starttls = world.ports[service], service != "smtps"
    for good in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305", "DHE-RSA-AES256-GCM-SHA384"):
        out = s_client(port, "-tls1_2", "-cipher", good, starttls=starttls)
        assert f"Cipher is {good}" in out, out
    # RSA key exchange, CBC (even with ECDHE), SHA-1 MACs: refused, with an alert.
    for bad in ("AES128-SHA", "AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"):
        out = s_client(port, "-tls1_2", "-cipher", bad, starttls=starttls)
        assert "alert handshake failure" in out and "Cipher is (NONE)" in out, out
    out = s_client(port, "-tls1_3", starttls=starttls)
    assert "New, TLSv1.3, Cipher is TLS_" in out, out


@pytest.mark.parametrize("service", ["smtp", "smtps"])
@pytest.mark.parametrize("old", ["-tls1", "-tls1_1"])
def test_old_protocol_versions_get_a_protocol_version_alert(world: World, service: str, old: str) -> None:
    out = s_client(world.ports[service], old, "-cipher", "DEFAULT@SECLEVEL=0", starttls=service != "smtps")
    assert "alert protocol version" in out, out
    log = world.inst.log()
    assert "TLS handshake failed from 127.0.0.1" in log


def test_tlsserverciphers_override_and_a_bad_one_refused_at_reload(tmp_path: Path) -> None:
    port = free_port((HOST,))
    inst = Instance.create(listen=f"smtp {HOST}:{port}",
                           extra_controls={"tlsserverciphers": "# old clients\nAES128-SHA\nECDHE-RSA-AES128-GCM-SHA256\n"})
    try:
        cert = inst.root / "control" / "servercert.pem"
        cert.write_bytes(CA.create().server(ME, HOST, rsa_bits=2048).chain_and_key)
        inst.start()
        out = s_client(port, "-tls1_2", "-cipher", "AES128-SHA")
        assert "Cipher is AES128-SHA" in out and "221 " in after_handshake(out), out
        # A string OpenSSL selects nothing from: refused, naming file and line; the
        # running policy stays.
        inst.write_control("tlsserverciphers", "# typo\nECDHE-RSA-AES128-GCM-SHA999\n")
        check = inst.ctl("check", check=False)
        assert check.returncode == 1, check.stdout
        assert "control/tlsserverciphers:2: OpenSSL selects no cipher from 'ECDHE-RSA-AES128-GCM-SHA999'" \
            in check.stdout, check.stdout
        refused = inst.ctl("reload", check=False)
        assert refused.returncode == 1 and "control/tlsserverciphers:2:" in refused.stderr, refused.stderr
        assert "Cipher is AES128-SHA" in s_client(port, "-tls1_2", "-cipher", "AES128-SHA")
        # Removing the file brings back the default at the next reload.
        (inst.root / "control" / "tlsserverciphers").unlink()
        inst.ctl("reload")
        poll(lambda: "alert handshake failure" in s_client(port, "-tls1_2", "-cipher", "AES128-SHA"),
             timeout=30, what="the default policy after the reload", inst=inst, interval=0.3)
    finally:
        inst.destroy()


# ------------------------------------------------------------------ remote delivery's client


@pytest.fixture
def cbc_server(tmp_path: Path) -> Iterator[int]:
    """``openssl s_server`` offering only TLS 1.2 with RSA key exchange and CBC."""
    crt, key = CA.create().server("mx.peer.example", HOST, rsa_bits=2048).write(tmp_path, "peer")
    port = free_port((HOST,))
    proc = subprocess.Popen(["openssl", "s_server", "-accept", f"{HOST}:{port}", "-cert", str(crt),
                             "-key", str(key), "-tls1_2", "-cipher", "AES128-SHA"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        ready = b""
        deadline = time.monotonic() + 30
        while b"ACCEPT" not in ready and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1)
            if r:
                ready += proc.stdout.read1(4096)  # type: ignore[attr-defined]
        assert b"ACCEPT" in ready, ready
        yield port
    finally:
        proc.kill()
        proc.wait()


def _client_handshake(tmp_path: Path, port: int, files: dict[str, str]) -> str:
    """The remote worker's TLS client (its Controls, TlsConfig, Transport) against ``port``."""
    from eqmail.control import load_controls
    from eqmail.smtp.transport import Dropped, TlsConfig, Transport

    root = tmp_path / "inst"
    (root / "control").mkdir(parents=True)
    (root / "users").mkdir()
    for name, text in {"me": "mx.test.example", **files}.items():
        (root / "control" / name).write_text(text)
    c = load_controls(root)
    tls = TlsConfig(root / "control", c.tlsclientciphers)
    transport = Transport(socket.create_connection((HOST, port), timeout=10), 10)
    try:
        conn = transport.start_tls(tls.context(""), "mx.peer.example")
        return str(conn.get_cipher_name())
    except Dropped as e:
        return f"refused: {e}"
    finally:
        transport.close()


def test_remote_client_refuses_a_cbc_rsa_server_unless_tlsclientciphers_allows(
        tmp_path: Path, cbc_server: int) -> None:
    assert _client_handshake(tmp_path, cbc_server, {}).startswith("refused: "), "default policy"
    assert _client_handshake(tmp_path / "b", cbc_server, {"tlsclientciphers": "AES128-SHA\n"}) == "AES128-SHA"
