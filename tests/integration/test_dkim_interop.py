"""DKIM interop with implementations nobody here wrote, over a real DNS server on loopback
(tests/dnsserver.py publishing the key records as TXT).

- eqmail signs (the LF form eqmail's queue stores; the message then goes out as CRLF):
  Perl's Mail::DKIM::Verifier (RSA; Debian 12's Mail::DKIM has no Ed25519) and OpenDKIM
  (RSA and Ed25519) verify.  Mail::DKIM is given the loopback server through
  ``Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ..., port => ...))``.
  OpenDKIM runs as ``opendkim -t`` (its test mode: the milter's own code path, reading the
  message from a file) with a configuration whose ``Nameservers`` names the loopback
  server; that option takes addresses only, no port, so the server listens on
  127.53.16.8 port 53 (root needed; the test is skipped otherwise).
  ``opendkim-testmsg`` cannot be used for verifying: it has no configuration file and no
  resolver option, so it asks the system resolver (which points nowhere here).
- Others sign, eqmail's verify() checks: Mail::DKIM::Signer (RSA) and OpenDKIM's test
  mode in signing mode (RSA and Ed25519; it prints the DKIM-Signature field it would
  insert).  ``opendkim-testmsg`` signing mode always writes rsa-sha1, which eqmail refuses
  by RFC 8301 (permerror): tested as such.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dkimkeys import ed_key, pem, records, rsa_key, signing_keys
from dnsserver import DnsServer, txt

from eqmail.dkim.dns import dnspython_txt_lookup
from eqmail.dkim.sign import sign
from eqmail.dkim.verify import Result, verify

DNS_HOST, DNS_PORT = "127.53.16.8", 53  # OpenDKIM's Nameservers cannot name a port

MESSAGE = (b"From: Ada <ada@example.com>\nTo: grace@example.org\nSubject: interop\n"
           b"Date: Mon, 7 Dec 2026 22:00:00 +0000\nMessage-ID: <interop@example.com>\n"
           b"MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n"
           b"\nHello  there,\n\nthis line ends in spaces   \n\n\n")

needs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("perl", "opendkim", "opendkim-testmsg")),
    reason="libmail-dkim-perl, opendkim and opendkim-tools (scripts/bootstrap.sh) not installed")
pytestmark = needs

VERIFY_PL = r"""
use strict; use warnings;
use Net::DNS::Resolver; use Mail::DKIM::Verifier; use Mail::DKIM::DNS;
my ($host, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$host], port => $port,
                                                  recurse => 0, tcp_timeout => 5, udp_timeout => 5));
my $v = Mail::DKIM::Verifier->new();
local $/; my $m = <STDIN>; $m =~ s/\r?\n/\r\n/g;
$v->PRINT($m); $v->CLOSE;
foreach my $s ($v->signatures) {
    printf "%s %s %s %s\n", $s->domain, $s->selector, $s->algorithm, $s->result_detail;
}
"""

SIGN_PL = r"""
use strict; use warnings;
use Mail::DKIM::Signer; use Mail::DKIM::TextWrap;
my ($keyfile) = @ARGV;
my $s = Mail::DKIM::Signer->new(Algorithm => "rsa-sha256", Method => "relaxed",
    Domain => "example.com", Selector => "rsa", KeyFile => $keyfile,
    Headers => "from:to:subject:date:message-id:mime-version:content-type");
local $/; my $m = <STDIN>; $m =~ s/\r?\n/\r\n/g;
$s->PRINT($m); $s->CLOSE;
print $s->signature->as_string, "\r\n";
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    zone = {name: {"TXT": [txt(values[0].decode())]} for name, values in records().items()}
    server = DnsServer(zone, host=DNS_HOST, port=DNS_PORT)
    try:
        server.start()
    except OSError as e:  # not root, or port 53 of that address taken
        pytest.skip(f"cannot serve DNS on {DNS_HOST}:{DNS_PORT}: {e}")
    yield server
    server.stop()


def wire(message: bytes) -> bytes:
    """The message as it goes out: CRLF line ends."""
    return re.sub(rb"\r?\n", b"\r\n", message)


def eqmail_signed() -> bytes:
    """Signed over the LF form the queue stores, then sent as CRLF."""
    return wire(sign(MESSAGE, signing_keys()) + MESSAGE)


def opendkim_conf(tmp: Path, lines: list[str]) -> Path:
    conf = tmp / "opendkim.conf"
    conf.write_text("\n".join(["Syslog no", f"Nameservers {DNS_HOST}", *lines]) + "\n")
    return conf


def opendkim_test(conf: Path, message: Path) -> str:
    done = subprocess.run(["opendkim", "-x", str(conf), "-vvv", "-t", str(message)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def loopback_lookup(dns: DnsServer):  # type: ignore[no-untyped-def]
    return dnspython_txt_lookup(((DNS_HOST, dns.port),), 5.0)


# ---- eqmail signs, others verify ----------------------------------------------------

def test_mail_dkim_verifies_eqmail_rsa(dns: DnsServer) -> None:
    done = subprocess.run(["perl", "-e", VERIFY_PL, DNS_HOST, str(dns.port)],
                          input=eqmail_signed(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "example.com rsa rsa-sha256 pass"
    # Debian 12's Mail::DKIM does not know Ed25519 (RFC 8463): it says so, no more
    assert lines[1].startswith("example.com ed ed25519-sha256 invalid")
    assert ("rsa._domainkey.example.com", "TXT") in dns.queries
    # and a changed body fails there too
    done = subprocess.run(["perl", "-e", VERIFY_PL, DNS_HOST, str(dns.port)],
                          input=eqmail_signed().replace(b"Hello", b"Hallo"),
                          capture_output=True, timeout=60)
    assert done.stdout.decode().splitlines()[0].startswith("example.com rsa rsa-sha256 fail")


def test_opendkim_verifies_eqmail_rsa_and_ed25519(dns: DnsServer, tmp_path: Path) -> None:
    msg = tmp_path / "signed.eml"
    msg.write_bytes(eqmail_signed())
    out = opendkim_test(opendkim_conf(tmp_path, ["Mode v", "AlwaysAddARHeader yes"]), msg)
    assert re.search(r"dkim=pass \(2048-bit key[^)]*\) header\.d=example\.com "
                     r"header\.i=@example\.com header\.a=rsa-sha256 header\.s=rsa", out), out
    assert re.search(r"dkim=pass header\.d=example\.com header\.i=@example\.com "
                     r"header\.a=ed25519-sha256 header\.s=ed", out), out
    msg.write_bytes(eqmail_signed().replace(b"Hello", b"Hallo"))
    out = opendkim_test(opendkim_conf(tmp_path, ["Mode v", "AlwaysAddARHeader yes"]), msg)
    assert "dkim=pass" not in out and "dkim=fail" in out, out


# ---- others sign, eqmail verifies ----------------------------------------------------

def key_file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def test_eqmail_verifies_mail_dkim_rsa(dns: DnsServer, tmp_path: Path) -> None:
    keyfile = key_file(tmp_path, "rsa.pem", pem(rsa_key()))
    done = subprocess.run(["perl", "-e", SIGN_PL, str(keyfile)], input=wire(MESSAGE),
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    field = done.stdout
    assert field.startswith(b"DKIM-Signature:") and b"a=rsa-sha256" in field
    got = verify(field + wire(MESSAGE), loopback_lookup(dns))
    assert [(r.result, r.domain, r.selector) for r in got] == [(Result.PASS, "example.com", "rsa")]
    got = verify(field + wire(MESSAGE).replace(b"interop", b"intErop"), loopback_lookup(dns))
    assert [r.result for r in got] == [Result.FAIL]


@pytest.mark.parametrize("selector, algorithm, key", [
    ("rsa", "rsa-sha256", rsa_key), ("ed", "ed25519-sha256", ed_key)])
def test_eqmail_verifies_opendkim(dns: DnsServer, tmp_path: Path, selector: str,
                                  algorithm: str, key) -> None:  # type: ignore[no-untyped-def]
    keyfile = key_file(tmp_path, f"{selector}.pem", pem(key()))
    conf = opendkim_conf(tmp_path, [
        "Mode s", "Domain example.com", f"Selector {selector}", f"KeyFile {keyfile}",
        f"SignatureAlgorithm {algorithm}", "Canonicalization relaxed/relaxed",
        "OversignHeaders From", "RequireSafeKeys false"])  # tmp_path is under /tmp (1777)
    msg = tmp_path / "plain.eml"
    msg.write_bytes(wire(MESSAGE))
    out = opendkim_test(conf, msg)
    m = re.search(r"### INSHEADER: idx=0 hname='DKIM-Signature' hvalue='([^']*)'", out)
    assert m, out
    field = b"DKIM-Signature: " + wire(m.group(1).encode() + b"\n")
    got = verify(field + wire(MESSAGE), loopback_lookup(dns))
    assert [(r.result, r.selector, r.algorithm) for r in got] == [
        (Result.PASS, selector, algorithm)]
    # OpenDKIM's signature over the CRLF form also verifies on the LF form eqmail stores
    assert [r.result for r in verify(field + MESSAGE, loopback_lookup(dns))] == [Result.PASS]


def test_opendkim_testmsg_signs_rsa_sha1_which_rfc8301_refuses(dns: DnsServer,
                                                              tmp_path: Path) -> None:
    keyfile = key_file(tmp_path, "rsa.pem", pem(rsa_key()))
    done = subprocess.run(["opendkim-testmsg", "-C", "-d", "example.com", "-s", "rsa",
                           "-k", str(keyfile)], input=wire(MESSAGE), capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"a=rsa-sha1" in done.stdout.split(b"\r\n\r\n")[0]
    (r,) = verify(done.stdout, loopback_lookup(dns))
    assert r.result is Result.PERMERROR and "RFC 8301" in r.reason
