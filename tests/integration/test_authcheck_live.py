"""Inbound verification on a running daemon (issue 16 items 2 and 3), with a real DNS
server on loopback (tests/dnsserver.py) publishing SPF, DKIM and DMARC records.

Clients are smtplib over IPv4 and IPv6; messages are signed by eqmail.dkim.sign (RSA
and Ed25519), by OpenDKIM (``opendkim -t`` in signing mode) and ARC-sealed by dkimpy.
What is asserted is what a user sees: the Authentication-Results field of the message
in the Maildir (where it stands, the results it names, as RFC 8601 readers parse it),
the reply to the end of DATA, the DNS queries the server saw.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authres
import dkim
import pytest
from dkimkeys import ed_key, pem, records, rsa_key, signing_keys
from dnsserver import Behaviour, DnsServer, txt
from harness import ME, Instance, bin_path, free_port

from eqmail.dkim.sign import sign

pytestmark = pytest.mark.timeout(300)

USER = f"testuser@{ME}"
SPF_LOOPBACK = "v=spf1 ip4:127.0.0.0/8 ip6:::1 -all"
PASSWORD = "Secret-1"


def zone() -> dict[str, object]:
    z: dict[str, object] = {
        "example.com": {"TXT": [txt(SPF_LOOPBACK)]},
        "_dmarc.example.com": {"TXT": [txt("v=DMARC1; p=reject; rua=mailto:d@example.com")]},
        "spf-fail.example": {"TXT": [txt("v=spf1 ip4:192.0.2.1 ip6:2001:db8::1 -all")]},
        "quarantine.example": {"TXT": [txt(SPF_LOOPBACK)]},
        "_dmarc.quarantine.example": {"TXT": [txt("v=DMARC1; p=quarantine")]},
        "nospf.example": {"A": ["192.0.2.9"]},   # exists, publishes nothing
        "slow.example": "TIMEOUT",               # never answered
    }
    for name, values in records().items():
        z[name] = {"TXT": [txt(values[0].decode())]}
    return z


@dataclass
class Live:
    inst: Instance
    dns: DnsServer
    port: int        # smtp on 127.0.0.1 and [::1], no relay rules
    relay: int       # smtp on 127.0.0.1 with RELAYCLIENT
    submission: int  # AUTH

    def configure(self, **controls: str) -> None:
        for name, value in controls.items():
            path = self.inst.root / "control" / name
            if value:
                self.inst.write_control(name, value)
            elif path.exists():
                path.unlink()
        self.inst.ctl("reload")


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    dns = DnsServer(zone())
    dns.start()
    port, relay, submission = (free_port() for _ in range(3))
    inst = Instance.create(listen=None)
    passwords = inst.root / "control" / "passwords"
    subprocess.run([bin_path("eqmail-checkpassword"), "passwd", "add", "joe", "--file",
                    str(passwords)], input=f"{PASSWORD}\n", text=True, check=True,
                   capture_output=True)
    ours = f"{bin_path('eqmail-checkpassword')} --file {passwords} /bin/true"
    inst.write_control("listen", "\n".join([
        f"smtp 127.0.0.1:{port}", f"smtp [::1]:{port}",
        f"smtp 127.0.0.1:{relay} rules=tcp.relay",
        f"submission 127.0.0.1:{submission} checkpassword='{ours}'"]))
    inst.write_control("tcp.relay", ':allow,RELAYCLIENT=""')
    inst.write_control("dnsservers", f"127.0.0.1:{dns.port}")
    inst.write_control("authcheck", "1")
    inst.write_control("authtimeout", "3")
    try:
        inst.start()
        yield Live(inst, dns, port, relay, submission)
    finally:
        inst.destroy()
        dns.stop()


# ------------------------------------------------------------------ helpers


def crlf(message: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", message)


def message(frm: str = "Ada <ada@example.com>", subject: str = "hello",
            extra: bytes = b"") -> bytes:
    """A message in the LF form (signatures are made over it; smtplib gets CRLF)."""
    return extra + (f"From: {frm}\nTo: {USER}\nSubject: {subject}\n"
                    f"Date: Tue, 8 Dec 2026 00:00:00 +0000\n"
                    f"Message-ID: <{time.time_ns()}@example.com>\n"
                    "\nHello,\n\nthe body.\n").encode()


def signed(msg: bytes) -> bytes:
    return sign(msg, signing_keys()) + msg


def send(live: Live, mail_from: str, msg: bytes, *, host: str = "127.0.0.1",
         port: int | None = None, login: bool = False) -> tuple[int, bytes]:
    """The reply to the end of DATA (smtplib raises on 5xx; caught into a tuple)."""
    with smtplib.SMTP(host, port or live.port, timeout=30) as s:
        s.ehlo("client.example")
        if login:
            s.login("joe", PASSWORD)
        s.mail(mail_from)
        code, text = s.rcpt(USER)
        assert code == 250, (code, text)
        return s.data(crlf(msg))


def delivered(live: Live, before: int) -> bytes:
    files = live.inst.wait_for_mail(before + 1)
    assert len(files) == before + 1
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    return newest.read_bytes()


def count(live: Live) -> int:
    return len(live.inst.maildir_files())


def header_fields(data: bytes) -> list[bytes]:
    """The header section as fields, each unfolded onto one line."""
    head = data.split(b"\n\n", 1)[0]
    return [re.sub(rb"\n[ \t]+", b" ", f) for f in re.split(rb"\n(?![ \t])", head)]


def our_results(data: bytes) -> bytes:
    """Our Authentication-Results field (unfolded): it must be the only one with our
    authserv-id, and stand right after the queue writer's Received line."""
    fields = header_fields(data)
    ours = [i for i, f in enumerate(fields) if f.lower().startswith(
        f"authentication-results: {ME}".encode())]
    assert len(ours) == 1, fields
    (i,) = ours
    assert fields[i - 1].startswith(b"Received: (qmail ") and b"invoked from network" in fields[i - 1]
    assert fields[i + 1].startswith(b"Received: from "), fields
    return fields[i]


def results(field: bytes) -> dict[str, list[str]]:
    """method -> ["result ptype.name=value ...", ...], as the authres package (an RFC
    8601 parser nobody here wrote) reads the field; it must carry our authserv-id."""
    parsed = authres.AuthenticationResultsHeader.parse(field.decode())
    assert parsed.authserv_id == ME
    out: dict[str, list[str]] = {}
    for r in parsed.results:
        props = [f"{p.type}.{p.name}={p.value}" for p in r.properties]
        out.setdefault(r.method, []).append(" ".join([r.result, *props]))
    return out


# ------------------------------------------------------------------ results


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_spf_dkim_dmarc_pass(live: Live, host: str) -> None:
    before = count(live)
    code, _ = send(live, "bounces@example.com", signed(message()), host=host)
    assert code == 250
    data = delivered(live, before)
    r = results(our_results(data))
    assert r["spf"] == ["pass smtp.mailfrom=bounces@example.com"]
    # two signatures of one domain: told apart by header.b (RFC 6008)
    assert sorted(re.sub(r" header\.b=\S{8,}$", "", d) for d in r["dkim"]) == [
        "pass header.d=example.com header.s=ed", "pass header.d=example.com header.s=rsa"]
    assert r["dmarc"][0].startswith("pass header.from=example.com")
    assert "arc" not in r
    # the message itself arrived whole after the two Received lines
    assert data.endswith(b"\nHello,\n\nthe body.\n")


def test_swaks_over_ipv6(live: Live, tmp_path: Path) -> None:
    """Another client: swaks sends a signed message over IPv6 (its own dialogue, CRLF)."""
    if not shutil.which("swaks"):
        pytest.skip("swaks not installed")
    (tmp_path / "m.eml").write_bytes(crlf(signed(message(subject="swaks"))))
    before = count(live)
    done = subprocess.run(["swaks", "--server", "::1", "--port", str(live.port), "-6",
                           "--helo", "client.example", "--from", "bounces@example.com",
                           "--to", USER, "--data", "@" + str(tmp_path / "m.eml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^<-  250 ok \d+ qp \d+$", done.stdout, re.M), done.stdout
    r = results(our_results(delivered(live, before)))
    assert r["spf"] == ["pass smtp.mailfrom=bounces@example.com"]
    assert [d.split()[0] for d in r["dkim"]] == ["pass", "pass"]
    assert r["dmarc"][0].startswith("pass")


def test_spf_fail_dkim_fail_dmarc_fail_gets_only_the_header_by_default(live: Live) -> None:
    before = count(live)
    msg = signed(message()).replace(b"the body.", b"the body, changed.")
    code, _ = send(live, "x@spf-fail.example", msg)
    assert code == 250
    r = results(our_results(delivered(live, before)))
    assert r["spf"] == ["fail smtp.mailfrom=x@spf-fail.example"]
    assert [d.split()[0] for d in r["dkim"]] == ["fail", "fail"]
    assert r["dmarc"][0].startswith("fail header.from=example.com")
    assert "policy.dmarc=reject" in r["dmarc"][0]


def test_unsigned_mail_from_a_domain_that_publishes_nothing(live: Live) -> None:
    before = count(live)
    code, _ = send(live, "x@nospf.example", message("x@nospf.example"))
    assert code == 250
    r = results(our_results(delivered(live, before)))
    assert r["spf"] == ["none smtp.mailfrom=x@nospf.example"]
    assert r["dkim"] == ["none"]
    assert r["dmarc"] == ["none header.from=nospf.example"]


def test_a_lookup_that_never_answers_is_temperror_not_a_refusal(live: Live) -> None:
    before = count(live)
    began = time.monotonic()
    code, _ = send(live, "x@slow.example", message("x@slow.example"))
    assert code == 250 and time.monotonic() - began < 3 + 5  # control/authtimeout 3
    r = results(our_results(delivered(live, before)))
    assert r["spf"][0].startswith("temperror smtp.mailfrom=x@slow.example")


def test_a_message_too_big_to_hold_gets_its_field_through_the_writers_prepend(live: Live) -> None:
    """Over the listener's 1 MiB in memory the message is streamed to the queue writer
    as it arrives, and the field goes as a QueuePrepend: same place, same result."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\n"
    msg = message()[:-len(b"the body.\n")] + line * ((3 << 20) // len(line))
    before = count(live)
    code, _ = send(live, "bounces@example.com", signed(msg))
    assert code == 250
    data = delivered(live, before)
    r = results(our_results(data))
    assert r["spf"] == ["pass smtp.mailfrom=bounces@example.com"]
    assert [d.split()[0] for d in r["dkim"]] == ["pass", "pass"]
    assert data.endswith(line * 10)


def test_opendkim_signature_verifies(live: Live, tmp_path: Path) -> None:
    if not shutil.which("opendkim"):
        pytest.skip("opendkim not installed (scripts/bootstrap.sh)")
    keyfile = tmp_path / "ed.pem"
    keyfile.write_bytes(pem(ed_key()))
    os.chmod(keyfile, 0o600)
    conf = tmp_path / "opendkim.conf"
    conf.write_text("\n".join([
        "Syslog no", "Mode s", "Domain example.com", "Selector ed", f"KeyFile {keyfile}",
        "SignatureAlgorithm ed25519-sha256", "Canonicalization relaxed/relaxed",
        "RequireSafeKeys false"]) + "\n")
    msg = message()
    (tmp_path / "m.eml").write_bytes(crlf(msg))
    done = subprocess.run(["opendkim", "-x", str(conf), "-vvv", "-t", str(tmp_path / "m.eml")],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"hname='DKIM-Signature' hvalue='([^']*)'", done.stdout + done.stderr)
    assert m, done
    before = count(live)
    code, _ = send(live, "bounces@example.com", b"DKIM-Signature: " + m.group(1).encode() + b"\n" + msg)
    assert code == 250
    r = results(our_results(delivered(live, before)))
    assert r["dkim"] == ["pass header.d=example.com header.s=ed"]
    assert r["dmarc"][0].startswith("pass")


def test_arc_results_when_arc_fields_are_present(live: Live) -> None:
    msg = signed(message(subject="forwarded"))
    hop = b"Authentication-Results: relay.example; dkim=pass header.d=example.com\n" + msg
    seal = dkim.arc_sign(crlf(hop), b"rsa", b"example.com", pem(rsa_key()), b"relay.example",
                         include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    sealed = b"".join(seal).replace(b"\r\n", b"\n") + hop
    before = count(live)
    code, _ = send(live, "bounces@example.com", sealed)
    assert code == 250
    data = delivered(live, before)
    r = results(our_results(data))
    assert r["arc"] == ["pass"]
    assert b"\nAuthentication-Results: relay.example; dkim=pass" in data  # another's id stays


def test_forged_results_with_our_id_are_removed_others_kept(live: Live) -> None:
    forged = (f"Authentication-Results: {ME}; spf=pass smtp.mailfrom=x@example.com;\n"
              "\tdkim=pass header.d=example.com\n"
              f"authentication-results:   {ME.upper()} ; dmarc=pass\n"
              "Authentication-Results: other.example; dkim=pass header.d=example.com\n").encode()
    before = count(live)
    code, _ = send(live, "x@nospf.example", forged + message("x@nospf.example"))
    assert code == 250
    data = delivered(live, before)
    r = results(our_results(data))  # exactly one field with our id: ours
    assert r["spf"] == ["none smtp.mailfrom=x@nospf.example"]
    assert b"\nAuthentication-Results: other.example; dkim=pass header.d=example.com\n" in data


# ------------------------------------------------------------------ DMARC policy


def test_dmarc_reject_refused_with_550_when_so_configured(live: Live) -> None:
    live.configure(dmarcreject="reject")
    try:
        before = count(live)
        code, text = send(live, "x@spf-fail.example", message())  # From example.com, unsigned
        assert (code, text) == (550, b"5.7.1 rejected by DMARC policy for example.com")
        # the same for a changed signature over IPv6
        code, _ = send(live, "x@spf-fail.example",
                       signed(message()).replace(b"body.", b"body!"), host="::1")
        assert code == 550
        live.inst.wait_queue_empty()
        assert count(live) == before  # nothing was queued
        assert "message refused (5.7.1 rejected by DMARC policy for example.com)" in live.inst.log()
        # p=quarantine is not refused: marked
        code, _ = send(live, "x@spf-fail.example", message("q@quarantine.example"))
        assert code == 250
        data = delivered(live, before)
        assert b"\nX-Eqmail-DMARC: quarantine (policy=quarantine; header.from=quarantine.example)\n" in data
        # passing mail goes through
        code, _ = send(live, "bounces@example.com", signed(message()))
        assert code == 250
        assert b"X-Eqmail-DMARC" not in delivered(live, before + 1)
    finally:
        live.configure(dmarcreject="")


def test_dmarc_quarantine_setting_marks_a_reject_failure(live: Live) -> None:
    live.configure(dmarcreject="quarantine")
    try:
        before = count(live)
        code, _ = send(live, "x@spf-fail.example", message())
        assert code == 250
        fields = header_fields(delivered(live, before))
        i = next(n for n, f in enumerate(fields) if f.startswith(b"X-Eqmail-DMARC:"))
        assert fields[i] == b"X-Eqmail-DMARC: quarantine (policy=reject; header.from=example.com)"
        assert fields[i - 1].startswith(f"Authentication-Results: {ME}".encode())
        assert b"dmarc=fail" in fields[i - 1]
    finally:
        live.configure(dmarcreject="")


def test_header_only_default_delivers_a_reject_failure_unmarked(live: Live) -> None:
    before = count(live)
    code, _ = send(live, "x@spf-fail.example", message())
    assert code == 250
    data = delivered(live, before)
    assert b"X-Eqmail-DMARC" not in data and b"dmarc=fail" in data


# ------------------------------------------------------------------ who is not checked


FORGED = f"Authentication-Results: {ME}; dkim=pass header.d=example.com\n".encode()


def exact_delivery(data: bytes, sent: bytes) -> None:
    """The message as it would have been without control/authcheck: the delivery's
    Return-Path and Delivered-To, the two Received lines, then every byte sent."""
    lines = data.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: (qmail ") and lines[3].startswith(b"Received: from ")
    assert lines[4].startswith(b"  by ")
    assert b"\n".join(lines[5:]) == sent


def test_relay_and_authenticated_clients_get_nothing_added_or_removed(live: Live) -> None:
    for kw in ({"port": live.relay}, {"port": live.submission, "login": True}):
        before = count(live)
        live.dns.queries.clear()
        sent = FORGED + message("x@nospf.example")
        code, _ = send(live, "x@nospf.example", sent, **kw)  # type: ignore[arg-type]
        assert code == 250
        exact_delivery(delivered(live, before), sent)
        assert live.dns.queries == [], kw


def test_authcheck_off_is_byte_identical_and_asks_no_dns(live: Live) -> None:
    live.configure(authcheck="")
    try:
        before = count(live)
        live.dns.queries.clear()
        sent = FORGED + signed(message())
        code, _ = send(live, "x@spf-fail.example", sent)
        assert code == 250
        exact_delivery(delivered(live, before), sent)
        assert live.dns.queries == []
    finally:
        live.configure(authcheck="1")


def test_a_silent_dns_server_gives_temperror_and_other_sessions_go_on(live: Live) -> None:
    """Every lookup of a message unanswered: all temperror after control/authtimeout,
    250 not 5xx, and meanwhile another client's session is not held up."""
    silent = DnsServer({})
    silent.start()
    silent.behaviour = Behaviour.SILENT
    live.configure(dnsservers=f"127.0.0.1:{silent.port}", dmarcreject="reject")
    try:
        before = count(live)
        reply: list[tuple[int, bytes]] = []
        slow = threading.Thread(target=lambda: reply.append(
            send(live, "bounces@example.com", signed(message()))))
        began = time.monotonic()
        slow.start()
        time.sleep(0.3)
        code, _ = send(live, "y@nospf.example", message("y@nospf.example"), port=live.relay)
        assert code == 250 and time.monotonic() - began < 2.5  # not behind the slow one
        slow.join(30)
        assert reply and reply[0][0] == 250
        assert time.monotonic() - began >= 2.5  # it did wait for the lookups
        files = live.inst.wait_for_mail(before + 2)
        checked = [f.read_bytes() for f in files if b"Authentication-Results" in f.read_bytes()
                   and b"slow" not in f.read_bytes()]
        newest = max(checked, key=lambda d: d.count(b"temperror"))
        r = results(our_results(newest))
        assert r["spf"][0].startswith("temperror")
        assert all(d.startswith("temperror") for d in r["dkim"])
        assert r["dmarc"][0].startswith("temperror")
        assert silent.queries  # it was asked
    finally:
        live.configure(dnsservers=f"127.0.0.1:{live.dns.port}", dmarcreject="")
        silent.stop()
