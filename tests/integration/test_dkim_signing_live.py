"""DKIM signing end to end: a running instance signs what it sends, and verifiers nobody
here wrote check the signatures against records a DNS server on loopback publishes.

One instance for the module, started the way an admin starts it:
- listeners: ``smtp`` for anyone on 127.0.0.1 and [::1] (an outsider: neither relay
  client nor authenticated), ``submission`` with SMTP AUTH (eqmail-checkpassword) on
  127.0.0.1 and [::1], and an ``smtp`` listener whose tcprules make every client a relay
  client (RELAYCLIENT);
- keys made by ``eqmailctl dkim keygen`` (RSA selector ``rsa`` and Ed25519 selector
  ``ed`` for example.com; RSA for test.example, the parent of ``me``, which signs
  eqmail's bounces; one for late.example, broken and mended by a test), their records
  published by tests/dnsserver.py on 127.53.16.9 port 53 (OpenDKIM's Nameservers
  option takes no port; root needed, skipped otherwise);
- control/smtproutes sends remote.example to a loopback SMTP sink (tests/smtpsink.py)
  on [::1].
What arrives at the sink is verified with Perl's Mail::DKIM (RSA; Debian 12's has no
Ed25519) and ``opendkim -t`` (RSA and Ed25519) — the helpers of test_dkim_interop.py.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnsserver import DnsServer, txt
from harness import ME, Instance, bin_path, free_port, poll, worker_pids
from smtpsink import Script, SmtpSink, Transaction
from test_dkim_interop import VERIFY_PL

DNS_PORT = 53  # OpenDKIM's Nameservers option takes an address, no port
# Not test_dkim_interop's address (both may run at once), nor one another run of this
# module holds: the first of these that binds (the world fixture sets it).
DNS_HOSTS = [f"127.53.{n}.9" for n in range(17, 33)]
DNS_HOST = DNS_HOSTS[0]
PASSWORD = "s3cret pass"
FORWARDER = "testuser+fwd"  # its .qmail forwards to a remote address

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("perl", "opendkim")) or os.geteuid() != 0,
    reason="needs root (DNS on port 53), libmail-dkim-perl and opendkim (scripts/bootstrap.sh)")


@dataclass
class World:
    inst: Instance
    sink: SmtpSink
    dns: DnsServer
    smtp: int  # anyone: an outsider
    submission: int  # AUTH
    relay: int  # RELAYCLIENT for every client


def keygen(inst: Instance, domain: str, selector: str, *args: str) -> tuple[str, str]:
    """Make a key with eqmailctl; (record name, value) of the line it says to publish."""
    out = inst.ctl("dkim", "keygen", domain, "--selector", selector, *args).stdout.strip()
    name, _, rest = out.partition(". IN TXT ")
    return name, "".join(re.findall(r'"([^"]*)"', rest))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    global DNS_HOST
    for host in DNS_HOSTS:
        dns = DnsServer({}, host=host, port=DNS_PORT)
        try:
            dns.start()
            DNS_HOST = host
            break
        except OSError as e:
            why = e
    else:
        pytest.skip(f"cannot serve DNS on port {DNS_PORT} of {DNS_HOSTS[0]}..: {why}")
    sink = SmtpSink(Script())
    sink_port = sink.listen("::1")
    ports = {name: free_port() for name in ("smtp", "submission", "relay")}
    inst = Instance.create(listen=None)
    try:
        passwords = inst.root / "control" / "passwords"
        subprocess.run([bin_path("eqmail-checkpassword"), "passwd", "add", "joe", "--file",
                        str(passwords)], input=f"{PASSWORD}\n", text=True, check=True,
                       capture_output=True)
        check = f"{bin_path('eqmail-checkpassword')} --file {passwords} /bin/true"
        inst.write_control("listen", "\n".join(
            [f"smtp {host}:{ports['smtp']}" for host in ("127.0.0.1", "[::1]")]
            + [f"submission {host}:{ports['submission']} checkpassword='{check}'"
               for host in ("127.0.0.1", "[::1]")]
            + [f"smtp 127.0.0.1:{ports['relay']} rules=tcp.relay"]))
        inst.write_control("tcp.relay", ':allow,RELAYCLIENT=""')
        inst.write_control("smtproutes", f"remote.example:[::1]:{sink_port}")
        inst.write_control("dnsservers", f"{DNS_HOST}:{DNS_PORT}")
        for domain, selector, args in (("example.com", "rsa", ()),
                                       ("example.com", "ed", ("--type", "ed25519")),
                                       ("test.example", "bounce", ("--bits", "1024")),
                                       ("late.example", "rsa", ("--bits", "1024"))):
            name, value = keygen(inst, domain, selector, *args)
            dns.zone[name] = {"TXT": [txt(value)]}
        for ext, line in (("fwd", "&someone@remote.example"), ("bounce", "|exit 100"),
                          ("defer", "|exit 111")):
            dot = inst.home / f".qmail-{ext}"
            dot.write_text(line + "\n")
            os.chown(dot, inst.uid, inst.gid)
        inst.start()
        yield World(inst, sink, dns, ports["smtp"], ports["submission"], ports["relay"])
    finally:
        inst.destroy()
        sink.stop()
        dns.stop()


def message(subject: str, sender: str = "Ada <ada@example.com>") -> bytes:
    return (f"From: {sender}\nTo: Someone <someone@remote.example>\nSubject: {subject}\n"
            f"Date: Mon, 7 Dec 2026 22:00:00 +0000\nMessage-ID: <{subject.replace(' ', '.')}@example.com>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
            "Hello  there,\n.a line that starts with a dot\n\nthis line ends in spaces   \n").encode()


def arrived(world: World, subject: str, timeout: float = 30.0) -> Transaction:
    """The sink's transaction whose data carries ``subject``."""
    want = f"Subject: {subject}\r\n".encode()
    found: list[Transaction] = []

    def look() -> bool:
        found[:] = [t for t in list(world.sink.transactions) if want in t.data]
        return bool(found)

    poll(look, timeout, f"the message {subject!r} at the sink", world.inst)
    assert len(found) == 1, [t.data[:200] for t in found]
    return found[0]


def unstuffed(data: bytes) -> bytes:
    """The message as the sink's client sent it, without SMTP's dot-stuffing."""
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in data.split(b"\r\n"))


def signatures(data: bytes) -> list[str]:
    """The d=/s=/a= of each DKIM-Signature field, in order."""
    out = []
    for m in re.finditer(rb"^DKIM-Signature:(.*?)\r\n(?! |\t)", data, re.M | re.S):
        tags = dict(re.findall(r"\b([dsa])=([^;\s]+)", m.group(1).decode()))
        out.append(f"{tags['d']} {tags['s']} {tags['a']}")
    return out


def mail_dkim(world: World, data: bytes) -> list[str]:
    done = subprocess.run(["perl", "-e", VERIFY_PL, DNS_HOST, str(DNS_PORT)], input=data,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().splitlines()


def opendkim(tmp: Path, data: bytes) -> str:
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Syslog no\nNameservers {DNS_HOST}\nMode v\nAlwaysAddARHeader yes\n")
    msg = tmp / "message.eml"
    msg.write_bytes(data)
    done = subprocess.run(["opendkim", "-x", str(conf), "-vvv", "-t", str(msg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def submit(host: str, port: int, sender: str, rcpts: list[str], data: bytes,
           login: bool = False) -> None:
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.test")
        if login:
            s.login("joe", PASSWORD)
        refused = s.sendmail(sender, rcpts, re.sub(rb"\r?\n", b"\r\n", data))  # SMTP's CRLF
        assert refused == {}


def test_submission_with_auth_is_signed_rsa_and_ed25519(world: World, tmp_path: Path) -> None:
    """Over [::1]; two recipients in one transaction share one set of signatures."""
    submit("::1", world.submission, "ada@example.com",
           ["someone@remote.example", "other@remote.example"], message("auth one"), login=True)
    t = arrived(world, "auth one")
    assert t.rcpts == ["someone@remote.example", "other@remote.example"]
    data = unstuffed(t.data)
    assert signatures(data) == ["example.com ed ed25519-sha256", "example.com rsa rsa-sha256"]
    verdicts = mail_dkim(world, data)
    assert verdicts[1] == "example.com rsa rsa-sha256 pass", verdicts
    out = opendkim(tmp_path, data)
    assert re.search(r"dkim=pass \(2048-bit key[^)]*\) header\.d=example\.com "
                     r"header\.i=@example\.com header\.a=rsa-sha256 header\.s=rsa", out), out
    assert re.search(r"dkim=pass header\.d=example\.com header\.i=@example\.com "
                     r"header\.a=ed25519-sha256 header\.s=ed", out), out
    # the same bytes with the body changed fail: the verifiers really looked
    out = opendkim(tmp_path, data.replace(b"Hello", b"Hallo"))
    assert "dkim=pass" not in out and "dkim=fail" in out, out


def test_relay_client_is_signed(world: World, tmp_path: Path) -> None:
    """A subdomain's From: is signed by the parent domain's keys (d=example.com)."""
    submit("127.0.0.1", world.relay, "bob@lists.example.com", ["someone@remote.example"],
           message("relay one", "Bob <bob@lists.example.com>"))
    data = unstuffed(arrived(world, "relay one").data)
    assert signatures(data) == ["example.com ed ed25519-sha256", "example.com rsa rsa-sha256"]
    assert mail_dkim(world, data)[1] == "example.com rsa rsa-sha256 pass"
    out = opendkim(tmp_path, data)
    assert out.count("dkim=pass") == 2, out


def test_local_injection_is_signed(world: World) -> None:
    proc = world.inst.sendmail(["-f", "ada@example.com", "someone@remote.example"],
                               message("local one"))
    assert proc.returncode == 0, proc.stderr
    data = unstuffed(arrived(world, "local one").data)
    assert mail_dkim(world, data)[1] == "example.com rsa rsa-sha256 pass"


def test_outsider_claiming_our_domain_is_not_signed_even_when_forwarded(world: World) -> None:
    """An unauthenticated, non-relay client sends From: our domain to a local user whose
    .qmail forwards it to a remote address: the copy leaves unsigned (and the outsider
    cannot relay it directly)."""
    with smtplib.SMTP("::1", world.smtp, timeout=30) as s:
        s.ehlo("outsider.test")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("ada@example.com", ["someone@remote.example"], message("spoof direct"))
    submit("::1", world.smtp, "ada@example.com", [f"{FORWARDER}@{ME}"], message("spoof fwd"))
    t = arrived(world, "spoof fwd")
    assert t.rcpts == ["someone@remote.example"]
    assert b"DKIM-Signature" not in t.data and b"From: Ada <ada@example.com>\r\n" in t.data
    submit("127.0.0.1", world.smtp, "ada@example.com", [f"{FORWARDER}@{ME}"], message("spoof v4"))
    assert b"DKIM-Signature" not in arrived(world, "spoof v4").data


def test_origin_in_the_queue_files(world: World) -> None:
    """The outsider's message keeps qmail's info/ bytes (no X record); an authenticated
    client's gets ``Xorigin=auth`` after its F record.  Both wait in the queue (their
    .qmail defers), where queue show says their origin."""
    inst = world.inst
    submit("::1", world.smtp, "mallory@example.com", [f"testuser+defer@{ME}"], message("net wait"))
    submit("::1", world.submission, "joe@example.com", [f"testuser+defer@{ME}"],
           message("auth wait"), login=True)
    ids: dict[str, str] = {}

    def both_deferred() -> bool:
        listing = inst.ctl("queue", "list").stdout
        for who in ("mallory", "joe"):
            found = re.findall(rf"#(\d+) .*<{who}@example\.com>", listing)
            if found:
                ids[who] = found[0]
        return len(ids) == 2 and inst.log().count("deferral: ") >= 2

    poll(both_deferred, 30, "both messages deferred", inst)
    info = {who: next((inst.root / "queue" / "info").glob(f"*/{msgid}")).read_bytes()
            for who, msgid in ids.items()}
    assert info == {"mallory": b"Fmallory@example.com\0", "joe": b"Fjoe@example.com\0Xorigin=auth\0"}
    assert "origin: network\n" in inst.ctl("queue", "show", ids["mallory"]).stdout
    assert "origin: auth\n" in inst.ctl("queue", "show", ids["joe"]).stdout
    for msgid in ids.values():
        inst.ctl("queue", "delete", msgid)


CLAIM = """
import sys
from pathlib import Path
from eqmail.ipc.queue import Origin, QueueRole
from eqmail.queue.client import submit
res = submit(Path(sys.argv[1]), "liar@example.com", [sys.argv[2]], b"Subject: liar\\n\\nhi\\n",
             role=QueueRole.NETWORK, origin=Origin(sys.argv[3]))
print(res.msgid)
"""


@pytest.mark.parametrize("claim", ["auth", "relay", "bounce"])
def test_a_local_user_cannot_claim_what_its_role_does_not_allow(world: World, claim: str) -> None:
    """A local user (not the listener's uid) says hello as the network role and claims
    an origin: the queue writer records ``local``, what its injection is worth."""
    import sys

    inst = world.inst
    done = subprocess.run(["runuser", "-u", "eqmtest", "--", sys.executable, "-c", CLAIM,
                           str(inst.root), f"testuser+defer@{ME}", claim],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
    msgid = done.stdout.strip()
    shown = inst.ctl("queue", "show", msgid).stdout
    assert "origin: local\n" in shown and f"origin: {claim}" not in shown, shown
    # preprocessed (the origin copied into info/), then removed
    poll(lambda: "\tlocal\t" in inst.ctl("queue", "show", msgid).stdout, 30, "preprocessing", inst)
    assert "origin: local\n" in inst.ctl("queue", "show", msgid).stdout
    inst.ctl("queue", "delete", msgid)


def test_bounce_for_mes_domain_is_signed(world: World, tmp_path: Path) -> None:
    """The bounce's From: is MAILER-DAEMON@me (mx.test.example): test.example's key signs."""
    proc = world.inst.sendmail(["-f", "someone@remote.example", f"testuser+bounce@{ME}"],
                               message("to bounce", "Someone <someone@remote.example>"))
    assert proc.returncode == 0, proc.stderr
    t = arrived(world, "to bounce")  # the bounce quotes the original's header
    assert t.mail.startswith("FROM:<> "), t.mail
    data = unstuffed(t.data)
    assert re.search(rb"^From: MAILER-DAEMON@mx\.test\.example\r\n", data, re.M), data[:600]
    assert signatures(data) == ["test.example bounce rsa-sha256"]
    assert mail_dkim(world, data) == ["test.example bounce rsa-sha256 pass"]
    assert "dkim=pass" in opendkim(tmp_path, data)


def test_unloadable_key_defers_until_mended(world: World, tmp_path: Path) -> None:
    """Mode 000 (the signer, eqmailr, cannot read it), then garbage: each defers with a
    log line naming the file, nothing leaves unsigned; mended, the message goes out
    signed at the next try.  queue show says the message's origin meanwhile."""
    inst = world.inst
    key = inst.root / "control" / "dkim" / "late.example" / "rsa.key"
    good = key.read_bytes()
    os.chmod(key, 0o000)
    submit("127.0.0.1", world.submission, "eve@late.example", ["someone@remote.example"],
           message("late one", "Eve <eve@late.example>"), login=True)
    poll(lambda: f"DKIM key {key}: cannot read: Permission denied" in inst.log(), 30,
         "the deferral naming the key file", inst)
    listing = inst.ctl("queue", "list").stdout
    msgid = re.findall(r"#(\d+) .*<eve@late\.example>", listing)[0]
    assert "origin: auth\n" in inst.ctl("queue", "show", msgid).stdout
    os.chmod(key, 0o400)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    inst.ctl("queue", "flush")
    poll(lambda: re.search(rf"DKIM key {re.escape(str(key))}: not a PEM private key.*"
                           rf"delivery of msg {msgid} deferred", inst.log()), 30,
         "the deferral naming the garbage key", inst)
    assert not [t for t in world.sink.transactions if b"Subject: late one" in t.data]
    key.write_bytes(good)
    inst.ctl("queue", "flush")
    data = unstuffed(arrived(world, "late one").data)
    assert signatures(data) == ["late.example rsa rsa-sha256"]
    assert mail_dkim(world, data) == ["late.example rsa rsa-sha256 pass"]


def test_check_names_dkimsign_errors_and_unreadable_keys(world: World) -> None:
    inst = world.inst
    key = inst.root / "control" / "dkim" / "example.com" / "ed.key"
    try:
        inst.write_control("dkimsign", "* canon=relaxed/simple\nexample.com headers=to:subject\n")
        bad = inst.ctl("check", check=False)
        assert "control/dkimsign:2: headers= must include from" in bad.stdout + bad.stderr
        (inst.root / "control" / "dkimsign").unlink()
        os.chmod(key.parent, 0o700)  # root's alone: the signer cannot enter
        out = inst.ctl("check").stdout
        assert re.search(r"warning: control/dkim/example\.com/ed\.key: the remote delivery user "
                         r"cannot read it \(no search permission on \S+example\.com\)", out), out
    finally:
        os.chmod(key.parent, 0o750)
        (inst.root / "control" / "dkimsign").unlink(missing_ok=True)


def test_replaced_key_is_used_without_restart(world: World) -> None:
    """keygen --force replaces example.com's RSA key while remote delivery runs on: the
    next message is signed with the new key (only its record is published now)."""
    inst = world.inst
    pids = sorted(worker_pids(inst, "eqmail: remote"))
    assert pids
    name, value = keygen(inst, "example.com", "rsa", "--force")
    world.dns.zone[name] = {"TXT": [txt(value)]}
    submit("127.0.0.1", world.submission, "ada@example.com", ["someone@remote.example"],
           message("new key"), login=True)
    data = unstuffed(arrived(world, "new key").data)
    assert mail_dkim(world, data)[1] == "example.com rsa rsa-sha256 pass"
    assert sorted(worker_pids(inst, "eqmail: remote")) == pids


def test_signed_after_the_before_remote_hook(world: World) -> None:
    """A before-remote hook that changes the body per recipient: each recipient's copy
    is its own transaction, signed over what the hook made (a signature made before the
    hook would fail the body hash)."""
    inst = world.inst
    before = set(worker_pids(inst, "eqmail: remote"))
    inst.write_control("beforemote", "cat; printf 'footer for %s\\n' \"$3\"\n")
    try:
        inst.ctl("reload")
        poll(lambda: set(worker_pids(inst, "eqmail: remote")) - before, 30,
             "a new remote delivery worker", inst)
        submit("::1", world.submission, "ada@example.com",
               ["someone@remote.example", "other@remote.example"], message("hooked one"),
               login=True)
        want = b"Subject: hooked one\r\n"
        poll(lambda: len([t for t in world.sink.transactions if want in t.data]) == 2, 30,
             "two hooked copies", inst)
        for t in [t for t in world.sink.transactions if want in t.data]:
            [rcpt] = t.rcpts
            data = unstuffed(t.data)
            assert data.endswith(f"footer for {rcpt}\r\n".encode())
            assert signatures(data) == ["example.com ed ed25519-sha256", "example.com rsa rsa-sha256"]
            assert mail_dkim(world, data)[1] == "example.com rsa rsa-sha256 pass"
    finally:
        (inst.root / "control" / "beforemote").unlink(missing_ok=True)
        inst.ctl("reload")


def test_dkimsign_settings_apply_on_reload(world: World) -> None:
    """control/dkimsign (eqmailctl reload) chooses the canonicalisation, the fields,
    over-signing and x=; ``*`` gives what a domain's line leaves out."""
    inst = world.inst
    inst.write_control("dkimsign", "* expire=3600\n"
                                   "example.com canon=simple/simple "
                                   "headers=from:to:subject:date oversign=from:subject\n")
    before = set(worker_pids(inst, "eqmail: remote"))
    try:
        inst.ctl("reload")
        # the remote worker is replaced: dkimsign is one of the controls it is started with
        poll(lambda: set(worker_pids(inst, "eqmail: remote")) - before, 30,
             "a new remote delivery worker", inst)
        submit("127.0.0.1", world.submission, "ada@example.com", ["someone@remote.example"],
               message("settings one"), login=True)
        data = unstuffed(arrived(world, "settings one").data)
        fields = [re.sub(r"\s", "", m.decode()) for m in
                  re.findall(rb"^DKIM-Signature:(.*?)\r\n(?! |\t)", data, re.M | re.S)]
        rsa = next(f for f in fields if "s=rsa;" in f)
        assert "c=simple/simple;" in rsa and "h=from:to:subject:date:from:subject;" in rsa, rsa
        tags = dict(t.split("=", 1) for t in rsa.split(";") if "=" in t)
        assert int(tags["x"]) - int(tags["t"]) == 3600
        assert mail_dkim(world, data)[1] == "example.com rsa rsa-sha256 pass"
    finally:
        (inst.root / "control" / "dkimsign").unlink(missing_ok=True)
        inst.ctl("reload")
