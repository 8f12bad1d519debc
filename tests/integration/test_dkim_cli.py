"""``eqmailctl dkim keygen|show|check`` of the venv against a test instance, with the
records published on a loopback DNS server (tests/dnsserver.py) named by
control/dnsservers."""

from __future__ import annotations

import base64
import os
import re
import stat
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnsserver import Behaviour, DnsServer
from harness import IS_ROOT, Instance

DOMAIN = "example.com"
LINE = re.compile(r'^(?P<sel>[a-z0-9-]+)\._domainkey\.example\.com\. IN TXT (?P<strings>("[^"]*" ?)+)$')


def _published(line: str) -> tuple[str, str, str]:
    """(selector, the zone file's strings, the joined value) of one printed line."""
    m = LINE.match(line)
    assert m, line
    strings = m.group("strings").strip()
    return m.group("sel"), strings, "".join(re.findall(r'"([^"]*)"', strings))


def _p(value: str) -> bytes:
    return base64.b64decode(value.split("p=", 1)[1])


def _assert_is_public_key_of(inst: Instance, sel: str, value: str) -> None:
    """The published p= is the stored key's public key (checked with cryptography)."""
    path = inst.root / "control" / "dkim" / DOMAIN / f"{sel}.key"
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        assert "k=ed25519" in value
        pub = ed25519.Ed25519PublicKey.from_public_bytes(_p(value))
        raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert pub.public_bytes(*raw) == key.public_key().public_bytes(*raw)
    else:
        assert isinstance(key, rsa.RSAPrivateKey) and "k=rsa" in value
        pub_rsa = serialization.load_der_public_key(_p(value))
        assert isinstance(pub_rsa, rsa.RSAPublicKey)
        assert pub_rsa.public_numbers() == key.public_key().public_numbers()


def test_keygen_show_check(instance: Instance) -> None:
    inst = instance
    rsa_out = inst.ctl("dkim", "keygen", "Example.COM", "--selector", "r1").stdout
    ed_out = inst.ctl("dkim", "keygen", DOMAIN, "--selector", "e1", "--type", "ed25519").stdout
    assert len(rsa_out.splitlines()) == 1 and len(ed_out.splitlines()) == 1
    sel_r, strings_r, value_r = _published(rsa_out.strip())
    sel_e, strings_e, value_e = _published(ed_out.strip())
    assert (sel_r, sel_e) == ("r1", "e1")
    assert len(re.findall('"', strings_r)) == 4  # RSA-2048: two strings of at most 255
    assert value_e.startswith("v=DKIM1; k=ed25519; p=") and value_r.startswith("v=DKIM1; k=rsa; p=")
    _assert_is_public_key_of(inst, "r1", value_r)
    _assert_is_public_key_of(inst, "e1", value_e)

    # the files: mode 0400, owner eqmailr (root) or the invoking user
    base = inst.root / "control" / "dkim"
    for sel in ("r1", "e1"):
        st = os.stat(base / DOMAIN / f"{sel}.key")
        assert stat.S_IMODE(st.st_mode) == 0o400
        if IS_ROOT:
            import pwd
            assert (st.st_uid, st.st_gid) == (pwd.getpwnam("eqmailr").pw_uid, 0)
        else:
            assert st.st_uid == os.getuid()
    for d in (base, base / DOMAIN):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o750

    # refusing to overwrite; usage errors
    again = inst.ctl("dkim", "keygen", DOMAIN, "--selector", "r1", check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    for bad in (["../x"], [DOMAIN, "--selector", "a/b"], [DOMAIN, "--bits", "512"],
                [DOMAIN, "--type", "ed25519", "--bits", "2048"], [DOMAIN, "--type", "dsa"]):
        assert inst.ctl("dkim", "keygen", *bad, check=False).returncode == 2, bad
    assert not (inst.root / "control" / "x").exists()

    # show: every selector's line again, the same bytes
    assert inst.ctl("dkim", "show", DOMAIN).stdout == ed_out + rsa_out
    checked = inst.ctl("check").stdout  # no warnings, not an unknown file; the dkimsign row
    assert [ln for ln in checked.splitlines() if "dkim" in ln] == ["dkimsign: (none)    [(default)]"]

    # check against a loopback DNS server
    zone = {f"r1._domainkey.{DOMAIN}": {"TXT": [strings_r]},
            f"e1._domainkey.{DOMAIN}": {"TXT": [strings_e]}}
    server = DnsServer(zone)
    port = server.start()
    try:
        inst.write_control("dnsservers", f"127.0.0.1:{port}")
        ok = inst.ctl("dkim", "check", DOMAIN, check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout == (f"e1._domainkey.{DOMAIN}: ok\nr1._domainkey.{DOMAIN}: ok\n")
        assert (f"e1._domainkey.{DOMAIN}", "TXT") in server.queries

        # a wrong key for e1, nothing for r1
        other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        server.zone[f"e1._domainkey.{DOMAIN}"] = {
            "TXT": [f'"v=DKIM1; k=ed25519; p={base64.b64encode(other).decode()}"']}
        del server.zone[f"r1._domainkey.{DOMAIN}"]
        bad = inst.ctl("dkim", "check", DOMAIN, check=False)
        assert bad.returncode == 1
        assert bad.stdout == (f"e1._domainkey.{DOMAIN}: mismatch: p= is a different public key\n"
                              f"r1._domainkey.{DOMAIN}: missing\n")

        # a revoked key
        server.zone[f"e1._domainkey.{DOMAIN}"] = {"TXT": ['"v=DKIM1; k=ed25519; p="']}
        revoked = inst.ctl("dkim", "check", DOMAIN, check=False)
        assert revoked.returncode == 1 and "e1._domainkey.example.com: mismatch: p= is empty: the key is revoked" in revoked.stdout

        # a DNS server that never answers: temporary, exit 1, in bounded time
        server.behaviour = Behaviour.SILENT
        t0 = time.monotonic()
        silent = inst.ctl("dkim", "check", DOMAIN, "--timeout", "1", check=False, timeout=60)
        elapsed = time.monotonic() - t0
        assert silent.returncode == 1
        assert [ln.split(": ", 1)[1].split(" (")[0] for ln in silent.stdout.splitlines()] == [
            "temporary DNS failure", "temporary DNS failure"]
        assert elapsed < 15, elapsed
    finally:
        server.stop()


def test_check_and_show_without_keys_or_with_a_broken_key(instance: Instance) -> None:
    inst = instance
    none = inst.ctl("dkim", "show", DOMAIN, check=False)
    assert none.returncode == 1 and "no DKIM keys for example.com" in none.stderr
    assert inst.ctl("dkim", "check", DOMAIN, check=False).returncode == 1
    assert inst.ctl("dkim", "show", "bad..name", check=False).returncode == 2
    assert inst.ctl("dkim", "check", DOMAIN, "--timeout", "0", check=False).returncode == 2
    assert inst.ctl("dkim", "check", DOMAIN, "--timeout", "nan", check=False).returncode == 2
    inst.ctl("dkim", "keygen", DOMAIN, "--type", "ed25519")  # the default selector
    sel = "eq" + time.strftime("%Y%m", time.gmtime())
    path = inst.root / "control" / "dkim" / DOMAIN / f"{sel}.key"
    assert path.exists()
    os.chmod(path, 0o600)
    path.write_text("garbage\n")
    os.chmod(path, 0o644)
    report = inst.ctl("check").stdout
    assert f"warning: control/dkim/{DOMAIN}/{sel}.key: mode 0644, want 0400; not a PEM private key" in report
    broken = inst.ctl("dkim", "show", DOMAIN, check=False)
    assert broken.returncode == 1 and sel in broken.stderr and str(path) in broken.stderr
