"""Issue 12 item 11 end to end: no backscatter by default.

A live instance (listeners on 127.0.0.1 and ::1; 127.0.0.1 is a relay client by
tcp.smtp, ::1 is not) refuses unknown local recipients at RCPT with 550 -- decided by the
rules local delivery uses: users/assign exact and wildcard entries, the password
database (as root: a real system user), ``+`` extensions with ``.qmail-ext`` /
``.qmail-default``, virtualdomains, the alias user -- and delivers everything it
accepted.  A home directory the listener cannot search is accepted, never refused.
Bounces carry at most control/bouncemaxbytes of the original and parse with Python's
email; bounces to one sender are limited by control/bouncelimit while double bounces to
the postmaster are neither limited nor multiplied; control/rcptchecklocal 0 gives
qmail's accept-then-bounce back.
"""

from __future__ import annotations

import email
import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import IS_ROOT, ME, TEST_USER, Instance, free_port, make_maildir, poll
from live_smtp import RawClient, deliveries, log_size, qp_of, wait_log

from eqmail.queue.client import submit
from eqmail.smtp import replies

V4, V6 = "127.0.0.1", "::1"
PW_USER = "eqmrcptpw"  # a real passwd user (root only): qmail-getpw's path
NO_MAILBOX = (550, [replies.NO_MAILBOX.text])
BOUNCE_LIMIT = 3


@dataclass
class Mx:
    inst: Instance
    port: int
    dflt: Path          # home of "dflt" (users/assign), with a .qmail-default
    pw_home: Path | None


def _home(inst: Instance, name: str, mode: int = 0o755) -> Path:
    home = inst.root / "home" / name
    home.mkdir()
    os.chown(home, inst.uid, inst.gid)
    make_maildir(home / "Maildir", inst.uid, inst.gid)
    os.chmod(home, mode)
    return home


def _dot(home: Path, name: str, uid: int, gid: int, text: str = "./Maildir/\n") -> None:
    (home / name).write_text(text)
    os.chmod(home / name, 0o644)
    os.chown(home / name, uid, gid)


def _passwd_user() -> Path | None:
    """A system user whose home exists and is theirs (qmail-getpw accepts it)."""
    if not IS_ROOT:
        return None
    home = Path(f"/var/tmp/{PW_USER}-home")
    try:
        pwd.getpwnam(PW_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                        str(home), "--shell", "/usr/sbin/nologin", PW_USER], check=True)
    pw = pwd.getpwnam(PW_USER)
    home.mkdir(exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o755)
    make_maildir(home / "Maildir", pw.pw_uid, pw.pw_gid)
    _dot(home, ".qmail-pw", pw.pw_uid, pw.pw_gid)
    return home


@pytest.fixture(scope="module")
def mx() -> Iterator[Mx]:
    port = free_port()
    inst = Instance.create(listen=f"smtp {V4}:{port}\nsmtp [{V6}]:{port}", extra_controls={
        "tcp.smtp": f'{V4}:allow,RELAYCLIENT=""\n:allow\n',
        "rcpthosts": f"{ME}\nvirt.example\n",
        "virtualdomains": "virt.example:vd\n",
        "bouncelimit": str(BOUNCE_LIMIT),
    })
    home, uid, gid = inst.home, inst.uid, inst.gid
    owner = TEST_USER if IS_ROOT else pwd.getpwuid(uid).pw_name
    dflt = _home(inst, "dflt")
    private = _home(inst, "private", 0o700)  # eqmaild cannot search it (root runs only)
    ent = f"{owner}:{uid}:{gid}"
    lines = (inst.root / "users" / "assign").read_text().splitlines()
    lines[-1:-1] = [
        f"+vd-:{ent}:{home}:-:vd-:",         # the virtual domain's users
        f"=sales:{ent}:{home}:-:ext:",       # exact entry with an extension
        f"=nosales:{ent}:{home}:-:none:",    # ... whose .qmail file does not exist
        f"=dflt:{ent}:{dflt}:::",
        f"+dflt+:{ent}:{dflt}:-::",          # wildcard: dflt+anything -> .qmail-default
        f"=private:{ent}:{private}:-:x:",
        f"=private2:{ent}:{private}:-:nothing:",
    ]
    (inst.root / "users" / "assign").write_text("\n".join(lines) + "\n")
    _dot(home, ".qmail-ext", uid, gid)
    _dot(home, ".qmail-vd-alice", uid, gid)
    _dot(dflt, ".qmail-default", uid, gid)
    _dot(private, ".qmail-x", uid, gid)
    pw_home = _passwd_user()
    inst.start()
    try:
        yield Mx(inst, port, dflt, pw_home)
    finally:
        inst.destroy()


def session(mx: Mx, host: str) -> RawClient:
    c = RawClient(host, mx.port)
    assert c.reply()[0] == 220
    assert c.command("EHLO client.example")[0] == 250
    return c


def files_with(maildir: Path, needle: bytes) -> list[bytes]:
    new = maildir / "new"
    return [p.read_bytes() for p in sorted(new.iterdir()) if needle in p.read_bytes()]


# ---- (a) unknown local recipients are refused at RCPT -----------------------------------

@pytest.mark.parametrize("host", [V4, V6])
def test_unknown_local_recipients_get_550_known_ones_are_delivered(mx: Mx, host: str) -> None:
    inst = mx.inst
    start = log_size(inst)
    c = session(mx, host)
    assert c.command(f"MAIL FROM:<dflt+rcpt@{ME}>") == (250, ["ok"])
    accepted = {  # address -> (maildir, Delivered-To)
        f"testuser@{ME}": (inst.home, f"testuser@{ME}"),                 # assign, own address
        f"testuser+ext@{ME}": (inst.home, f"testuser+ext@{ME}"),         # .qmail-ext
        f"TestUser+EXT@{ME.upper()}": (inst.home, f"TestUser+EXT@{ME.upper()}"),
        f"dflt+anything-at-all@{ME}": (mx.dflt, f"dflt+anything-at-all@{ME}"),  # .qmail-default
        f"sales@{ME}": (inst.home, f"sales@{ME}"),                       # assign with ext
        "alice@virt.example": (inst.home, "vd-alice@virt.example"),      # virtualdomains
        f"postmaster@{ME}": (inst.root / "alias", f"postmaster@{ME}"),   # the alias user
    }
    if mx.pw_home is not None:  # the password database
        accepted[f"{PW_USER}@{ME}"] = (mx.pw_home, f"{PW_USER}@{ME}")
        accepted[f"{PW_USER}+pw@{ME}"] = (mx.pw_home, f"{PW_USER}+pw@{ME}")
    refused = [f"nobody@{ME}", f"testuser+nothing@{ME}", f"testuser-ext@{ME}", f"nosales@{ME}",
               "bob@virt.example", f"NoBody@{ME}"]
    if mx.pw_home is not None:
        refused.append(f"{PW_USER}+zz@{ME}")
    for rcpt in refused:
        assert c.command(f"RCPT TO:<{rcpt}>") == NO_MAILBOX, rcpt
    for rcpt in accepted:
        assert c.command(f"RCPT TO:<{rcpt}>") == (250, ["ok"]), rcpt
    assert c.command("DATA")[0] == 354
    c.send(f"Subject: rcpt check {host}\r\n\r\nhello\r\n.\r\n".encode())
    line = c.line()
    qp = qp_of(line)
    assert qp is not None, line
    c.command("QUIT")
    for rcpt, (home, dt) in accepted.items():
        marker = f"\nDelivered-To: {dt}\n".encode()
        poll(lambda box=home / "Maildir", m=marker: [d for d in deliveries(box, qp) if m in d],
             20, f"the delivery to {rcpt}", inst)
    log = wait_log(inst, "no mailbox", start)
    assert f"qmail-smtpd: no mailbox: dflt+rcpt@{ME} from {host} to nobody@{ME}" in log
    inst.wait_queue_empty()
    assert not files_with(mx.dflt / "Maildir", b"To: dflt+rcpt@")  # nothing bounced


@pytest.mark.parametrize("host", [V4, V6])
def test_relaying_is_checked_separately_and_remote_domains_are_not_looked_up(mx: Mx, host: str) -> None:
    c = session(mx, host)
    assert c.command(f"MAIL FROM:<dflt+rcpt@{ME}>") == (250, ["ok"])
    remote = c.command("RCPT TO:<anyone@remote.example>")
    # 127.0.0.1 may relay (tcp.smtp): accepted unchecked; ::1 may not: 553, not 550
    assert remote == ((250, ["ok"]) if host == V4 else (553, [replies.NO_RCPTHOSTS.text]))
    # a relay client's local recipients are checked all the same
    assert c.command(f"RCPT TO:<nobody@{ME}>") == NO_MAILBOX
    assert c.command("RSET")[0] == 250
    c.command("QUIT")


@pytest.mark.skipif(not IS_ROOT, reason="needs a home directory the listener's user cannot search")
def test_a_home_the_listener_cannot_search_is_accepted_never_refused(mx: Mx) -> None:
    start = log_size(mx.inst)
    c = session(mx, V6)
    assert c.command(f"MAIL FROM:<dflt+rcpt@{ME}>") == (250, ["ok"])
    # private's home is 0700 (eqmaild cannot look inside): its .qmail-x exists, its
    # .qmail-nothing does not -- both are accepted; delivery decides
    assert c.command(f"RCPT TO:<private@{ME}>") == (250, ["ok"])
    assert c.command(f"RCPT TO:<private2@{ME}>") == (250, ["ok"])
    assert c.command("RSET")[0] == 250
    c.command("QUIT")
    log = wait_log(mx.inst, "recipient check cannot tell, accepting", start)
    assert "Permission denied" in log


# ---- (b) bounded bounces, (c) rate-limited bounces ---------------------------------------

def test_the_bounce_of_a_1_mb_message_is_small_and_parses(mx: Mx) -> None:
    body = b"".join(b"%07d " % i + b"z" * 91 + b"\n" for i in range(10_500))  # ~1 MB
    message = b"From: big@" + ME.encode() + b"\nSubject: a big one\n\n" + body
    res = submit(mx.inst.root, f"dflt+big@{ME}", [f"nosuchuser@{ME}"], message)
    assert res.ok, res.text
    box = mx.dflt / "Maildir"
    data = poll(lambda: files_with(box, b"To: dflt+big@"), 30, "the bounce", mx.inst)[0]
    assert len(data) < 50_000 + 2_000, len(data)
    msg = email.message_from_bytes(data)
    assert msg["Subject"] == "failure notice" and msg["To"] == f"dflt+big@{ME}"
    assert not msg.defects
    text = msg.get_payload(decode=True).decode()
    assert text.startswith(f"Hi. This is the qmail-send program at {ME}.\n")
    assert (f"<nosuchuser@{ME}>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
            in text)
    m = re.search(r"\n--- Below this line is the beginning of a copy of the message, cut to "
                  r"at most 50000 of its (\d+) bytes\.\n--- The rest of the message is not "
                  r"included\.\n\nReturn-Path: <dflt\+big@" + re.escape(ME) + r">\n", text)
    assert m and int(m.group(1)) > len(message), text[:2000]
    copy = text[m.end():]
    assert "\nSubject: a big one\n" in copy and copy.endswith("\n")
    assert len(copy.encode()) <= 50_000
    assert body.decode().startswith(copy.split("\n\n", 1)[1])  # the start, whole lines


def test_bounces_to_one_sender_are_limited_double_bounces_are_not(mx: Mx) -> None:
    inst = mx.inst
    start = log_size(inst)
    pm_before = len(files_with(inst.alias_maildir, b"but the bounce bounced!"))
    for i in range(BOUNCE_LIMIT + 3):  # a forged sender: every message bounces
        assert submit(inst.root, f"dflt+victim@{ME}", [f"nosuchuser{i}@{ME}"],
                      b"Subject: spam %d\n\nx\n" % i).ok
    for i in range(4):  # bounces that bounce: double bounces to the postmaster
        assert submit(inst.root, "", [f"nosuchuser{i}@{ME}"], b"Subject: nb %d\n\nx\n" % i).ok
    text = poll(lambda: (t := inst.log()[start:]).count("bounce limit: discarding") >= 3 and t,
                30, "three dropped bounces", inst)
    assert isinstance(text, str)
    assert "bounce limit: discarding bounce/" in text
    assert (f"to dflt+victim@{ME}: more than {BOUNCE_LIMIT} bounces to this address within "
            "an hour") in text
    poll(lambda: len(files_with(inst.alias_maildir, b"but the bounce bounced!")) >= pm_before + 4,
         30, "four double bounces", inst)
    inst.wait_queue_empty()
    time.sleep(0.5)  # nothing else is on its way: the queue is empty
    got = files_with(mx.dflt / "Maildir", b"To: dflt+victim@")
    assert len(got) == BOUNCE_LIMIT
    assert len(files_with(inst.alias_maildir, b"but the bounce bounced!")) == pm_before + 4
    assert inst.log()[start:].count("bounce limit: discarding") == 3


# ---- the control restores qmail's behaviour ---------------------------------------------

def test_rcptchecklocal_0_accepts_everything_and_bounces_later(mx: Mx) -> None:
    inst = mx.inst
    inst.write_control("rcptchecklocal", "0")

    def accepted(host: str) -> bool:
        c = session(mx, host)
        c.command(f"MAIL FROM:<dflt+off@{ME}>")
        ok = c.command(f"RCPT TO:<nobody@{ME}>")[0] == 250
        c.command("QUIT")
        return ok

    poll(lambda: accepted(V4) and accepted(V6), 30, "rcptchecklocal 0 to take effect", inst)
    for host in (V4, V6):
        c = session(mx, host)
        assert c.command(f"MAIL FROM:<dflt+off@{ME}>") == (250, ["ok"])
        assert c.command(f"RCPT TO:<nobody@{ME}>") == (250, ["ok"])
        assert c.command("DATA")[0] == 354
        assert c.command(b"Subject: to nobody\r\n\r\nx\r\n.")[0] == 250
        c.command("QUIT")
    bounces = poll(lambda: len(b := files_with(mx.dflt / "Maildir", b"To: dflt+off@")) >= 2 and b,
                   30, "two bounces", inst)
    assert isinstance(bounces, list)
    assert all(f"<nobody@{ME}>:\nSorry, no mailbox here by that name. (#5.1.1)\n".encode() in b
               for b in bounces)
    inst.write_control("rcptchecklocal", "1")
