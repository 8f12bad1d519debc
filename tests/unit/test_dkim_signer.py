"""Signing outgoing mail (issue 16): control/dkimsign, the sign decision, the key store
as the remote worker reads it, and the signing step of remote delivery."""

from __future__ import annotations

import io
import os
from pathlib import Path

import dkim
import pytest
from dkimkeys import ed_key, pem, records, rsa_key
from hypothesis import given
from hypothesis import strategies as st

from eqmail.control import load_controls
from eqmail.control.dkimsign import DkimSignRule, parse_line, rule_for
from eqmail.dkim.sign import DEFAULT_HEADERS, Canon, MessageError
from eqmail.dkim.signer import (
    KeyFileError,
    KeyStore,
    OutboundSigner,
    from_domain,
    policy_for,
    signing_plan,
)
from eqmail.errors import ControlErrors
from eqmail.ipc.delivery import Verdict
from eqmail.ipc.queue import Origin

MESSAGE = (b"Received: (qmail 1 invoked by uid 0); 7 Dec 2026 22:00:00 -0000\n"
           b"From: Ada <ada@example.com>\nTo: grace@example.org\nSubject: hi\n\nbody\n")


# ---- control/dkimsign ----------------------------------------------------------------

def load(tmp_path: Path, text: str | bytes) -> tuple[DkimSignRule, ...]:
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "control" / "me").write_text("mx.example.com\n")
    data = text.encode() if isinstance(text, str) else text
    (tmp_path / "control" / "dkimsign").write_bytes(data)
    return load_controls(tmp_path).dkimsign


def test_dkimsign_lines(tmp_path: Path) -> None:
    rules = load(tmp_path, "# per domain\n\n* canon=relaxed expire=600\n"
                           "Example.COM canon=simple/relaxed headers=From:To:Subject oversign=\n"
                           "b.example oversign=from:subject:to\n")
    assert rules == (
        DkimSignRule("*", "relaxed", "simple", None, None, 600),
        DkimSignRule("example.com", "simple", "relaxed", ("from", "to", "subject"), (), None),
        DkimSignRule("b.example", None, None, None, ("from", "subject", "to"), None))
    # a domain's line first, then *, then the defaults
    assert rule_for(rules, "b.example") == DkimSignRule(
        "b.example", "relaxed", "simple", None, ("from", "subject", "to"), 600)
    pol = policy_for(rules, "b.example")
    assert (pol.header_canon, pol.body_canon, pol.headers, pol.oversign, pol.expire) == (
        Canon.RELAXED, Canon.SIMPLE, DEFAULT_HEADERS, ("from", "subject", "to"), 600)
    pol = policy_for(rules, "example.com")
    assert (pol.oversign, pol.expire) == ((), 600)
    pol = policy_for((), "other.example")  # no file: current practice
    assert (pol.header_canon, pol.body_canon, pol.headers, pol.oversign, pol.expire) == (
        Canon.RELAXED, Canon.RELAXED, DEFAULT_HEADERS, ("from",), None)
    assert str(rules[1]) == "example.com canon=simple/relaxed headers=from:to:subject oversign="


@pytest.mark.parametrize(("line", "problem"), [
    ("example.com canon=loose", "canon=loose: want relaxed or simple"),
    ("example.com headers=to:subject", "headers= must include from"),
    ("example.com headers=from:received", "received changes in transit and is never signed"),
    ("example.com oversign=from:dkim-signature", "dkim-signature changes in transit"),
    ("example.com expire=soon", "expire=soon: want seconds"),
    ("example.com expire=-5", "expire=-5: want seconds"),
    ("example.com sign=yes", "unknown option 'sign'"),
    ("example.com canon", "'canon': want OPTION=VALUE"),
    ("example.com canon=simple canon=relaxed", "canon= given twice"),
    ("exa_mple.com canon=simple", "bad domain 'exa_mple.com'"),
    ("example.com headers=from:bad name", "'name': want OPTION=VALUE"),
    ("example.com headers=from:b\x7fd", "is not a header field name"),
])
def test_dkimsign_errors_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    with pytest.raises(ControlErrors) as e:
        load(tmp_path, f"* canon=relaxed\n\n{line}\n")
    [err] = [str(x) for x in e.value.errors]
    assert err.startswith("control/dkimsign:3: ") and problem in err, err


def test_dkimsign_domain_given_twice(tmp_path: Path) -> None:
    with pytest.raises(ControlErrors) as e:
        load(tmp_path, "example.com canon=simple\nEXAMPLE.com expire=5\n")
    assert [str(x) for x in e.value.errors] == [
        "control/dkimsign:2: example.com is given on an earlier line too"]


@given(st.text(max_size=200))
def test_any_line_gives_a_rule_or_a_reason(line: str) -> None:
    rule, problem = parse_line(line)
    assert (rule is None) == bool(problem)
    if rule is not None:
        policy_for((rule,), "example.com" if rule.domain == "*" else rule.domain)  # never raises


@given(st.lists(st.binary(max_size=80).filter(lambda b: b"\n" not in b), max_size=8))
def test_any_file_loads_or_names_its_lines(tmp_path_factory: pytest.TempPathFactory,
                                           lines: list[bytes]) -> None:
    """Untrusted bytes (an admin's typo, a file of garbage): a parsed value, or errors
    each naming a line that holds something."""
    root = tmp_path_factory.mktemp("dkimsign")
    try:
        load(root, b"\n".join(lines) + b"\n")
    except ControlErrors as e:
        for err in e.errors:
            assert str(err).startswith("control/dkimsign:")
            n = int(str(err).split(":")[1])
            assert 1 <= n <= len(lines) and lines[n - 1].strip()


# ---- the decision ------------------------------------------------------------------------

@pytest.mark.parametrize("origin", list(Origin) + [None])
def test_signing_plan_by_origin(origin: Origin | None) -> None:
    want = "example.com" if origin in (Origin.AUTH, Origin.RELAY, Origin.LOCAL, Origin.BOUNCE) else None
    assert signing_plan(origin, "example.com", ["example.com"]) == want
    assert signing_plan(origin, "mail.example.com", ["example.com"]) == want  # a parent's key
    assert signing_plan(origin, "example.org", ["example.com"]) is None
    assert signing_plan(origin, None, ["example.com"]) is None


@pytest.mark.parametrize(("head", "want"), [
    (b"From: Ada <ada@Example.COM>\n", "example.com"),
    (b"Subject: x\nFROM:\n  \"Lovelace, Ada\" <ada@example.com>,\n bob@example.org\n", "example.com"),
    (b"From: ada@example.com\r\nSubject: x\r\n", "example.com"),
    (b"From: undisclosed-recipients:;\n", None),
    (b"Subject: no from\n", None),
    (b"Subject: x\n\nFrom: body@example.com\n", None),
])
def test_from_domain(head: bytes, want: str | None) -> None:
    assert from_domain(head + b"\nbody\n") == want


# ---- the key store ---------------------------------------------------------------------------

def store_key(control: Path, domain: str, selector: str, data: bytes) -> Path:
    path = control / "dkim" / domain / f"{selector}.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_keys_are_read_again_when_they_change(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    assert store.domains() == []
    path = store_key(tmp_path, "example.com", "rsa", pem(rsa_key()))
    store_key(tmp_path, "example.com", "ed", pem(ed_key()))
    (tmp_path / "dkim" / "empty.example").mkdir()
    (tmp_path / "dkim" / "Not_A_Domain").mkdir()
    assert store.domains() == ["example.com"]
    first = store.keys("example.com")
    assert [(k.selector, k.key_type.value) for k in first] == [("ed", "ed25519"), ("rsa", "rsa")]
    assert store.keys("example.com")[1] is first[1]  # unchanged: the cached key
    other = rsa_key(1024)
    tmp = path.with_suffix(".new")
    tmp.write_bytes(pem(other))
    os.replace(tmp, path)  # what keygen --force does
    assert store.keys("example.com")[1].private_key == pem(other)


def test_listings_follow_the_directories(tmp_path: Path) -> None:
    """The store lists control/dkim/ and a domain's directory again only when the
    directory changed; a key or domain added or removed is seen at once."""
    store = KeyStore(tmp_path)
    store_key(tmp_path, "example.com", "rsa", pem(rsa_key()))
    assert store.domains() == ["example.com"]
    assert [k.selector for k in store.keys("example.com")] == ["rsa"]
    store_key(tmp_path, "example.com", "ed", pem(ed_key()))
    store_key(tmp_path, "example.org", "s1", pem(rsa_key()))
    assert store.domains() == ["example.com", "example.org"]
    assert [k.selector for k in store.keys("example.com")] == ["ed", "rsa"]
    (tmp_path / "dkim" / "example.com" / "rsa.key").unlink()
    assert [k.selector for k in store.keys("example.com")] == ["ed"]
    (tmp_path / "dkim" / "example.org" / "s1.key").unlink()
    assert store.domains() == ["example.com"]


def test_unloadable_keys_name_the_file(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    path = store_key(tmp_path, "example.com", "rsa", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError) as e:
        store.keys("example.com")
    assert e.value.path == path and "not a PEM private key" in e.value.why
    path.write_bytes(b"x" * 70000)
    with pytest.raises(KeyFileError, match="not a key"):
        store.keys("example.com")
    path.unlink()
    os.symlink("/etc/hostname", path)  # never followed
    with pytest.raises(KeyFileError) as e:
        store.keys("example.com")
    assert e.value.path == path and "cannot read" in e.value.why


def test_outbound_signer(tmp_path: Path) -> None:
    store_key(tmp_path, "example.com", "rsa", pem(rsa_key()))
    store_key(tmp_path, "example.com", "ed", pem(ed_key()))
    signer = OutboundSigner(tmp_path)
    for origin in (Origin.NETWORK, Origin.FORWARD, None):
        assert signer.signatures(MESSAGE, origin, ()) == b""
    fields = signer.signatures(MESSAGE, Origin.AUTH, ())
    assert fields.count(b"DKIM-Signature:") == 2 and b"s=ed;" in fields and b"s=rsa;" in fields
    zone = records()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return zone[name.decode().rstrip(".")][0]

    signed = fields + MESSAGE
    verifier = dkim.DKIM(signed)
    assert all(verifier.verify(idx=i, dnsfunc=dnsfunc) for i in range(2))
    assert signer.signatures(MESSAGE.replace(b"example.com>", b"example.org>"), Origin.AUTH, ()) == b""


# ---- remote delivery's signing step ----------------------------------------------------------

def test_remote_delivery_signs_once_or_defers(tmp_path: Path) -> None:
    from eqmail.delivery import remote

    store_key(tmp_path, "example.com", "rsa", pem(rsa_key()))
    job = remote.RemoteJob.__new__(remote.RemoteJob)  # only signer and controls are used
    job.signer = OutboundSigner(tmp_path)
    job.controls = _controls_with_dkimsign(tmp_path)
    body = io.BytesIO(MESSAGE)
    assert remote._dkim_signed(job, 7, body, Origin.NETWORK) is body
    out = remote._dkim_signed(job, 7, body, Origin.RELAY)
    assert not isinstance(out, remote.Outcome)
    sent = out.read()
    assert sent.endswith(MESSAGE) and sent.count(b"DKIM-Signature:") == 1
    key = tmp_path / "dkim" / "example.com" / "rsa.key"
    key.write_bytes(b"garbage")
    deferred = remote._dkim_signed(job, 7, body, Origin.RELAY)
    assert deferred == remote.TEMP_DKIM_KEY and deferred.verdict is Verdict.DEFERRAL


def _controls_with_dkimsign(control: Path):  # type: ignore[no-untyped-def]
    root = control.parent / "inst"
    (root / "control").mkdir(parents=True)
    (root / "control" / "me").write_text("mx.example.com\n")
    return load_controls(root)


def test_message_that_cannot_be_signed_is_refused_not_sent_unsigned(tmp_path: Path) -> None:
    store_key(tmp_path, "example.com", "rsa", pem(rsa_key()))
    signer = OutboundSigner(tmp_path)
    with pytest.raises(MessageError):
        signer.signatures(b"From: a@example.com\nthis line is no header field\n\nbody\n",
                          Origin.LOCAL, ())


def test_blank_looking_lines_are_empty_lines(tmp_path: Path) -> None:
    assert load(tmp_path, b"\x0c\n \x0b\nexample.com expire=5\n") == (
        DkimSignRule("example.com", expire=5),)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files other owners")
def test_unreadable_by_the_signer() -> None:
    """What eqmailctl check reports for the remote user: the permission bits along the
    path (owner, group, others), as the kernel applies them."""
    import shutil
    import tempfile

    from eqmail.dkim.keys import unreadable_by

    base = Path(tempfile.mkdtemp(prefix="eqm-unread-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o755)
        path = store_key(base, "example.com", "rsa", b"k")
        signer, group = 54321, 54322
        os.chmod(path.parent.parent, 0o750)  # control/dkim: root and the group only
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o400)
        os.chown(path, signer, 0)
        assert unreadable_by(path, signer, frozenset({signer})) == (
            f"no search permission on {path.parent.parent}")
        os.chown(path.parent.parent, 0, group)
        assert unreadable_by(path, signer, frozenset({signer, group})) is None
        assert unreadable_by(path, 0, frozenset()) is None
        os.chown(path, 0, 0)
        assert unreadable_by(path, signer, frozenset({signer, group})) == (
            "no read permission (owner 0:0, mode 0400)")
        os.chmod(path, 0o404)
        assert unreadable_by(path, signer, frozenset({signer, group})) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_check_warns_about_dkimsign_lines_without_keys(tmp_path: Path) -> None:
    from eqmail.cli.dkim import dkimsign_warnings
    from eqmail.control.dkimsign import DkimSignRule

    store_key(tmp_path, "example.com", "rsa", pem(rsa_key()))
    (tmp_path / "dkim" / "empty.example").mkdir()
    rules = (DkimSignRule("*", "relaxed", "simple"), DkimSignRule("example.com"),
             DkimSignRule("empty.example"), DkimSignRule("nokeys.example"))
    assert dkimsign_warnings(tmp_path, rules) == [
        f"warning: control/dkimsign: {d} has no key under control/dkim/{d}/: its line is "
        f"never used (eqmailctl dkim keygen {d})" for d in ("empty.example", "nokeys.example")]
