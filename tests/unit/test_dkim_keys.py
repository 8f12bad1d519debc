"""eqmail.dkim.keys: names, generation, the key store, records and their check."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.dkim import keys
from eqmail.dkim.keys import DkimError, KeyType, Owners

ED = keys.generate(KeyType.ED25519)
RSA1024 = keys.generate(KeyType.RSA, 1024)
_RSA4096: list[keys.PrivateKey] = []


def rsa4096() -> keys.PrivateKey:
    if not _RSA4096:
        _RSA4096.append(keys.generate(KeyType.RSA, 4096))
    return _RSA4096[0]


# ---- names ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("Example.COM", "example.com"), ("example.com.", "example.com"),
    ("mail.sub.example.org", "mail.sub.example.org"), ("bücher.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
])
def test_domain_normalized(text: str, want: str) -> None:
    assert keys.normalize_domain(text) == want


@pytest.mark.parametrize("text", [
    "", ".", "..", "../x", "a/b", "example..com", "x", "-a.com", "a-.com", "a b.com", "a_b.com",
    "/etc/passwd", "example.com/../../x", "a\x00.com", "a" * 64 + ".com", ("a" * 60 + ".") * 5 + "com",
    ".hidden.com", "ex\nample.com",
])
def test_bad_domains_refused(text: str) -> None:
    with pytest.raises(DkimError):
        keys.normalize_domain(text)


@pytest.mark.parametrize("sel", ["s1", "eq202612", "a", "0", "a-b", "x" * 63])
def test_selectors_accepted(sel: str) -> None:
    assert keys.check_selector(sel) == sel


@pytest.mark.parametrize("sel", ["", "../x", "a/b", "..", ".", "-a", "A1", "a.b", "a_b", "x" * 64,
                                 "s1\n", " s1", "s1.key", "a\x00"])
def test_bad_selectors_refused(sel: str) -> None:
    with pytest.raises(DkimError):
        keys.check_selector(sel)
    with pytest.raises(DkimError):
        keys.key_path(Path("/nonexistent"), "example.com", sel)


def test_key_path_stays_in_the_store() -> None:
    p = keys.key_path(Path("/c"), "Example.com", "s1")
    assert p == Path("/c/dkim/example.com/s1.key")


# ---- generation and the store ----------------------------------------------------------

def test_generate_types_and_sizes() -> None:
    assert isinstance(ED, ed25519.Ed25519PrivateKey)
    assert isinstance(RSA1024, rsa.RSAPrivateKey) and RSA1024.key_size == 1024
    for bits in (512, 1023, 4097, 8192):
        with pytest.raises(DkimError):
            keys.generate(KeyType.RSA, bits)


def test_write_key_modes_and_refusal(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    path = keys.write_key(control, "example.com", "s1", ED, None)
    assert path == control / "dkim" / "example.com" / "s1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o750
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert keys.public_value(keys.load_key(path)) == keys.public_value(ED)
    with pytest.raises(DkimError, match="exists"):
        keys.write_key(control, "example.com", "s1", RSA1024, None)
    assert path.read_bytes() == data  # kept
    keys.write_key(control, "example.com", "s1", RSA1024, None, force=True)
    assert keys.public_value(keys.load_key(path)) == keys.public_value(RSA1024)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert os.listdir(path.parent) == ["s1.key"]  # no temporary file left
    keys.write_key(control, "example.com", "s2", ED, None)
    assert keys.selectors(control, "EXAMPLE.com") == ["s1", "s2"]
    assert keys.selectors(control, "other.example") == []
    assert keys.key_files(control) == [path, path.parent / "s2.key"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_write_key_owner_when_root(tmp_path: Path) -> None:
    owners = Owners(key_uid=4321, key_gid=0, dir_uid=0, dir_gid=4322)
    path = keys.write_key(tmp_path, "example.com", "s1", ED, owners)
    st_key, st_dir = path.stat(), path.parent.stat()
    assert (st_key.st_uid, st_key.st_gid) == (4321, 0)
    assert (st_dir.st_uid, st_dir.st_gid) == (0, 4322)
    assert (path.parent.parent.stat().st_uid, path.parent.parent.stat().st_gid) == (0, 4322)
    assert keys.file_problems(path, 4321, 0) == []
    assert keys.file_problems(path, 4320, 0) == ["owner 4321:0, want 4320:0"]


def test_file_problems(tmp_path: Path) -> None:
    path = keys.write_key(tmp_path, "example.com", "s1", ED, None)
    me = os.getuid()
    assert keys.file_problems(path, me, None) == []
    os.chmod(path, 0o644)
    assert keys.file_problems(path, me, None) == ["mode 0644, want 0400"]
    os.chmod(path, 0o600)
    path.write_bytes(b"not a key\n")
    os.chmod(path, 0o400)
    [problem] = keys.file_problems(path, me, None)
    assert "not a PEM private key" in problem
    with pytest.raises(DkimError, match=re.escape(str(path))):
        keys.load_key(path)
    assert keys.file_problems(tmp_path / "nope.key", me, None) == ["cannot stat: No such file or directory"]


def test_weak_or_foreign_keys_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    # cryptography refuses to make a key under 1024 bits: two known 256-bit primes make one
    p, q = 2**256 - 189, 2**255 - 19
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    weak = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()
    for key, why in ((weak, "511 bits"), (ec.generate_private_key(ec.SECP256R1()), "RSA or Ed25519")):
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        with pytest.raises(DkimError, match=why):
            keys.parse_key(data, "x.key")


# ---- records --------------------------------------------------------------------------

def test_record_text() -> None:
    raw = ED.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keys.record_text(ED) == f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = RSA1024.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert keys.record_text(RSA1024) == f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def _strings(line: str) -> list[str]:
    return re.findall(r'"([^"]*)"', line)


def test_zone_line_short_and_split() -> None:
    line = keys.zone_line("Example.com", "s1", keys.record_text(ED))
    assert line == f's1._domainkey.example.com. IN TXT "{keys.record_text(ED)}"'
    big = keys.record_text(rsa4096())
    line = keys.zone_line("example.com", "big", big)
    assert "\n" not in line and line.startswith('big._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    parts = _strings(line)
    assert len(parts) == 3 and all(len(p) <= 255 for p in parts) and len(parts[0]) == 255
    assert "".join(parts) == big
    assert keys.match("".join(parts).encode(), rsa4096()) == keys.Match(True)


def test_match_ok_with_whitespace_and_defaults() -> None:
    p = keys.record_text(RSA1024).split("p=")[1]
    spaced = " ".join(p[i:i + 60] for i in range(0, len(p), 60))
    for rec in (keys.record_text(RSA1024), f"p={p}", f" v = DKIM1 ;\tk=rsa ; h=sha1:sha256; s=*; t=y; p={spaced} ;",
                f"v=DKIM1; p={p}; n=notes; x_unknown=whatever"):
        assert keys.match(rec.encode(), RSA1024).ok, rec


@pytest.mark.parametrize("record,reason", [
    ("v=DKIM1; k=rsa", "no p= tag"),
    ("v=DKIM1; k=rsa; p=", "revoked"),
    ("v=DKIM1; k=rsa; p= ", "revoked"),
    ("v=DKIM1; k=rsa; p=!!!notbase64***", "not valid base64"),
    ("v=DKIM1; k=rsa; p=QUJD", "different public key"),
    ("v=DKIM1; k=ed25519; p=QUJD", "k=ed25519, the key is rsa"),
    ("v=DKIM2; p=QUJD", "not DKIM1"),
    ("k=rsa; v=DKIM1; p=QUJD", "not DKIM1 as the first tag"),
    ("v=DKIM1; h=sha1; p=QUJD", "does not allow sha256"),
    ("v=DKIM1; s=tlsrpt; p=QUJD", "does not allow email"),
    ("v=DKIM1; p=QUJD; p=QUJD", "given twice"),
    ("v=DKIM1; k=rsa; k=rsa; p=QUJD", "given twice"),
    ("garbage without tags", "not a DKIM key record"),
    ("v=DKIM1; =x; p=QUJD", "not a DKIM key record"),
    ("v=DKIM1; 1x=y; p=QUJD", "not a DKIM key record"),
])
def test_mismatches(record: str, reason: str) -> None:
    m = keys.match(record.encode(), RSA1024)
    assert not m.ok and reason in m.reason


def test_hostile_records() -> None:
    p = keys.record_text(RSA1024).split("p=")[1]
    cases = [
        b"v=DKIM1; k=rsa; p=" + b"A" * 10_000,                  # a 10,000-byte record
        b"v=DKIM1; k=rsa; p=" + p.encode() + b"; x=" + b"B" * 10_000,  # big but extra tag
        b"\xff\xfe\x00v=DKIM1",                                  # not ASCII
        b";" * 10_000, b"=" * 10_000, b"p=" + b"=" * 10_000,
        b"v=DKIM1; k=rsa; p=" + base64.b64encode(os.urandom(300)),
    ]
    results = [keys.match(c, RSA1024) for c in cases]
    assert [r.ok for r in results] == [False, True, False, False, False, False, False]
    assert "not ASCII" in results[2].reason
    assert "no p= tag" in results[3].reason


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_match_never_raises(data: bytes) -> None:
    m = keys.match(data, ED)
    assert m.ok is False and m.reason


@given(st.text(alphabet="vkphst=;: \t\r\nDKIM1rsaed25519ABC+/=email*", max_size=200))
@settings(max_examples=300)
def test_match_never_raises_on_taglike_text(text: str) -> None:
    assert isinstance(keys.match(text.encode(), RSA1024), keys.Match)


@st.composite
def any_key(draw: st.DrawFn) -> keys.PrivateKey:
    if draw(st.booleans()):
        return keys.generate(KeyType.ED25519)
    return keys.generate(KeyType.RSA, draw(st.sampled_from([1024, 1032, 1536, 2048])))


@given(any_key(), st.sampled_from(["s1", "eq202612", "a-b-c"]), st.sampled_from(["example.com", "bücher.example"]))
@settings(max_examples=30, deadline=None)
def test_format_parse_round_trip(key: keys.PrivateKey, sel: str, domain: str) -> None:
    line = keys.zone_line(domain, sel, keys.record_text(key))
    parts = _strings(line)
    assert all(len(p.encode()) <= 255 for p in parts)
    joined = "".join(parts).encode()
    tags = keys.parse_record(joined)
    assert tags["v"] == "DKIM1" and tags["k"] == keys.key_type(key).value
    assert keys.match(joined, key) == keys.Match(True)
    assert keys.match(joined, ED if key is not ED else RSA1024).ok is False


@given(st.text(max_size=300))
@settings(max_examples=500)
def test_names_either_safe_or_refused(text: str) -> None:
    """Any text is a clean store name or DkimError: never a path with '/' or '..'."""
    for fn in (keys.normalize_domain, keys.check_selector):
        try:
            name = fn(text)
        except DkimError:
            continue
        assert "/" not in name and ".." not in name and not name.startswith(".")
        assert name.isascii() and name == name.lower() and "\x00" not in name
