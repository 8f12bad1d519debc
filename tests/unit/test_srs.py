"""SRS (eqmail.srs) and where eqmail uses it: the address format (vectors made by
Mail::SRS, the reference implementation by SRS's author), round trips and forgeries
(Hypothesis), the control files, ``eqmailctl setup`` and ``check``, the MAIL FROM of
remote delivery, the reversal in preprocessing and the RCPT check of the SMTP session."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from eqmail import srs
from eqmail.cli.check import check_report, format_check
from eqmail.control import Controls, load_controls
from eqmail.delivery.remote import envelope_sender
from eqmail.errors import ControlErrors
from eqmail.ipc.config import ConfigReader, ConfigUpdate
from eqmail.ipc.queue import CleanAnswer, CleanKind, CleanRequest, Origin
from eqmail.queue.layout import create_queue
from eqmail.queue.manager import QueueManager
from eqmail.setup import setup_instance
from eqmail.smtp import actions as a
from eqmail.smtp import replies
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import Session, SessionConfig

DAY = 86400
SECRET = b"abcdefghijklmnopqrstuv"
KEYS = srs.SrsKeys((SECRET,), "fwd.example.net")
# day 315 modulo 1024 ("J3"), the day Mail::SRS made the vectors below
T315 = (20 * 1024 + 315) * DAY + 3600.0


# ---------------------------------------------------------------- the format
def test_vectors_of_mail_srs() -> None:
    # srs --secret=abcdefghijklmnopqrstuv --forward --alias=fwd.example.net alice@example.org
    assert srs.forward("alice@example.org", KEYS, T315) == \
        "SRS0=/Dme=J3=example.org=alice@fwd.example.net"
    # srs --secret=other-secret-123456 --forward --alias=hop2.example <that>
    hop2 = srs.SrsKeys((b"other-secret-123456",), "hop2.example")
    first = "SRS0=/Dme=J3=example.org=alice@fwd.example.net"
    assert srs.forward(first, hop2, T315) == \
        "SRS1=pkiK=fwd.example.net==/Dme=J3=example.org=alice@hop2.example"
    # an SRS1 sender forwarded once more keeps its first hop and gets our hash
    # (srs --secret=abcdefghijklmnopqrstuv --forward --alias=fwd.example.net <SRS1 address>)
    assert srs.forward("SRS1=pkiK=fwd.example.net==/Dme=J3=example.org=alice@hop2.example",
                       KEYS, T315) == "SRS1=SKos=fwd.example.net==/Dme=J3=example.org=alice@fwd.example.net"
    # reversing SRS1 gives the first forwarder's SRS0 address; that one the original
    assert srs.reverse("SRS1=pkiK=fwd.example.net==/Dme=J3=example.org=alice@hop2.example",
                       hop2) == first
    assert srs.reverse(first, KEYS, T315) == "alice@example.org"


def test_refusals() -> None:
    good = srs.forward("bob@example.org", KEYS, T315)
    h = good[5:9]
    assert srs.reverse(good.replace(h, "AAAA" if h != "AAAA" else "BBBB"), KEYS, T315) \
        is srs.Refusal.BAD_HASH
    # a hash shorter than 4 characters never verifies, even when it is a true prefix
    assert srs.reverse(good.replace(h, h[:3]), KEYS, T315) is srs.Refusal.BAD_HASH
    assert srs.reverse(good, KEYS, T315 + 22 * DAY) is srs.Refusal.EXPIRED
    assert srs.reverse(good, KEYS, T315 + 21 * DAY) == "bob@example.org"
    for bad in ("SRS0=abcd=J3=example.org@fwd.example.net", "SRS0=abcd==example.org=bob@x",
                "SRS1=abcd=onlyhost@fwd.example.net", "SRS0=@fwd.example.net"):
        assert srs.reverse(bad, KEYS, T315) is srs.Refusal.MALFORMED, bad
    assert srs.reverse("bob@fwd.example.net", KEYS) is srs.Refusal.NOT_SRS
    assert srs.reverse("SRS2=x=y=z=w@fwd.example.net", KEYS) is srs.Refusal.NOT_SRS


def test_case_smashed_addresses_still_reverse_and_other_separators_are_read() -> None:
    good = srs.forward("Bob@Example.org", KEYS, T315)
    assert srs.reverse(good.upper(), KEYS, T315) == "BOB@EXAMPLE.ORG"
    assert srs.reverse(good.lower(), KEYS, T315) == "bob@example.org"
    assert srs.reverse("SRS0+" + good[5:], KEYS, T315) == "Bob@Example.org"


def test_the_stamp_wraps_after_1024_days() -> None:
    made = (30 * 1024 + 1020) * DAY
    addr = srs.forward("x@example.org", KEYS, made)
    assert srs.reverse(addr, KEYS, made + 10 * DAY) == "x@example.org"  # day 6 of the next cycle
    assert srs.reverse(addr, KEYS, made + 30 * DAY) is srs.Refusal.EXPIRED


def test_rotation_first_secret_signs_all_verify() -> None:
    old = srs.forward("c@example.org", KEYS, T315)
    rotated = srs.SrsKeys((b"a-brand-new-secret-0001", SECRET), "fwd.example.net")
    assert srs.reverse(old, rotated, T315) == "c@example.org"
    new = srs.forward("c@example.org", rotated, T315)
    assert new != old and srs.reverse(new, KEYS, T315) is srs.Refusal.BAD_HASH
    dropped = srs.SrsKeys((b"a-brand-new-secret-0001",), "fwd.example.net")
    assert srs.reverse(old, dropped, T315) is srs.Refusal.BAD_HASH


def test_ours_and_check_look_only_at_our_domain() -> None:
    good = srs.forward("d@example.org", KEYS, T315)
    assert KEYS.ours(good) and KEYS.ours(good.replace("fwd.example.net", "FWD.Example.NET"))
    elsewhere = good.replace("@fwd.example.net", "@other.example")
    assert not KEYS.ours(elsewhere) and srs.check(elsewhere, KEYS, T315) is None
    assert srs.check(good, KEYS, T315) is None and srs.check(good, None) is None
    assert srs.check("SRS0=zzzz=J3=a=b@fwd.example.net", KEYS, T315) is srs.Refusal.BAD_HASH
    assert "abcdefghij" not in repr(KEYS)  # the secret never reaches a log line


domains = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)
locals_ = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


@given(locals_, domains, st.floats(0, 2e9), st.integers(0, 21 * DAY - 1))
def test_reverse_of_forward_is_the_sender(user: str, domain: str, now: float, later: int) -> None:
    assume(not srs.is_srs_local(user))
    addr = srs.forward(f"{user}@{domain}", KEYS, now)
    assert addr.startswith("SRS0=") and addr.endswith("@fwd.example.net")
    assert srs.reverse(addr, KEYS, now + later) == f"{user}@{domain}"


@given(locals_, domains, st.floats(0, 2e9))
def test_an_srs0_sender_comes_back_as_itself(user: str, domain: str, now: float) -> None:
    first = srs.forward(f"{user}@{domain}", srs.SrsKeys((b"first-hop-secret-xyz",), "hop1.example"), now)
    addr = srs.forward(first, KEYS, now)
    assert addr.startswith("SRS1=") and srs.reverse(addr, KEYS, now) == first


@given(locals_, domains, st.data())
def test_a_tampered_address_never_reverses(user: str, domain: str, data: st.DataObject) -> None:
    addr = srs.forward(f"{user}@{domain}", KEYS, T315)
    local = addr.rpartition("@")[0]
    i = data.draw(st.integers(5, len(local) - 1))
    ch = data.draw(st.characters(min_codepoint=33, max_codepoint=126))
    assume(ch.lower() != local[i].lower())  # a smashed case is allowed, on purpose
    tampered = local[:i] + ch + local[i + 1:] + "@fwd.example.net"
    assert isinstance(srs.reverse(tampered, KEYS, T315), srs.Refusal)


@given(st.text(max_size=80))
def test_random_addresses_never_reverse(text: str) -> None:
    for candidate in (text, "SRS0=" + text, "SRS1=" + text, "srs0=" + text + "@fwd.example.net"):
        assert isinstance(srs.reverse(candidate, KEYS, T315), srs.Refusal)


# ---------------------------------------------------------------- control files
def control(tmp_path: Path, **files: str) -> Path:
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    for name, text in files.items():
        path = tmp_path / "control" / name
        path.write_text(text)
        if name == "srssecrets":
            path.chmod(0o600)
    return tmp_path


def test_srs_is_on_with_a_secret_at_me_by_default(tmp_path: Path) -> None:
    c = load_controls(control(tmp_path, srssecrets="# comment\nnew-secret-0123456789\n\nold-secret-0123456789\n"))
    assert c.srs_keys is not None and c.srs_keys.domain == "mx.example.org"
    assert c.srs_keys.secrets == (b"new-secret-0123456789", b"old-secret-0123456789")
    assert c.warnings == ()


def test_srs_off_without_a_secret_or_with_srs_0(tmp_path: Path) -> None:
    assert load_controls(control(tmp_path)).srs_keys is None
    c = load_controls(control(tmp_path, srssecrets="new-secret-0123456789\n", srs="0\n",
                              srsdomain="srs.example.org\n"))
    assert c.srs_keys is None and c.srsdomain == "srs.example.org"
    (tmp_path / "control" / "srs").write_text("1\n")
    keys = load_controls(tmp_path).srs_keys
    assert keys is not None and keys.domain == "srs.example.org"


def test_a_short_secret_or_a_bad_srs_value_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ControlErrors) as e:
        load_controls(control(tmp_path, srssecrets="long-enough-secret-000\nshort\n", srs="2\n"))
    assert sorted(str(err) for err in e.value.errors) == [
        "control/srs:1: 2 out of range 0..1",
        "control/srssecrets:2: secret shorter than 16 characters",
    ]


def test_check_never_shows_the_secret_and_warns_about_mode_and_rcpthosts(tmp_path: Path) -> None:
    root = control(tmp_path, srssecrets="top-secret-value-0123\n", rcpthosts="example.org\n",
                   srsdomain="srs.example.net\n")
    (root / "control" / "srssecrets").chmod(0o644)
    report = check_report_of(root)
    text = format_check(report)
    assert "top-secret-value" not in text and "top-secret-value" not in repr(report)
    rows = {r["file"]: r for r in report["controls"]}
    assert rows["srssecrets"]["text"] == "1 secret (not shown)"
    assert rows["srsdomain"]["text"] == "srs.example.net" and rows["srs"]["text"] == "1"
    assert ("warning: control/srssecrets: mode 0644 lets others read the SRS secret (anyone "
            "who has it can forge bounces): chmod 600") in report["warnings"]
    assert ("warning: control/srsdomain: srs.example.net is not in control/rcpthosts: bounces "
            "to forwarded mail (SRS addresses) will be refused with 553") in report["warnings"]
    (root / "control" / "srssecrets").chmod(0o600)
    (root / "control" / "rcpthosts").write_text("example.org\nsrs.example.net\n")
    assert check_report_of(root)["warnings"] == []
    (root / "control" / "srssecrets").unlink()
    (root / "control" / "srs").write_text("1\n")
    assert check_report_of(root)["warnings"] == [
        "warning: control/srs is 1 but there is no control/srssecrets: forwarded mail keeps "
        "its sender (run 'eqmailctl setup' to make a secret)"]


def check_report_of(root: Path) -> dict[str, object]:
    from eqmail.instance import Instance
    return check_report(Instance(root))


def test_setup_makes_a_private_secret_once_and_never_overwrites_it(tmp_path: Path) -> None:
    report = setup_instance(tmp_path / "i", me="mx.example.org")
    path = tmp_path / "i" / "control" / "srssecrets"
    assert f"wrote {path}" in report
    st_ = path.stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == os.geteuid()
    secret = path.read_text()
    assert secret.endswith("\n") and len(secret.strip()) >= 43  # 256 random bits
    keys = load_controls(tmp_path / "i").srs_keys
    assert keys is not None and keys.secrets == (secret.strip().encode(),)
    again = setup_instance(tmp_path / "i", me="mx.example.org", force=True)
    assert f"kept {path}" in again and path.read_text() == secret
    other = tmp_path / "j"
    setup_instance(other, me="mx.example.org")
    assert (other / "control" / "srssecrets").read_text() != secret


def test_the_listener_gets_the_keys_through_its_configuration_update(tmp_path: Path) -> None:
    c = load_controls(control(tmp_path, srssecrets="pushed-secret-0123456\n"))
    assert c.srs_keys is not None  # computed before pickling: travels too
    (update,) = ConfigReader(b"U").feed(ConfigUpdate(3, c).encode())
    assert isinstance(update, ConfigUpdate)
    back = update.controls
    assert back.srs_keys == c.srs_keys and back.srssecrets == (b"pushed-secret-0123456",)


# ---------------------------------------------------------------- remote delivery's MAIL FROM
FORWARD = Origin.FORWARD


def srs_controls(tmp_path: Path, **files: str) -> Controls:
    return load_controls(control(tmp_path, srssecrets=SECRET.decode() + "\n",
                                 locals="mx.example.org\nexample.org\n",
                                 virtualdomains="virt.example:v\n.hosted.example:h\nalias.example:\n",
                                 **files))


def test_forwarded_mail_gets_an_srs0_sender_at_the_srs_domain(tmp_path: Path) -> None:
    c = srs_controls(tmp_path)
    got = envelope_sender(c, "alice@outside.example", FORWARD, T315)
    assert got.startswith("SRS0=") and got.endswith("=J3=outside.example=alice@mx.example.org")
    assert srs.reverse(got, srs.SrsKeys((SECRET,), "mx.example.org"), T315) == "alice@outside.example"
    first = "SRS0=/Dme=J3=example.org=alice@fwd.example.net"
    assert envelope_sender(c, first, FORWARD, T315).startswith("SRS1=")


def test_what_keeps_its_sender(tmp_path: Path) -> None:
    c = srs_controls(tmp_path)
    for sender in ("", "#@[]", "nodomain", "u@mx.example.org", "u@EXAMPLE.org", "u@virt.example",
                   "u@a.hosted.example"):
        assert envelope_sender(c, sender, FORWARD, T315) == sender, sender
    # an empty prepend is "not virtual": such a domain is not ours
    assert envelope_sender(c, "u@alias.example", FORWARD, T315).startswith("SRS0=")
    # control/srsexclude: a domain, or a leading dot for its subdomains (postsrsd's form)
    (tmp_path / "control" / "srsexclude").write_text("Partner.example\n.customers.example\n")
    c = load_controls(tmp_path)
    for sender in ("u@partner.example", "u@a.customers.example"):
        assert envelope_sender(c, sender, FORWARD, T315) == sender, sender
    for sender in ("u@sub.partner.example", "u@customers.example"):
        assert envelope_sender(c, sender, FORWARD, T315).startswith("SRS0="), sender
    for origin in (None, Origin.NETWORK, Origin.AUTH, Origin.RELAY, Origin.LOCAL, Origin.BOUNCE):
        assert envelope_sender(c, "alice@outside.example", origin, T315) == "alice@outside.example"
    (tmp_path / "control" / "srs").write_text("0\n")
    assert envelope_sender(load_controls(tmp_path), "alice@outside.example", FORWARD, T315) == \
        "alice@outside.example"


# ---------------------------------------------------------------- preprocessing
def test_preprocessing_reverses_srs_recipients_and_bounces_forged_ones(tmp_path: Path) -> None:
    c = srs_controls(tmp_path)
    injected: list[tuple[str, list[str], bytes]] = []

    def inject(sender: str, rcpts: list[str], head: bytes, _msgid: int, _max: int) -> tuple[bool, str]:
        injected.append((sender, rcpts, head))
        return True, "7"

    paths = create_queue(tmp_path / "queue")

    def cleaner(requests: list[CleanRequest]) -> list[CleanAnswer]:
        for r in requests:  # what the queue writer does for qmail-clean's todo/ request
            if r.kind is CleanKind.TODO:
                paths.todo(r.msgid).unlink()
        return [CleanAnswer.DONE] * len(requests)

    m = QueueManager(c, paths, cleaner, inject, clock=lambda: T315 + DAY)
    keys = c.srs_keys
    assert keys is not None
    good = srs.forward("alice@outside.example", keys, T315)
    local_back = srs.forward("joe@example.org", keys, T315)
    forged = "SRS0=AAAA=J3=victim.example=x@mx.example.org"
    expired = srs.forward("old@outside.example", keys, T315 - 30 * DAY)
    paths.mess(51).write_bytes(b"Subject: bounce\n\nbody\n")
    paths.todo(51).write_bytes(
        f"u0\0p1\0F\0T{good}\0T{local_back}\0T{forged}\0T{expired}\0T{good}x@elsewhere.example\0\0".encode())
    assert m.process_todo() == 1
    assert paths.remote(51).read_bytes() == \
        f"Talice@outside.example\0T{good}x@elsewhere.example\0".encode()
    assert paths.local(51).read_bytes() == b"Tjoe@example.org\0"
    assert paths.bounce(51).read_text() == (
        f"<{forged}>:\nSorry, this SRS address has an invalid signature: it was not made here, "
        "or it was altered. (#5.1.1)\n\n"
        f"<{expired}>:\nSorry, this SRS address is more than 21 days old; bounces to it are "
        "no longer accepted. (#5.1.1)\n\n")
    assert injected == []  # the bounce goes out when the message is done

    # a message with only forged recipients is done at once: its bounce goes now
    paths.mess(52).write_bytes(b"Subject: x\n\nbody\n")
    paths.todo(52).write_bytes(f"u0\0p1\0Fsomeone@outside.example\0T{forged}\0\0".encode())
    assert m.process_todo() == 1
    assert [(s, r) for s, r, _ in injected] == [("", ["someone@outside.example"])]
    assert b"invalid signature" in injected[0][2]


def test_without_srs_an_srs_looking_recipient_is_an_ordinary_address(tmp_path: Path) -> None:
    c = load_controls(control(tmp_path))
    paths = create_queue(tmp_path / "queue")
    m = QueueManager(c, paths, lambda reqs: [CleanAnswer.DONE] * len(reqs), lambda *_: (True, "1"))
    paths.mess(53).write_bytes(b"x\n")
    forged = "SRS0=AAAA=J3=victim.example=x@mx.example.org"
    paths.todo(53).write_bytes(f"u0\0p1\0F\0T{forged}\0\0".encode())
    assert m.process_todo() == 1
    assert paths.local(53).read_bytes() == f"T{forged}\0".encode()
    assert not paths.bounce(53).exists()


# ---------------------------------------------------------------- the RCPT check
def session(keys: srs.SrsKeys | None, now: float = T315) -> tuple[Session, list[str], list[str]]:
    cfg = SessionConfig(greeting="mx.example.org", local_host="mx.example.org", databytes=0,
                        rcpthosts=RcptHosts.from_lines(["mx.example.org", "example.org"]),
                        utcoffset=0, check_mailbox=True, srs=keys)
    s = Session(cfg, {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALPORT": "25"}, lambda: now)
    s.start()
    return s, [], []


def say(s: Session, data: bytes, asked: list[str], logs: list[str]) -> list[bytes]:
    out = bytearray()
    pending = s.feed(data)
    while pending:
        action = pending.pop(0)
        if isinstance(action, a.Send):
            out += action.data
        elif isinstance(action, a.Log):
            logs.append(action.line)
        elif isinstance(action, a.CheckMailbox):
            asked.append(action.address)
            pending[:0] = s.mailbox_result(action.address == "joe@example.org")
    return bytes(out).splitlines()


def test_rcpt_takes_a_good_srs_address_and_refuses_forged_expired_and_malformed_ones() -> None:
    keys = srs.SrsKeys((SECRET,), "mx.example.org")
    good = srs.forward("alice@outside.example", keys, T315)
    expired = srs.forward("alice@outside.example", keys, T315 - 22 * DAY)
    s, asked, logs = session(keys)
    got = say(s, (f"MAIL FROM:<>\r\nRCPT TO:<{good}>\r\nRCPT TO:<{good.upper()}>\r\n"
                  "RCPT TO:<SRS0=AAAA=J3=victim.example=x@mx.example.org>\r\n"
                  f"RCPT TO:<{expired}>\r\nRCPT TO:<SRS0=oops@mx.example.org>\r\n"
                  "RCPT TO:<joe@example.org>\r\nRCPT TO:<SRS0=AAAA=J3=v.example=x@example.org>\r\n"
                  ).encode(), asked, logs)
    assert got == [b"250 ok", b"250 ok", b"250 ok",
                   b"550 sorry, that SRS address has an invalid signature (#5.1.1)",
                   b"550 sorry, that SRS address has expired (#5.1.1)",
                   b"550 sorry, that SRS address is malformed (#5.1.1)",
                   b"250 ok",
                   # not at the SRS domain: an ordinary address, which has no mailbox
                   b"550 sorry, no mailbox here by that name (#5.1.1)"]
    assert asked == ["joe@example.org", "SRS0=AAAA=J3=v.example=x@example.org"]
    assert logs[0] == ("qmail-smtpd: SRS recipient refused (SRS address with an invalid signature): "
                       " from 192.0.2.1 to SRS0=AAAA=J3=victim.example=x@mx.example.org helo (null)")
    assert replies.srs_refused(srs.Refusal.NOT_SRS) is replies.SRS_MALFORMED


def test_rcpt_without_srs_treats_srs_addresses_as_any_other() -> None:
    s, asked, logs = session(None)
    got = say(s, b"MAIL FROM:<>\r\nRCPT TO:<SRS0=AAAA=J3=victim.example=x@mx.example.org>\r\n",
              asked, logs)
    assert got[1] == b"550 sorry, no mailbox here by that name (#5.1.1)"
    assert asked == ["SRS0=AAAA=J3=victim.example=x@mx.example.org"]


def test_an_interrupted_preprocessing_does_not_double_the_srs_bounce(tmp_path: Path) -> None:
    # the clean request fails (queue writer restarting): todo/ stays, and so do info/
    # and bounce/ from step 1; the next try starts again from scratch — one note, not two
    c = srs_controls(tmp_path)
    paths = create_queue(tmp_path / "queue")
    answer = [CleanAnswer.REFUSED]

    def cleaner(requests: list[CleanRequest]) -> list[CleanAnswer]:
        return answer * len(requests)

    m = QueueManager(c, paths, cleaner, lambda *_: (True, "1"), clock=lambda: T315)
    forged = "SRS0=AAAA=J3=victim.example=x@mx.example.org"
    paths.mess(61).write_bytes(b"x\n")
    paths.todo(61).write_bytes(f"u0\0p1\0Fs@outside.example\0T{forged}\0Tu@far.example\0\0".encode())
    assert m.process_todo() == 0 and paths.info(61).exists() and paths.bounce(61).exists()
    once = paths.bounce(61).read_text()
    assert once.count(f"<{forged}>:") == 1
    answer[0] = CleanAnswer.DONE
    assert m.process_todo() == 1
    assert paths.bounce(61).read_text() == once
    assert paths.remote(61).read_bytes() == b"Tu@far.example\0"


def test_a_leftover_srs_bounce_goes_when_the_redo_refuses_nothing(tmp_path: Path) -> None:
    # as above, but SRS is turned off (a reload) before the redo: the recipient is an
    # ordinary local address now, and the leftover bounce/ must not go out
    c = srs_controls(tmp_path)
    paths = create_queue(tmp_path / "queue")
    answer = [CleanAnswer.REFUSED]
    m = QueueManager(c, paths, lambda reqs: answer * len(reqs), lambda *_: (True, "1"),
                     clock=lambda: T315)
    forged = "SRS0=AAAA=J3=victim.example=x@mx.example.org"
    paths.mess(62).write_bytes(b"x\n")
    paths.todo(62).write_bytes(f"u0\0p1\0Fs@outside.example\0T{forged}\0\0".encode())
    assert m.process_todo() == 0 and paths.bounce(62).exists()
    (tmp_path / "control" / "srs").write_text("0\n")
    m.configure(load_controls(tmp_path))
    answer[0] = CleanAnswer.DONE
    assert m.process_todo() == 1
    assert not paths.bounce(62).exists()
    assert paths.local(62).read_bytes() == f"T{forged}\0".encode()
