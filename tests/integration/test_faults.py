"""Faults outside eqmail (issue 8, part 2): a DNS server that never answers or answers
garbage, a remote MTA that hangs, drops the connection in the middle of DATA or after
the final dot, or answers multi-line garbage, and a full queue filesystem under SMTP.

Every test runs a real instance (tests/harness.py) whose remote deliveries go, through
control/smtproutes, to scripted receivers on loopback (tests/smtpsink.py) and whose
resolver is tests/dnsserver.py (control/dnsservers).  What is checked is what an admin
and a user see: qmail's deferral texts in the log (``delivery N: deferral: ...``), the
message arriving at the receiver once it behaves, bounces in the sender's Maildir, SMTP
reply codes, and that the remote delivery worker survived (same pid, no ``alert:``).
Duplicates are accepted only where qmail's design makes them (the connection died after
the final dot: "Possible duplicate!").
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dnsserver import Behaviour, DnsServer
from harness import IS_ROOT, ME, Instance, free_port, poll, queue_files, worker_pids
from smtpsink import Script, SmtpSink

from eqmail.queue.client import submit

pytestmark = pytest.mark.timeout(120)

SENDER = f"testuser@{ME}"
DIED = "Connected to 127.0.0.1 but connection died. (#4.4.2)/"
DIED_DUP = "Connected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)/"
TEMP_DNS = "Sorry, I couldn't find any host by that name. (#4.1.2)/"
DELIVERY = re.compile(r"delivery (\d+): (success|deferral|failure): (.*)$", re.M)
STARTING = re.compile(r"starting delivery (\d+): msg \d+ to remote (\S+)$", re.M)


# ------------------------------------------------------------------ helpers


def results(inst: Instance) -> dict[str, list[tuple[str, str]]]:
    """recipient -> [(result, text)] in log order, from the scanner's log lines."""
    log = inst.log()
    rcpt_of = {m.group(1): m.group(2) for m in STARTING.finditer(log)}
    out: dict[str, list[tuple[str, str]]] = {}
    for m in DELIVERY.finditer(log):
        out.setdefault(rcpt_of.get(m.group(1), "?"), []).append((m.group(2), m.group(3)))
    return out


def wait_result(inst: Instance, rcpt: str, n: int = 1, timeout: float = 30) -> list[tuple[str, str]]:
    """The first ``n`` delivery results of ``rcpt`` (polls the log)."""
    got = poll(lambda: len(results(inst).get(rcpt, [])) >= n and results(inst)[rcpt], timeout,
               f"{n} delivery result(s) for {rcpt}", inst)
    assert isinstance(got, list)
    return got


def send(inst: Instance, rcpt: str, tag: str) -> None:
    res = submit(inst.root, SENDER, [rcpt], f"Subject: fault {tag}\n\nbody {tag}\n".encode())
    assert res.ok, res


def copies(sink: SmtpSink, tag: str) -> tuple[int, int]:
    """(answered, unanswered) copies of message ``tag`` the sink received whole."""
    needle = f"body {tag}\r\n".encode()
    return (sum(needle in t.data for t in sink.transactions),
            sum(needle in t.data for t in sink.unanswered))


def remote_worker(inst: Instance) -> int:
    pids = worker_pids(inst, "eqmail: remote delivery")
    assert len(pids) == 1, pids
    return pids[0]


def assert_worker_survived(inst: Instance, pid: int) -> None:
    assert remote_worker(inst) == pid, "the remote delivery worker was restarted"
    assert "alert:" not in inst.log(), inst.log()[-4000:]


@dataclass
class Sinks:
    """Scripted receivers, one per recipient domain ``<name>.test``."""

    by_name: dict[str, SmtpSink]

    def routes(self) -> str:
        return "".join(f"{name}.test:[127.0.0.1]:{s.sockets[0].getsockname()[1]}\n"
                       for name, s in self.by_name.items())

    def __getitem__(self, name: str) -> SmtpSink:
        return self.by_name[name]

    def stop(self) -> None:
        for s in self.by_name.values():
            s.stop()


def make_sinks(scripts: dict[str, Script]) -> Sinks:
    sinks = {}
    for name, script in scripts.items():
        sink = SmtpSink(script)
        sink.listen("127.0.0.1")
        sinks[name] = sink
    return Sinks(sinks)


def sender_instance(routes: str, dns_port: int | None = None, timeoutremote: int = 3) -> Instance:
    controls = {"smtproutes": routes, "timeoutremote": str(timeoutremote), "timeoutconnect": "2"}
    if dns_port is not None:
        controls["dnsservers"] = f"127.0.0.1:{dns_port}\n"
    inst = Instance.create(extra_controls=controls)
    inst.start()
    return inst


# ------------------------------------------------------------------ DNS


@pytest.fixture
def dns_setup() -> Iterator[tuple[Instance, DnsServer, Sinks]]:
    sinks = make_sinks({"good": Script()})
    port = sinks["good"].sockets[0].getsockname()[1]
    dns = DnsServer({"relay.dns.test": {"A": ["127.0.0.1"]}})
    dns_port = dns.start()
    # dns.test goes through a relay *name*: every delivery there needs the resolver.
    inst = sender_instance(sinks.routes() + f"dns.test:relay.dns.test:{port}\n", dns_port)
    try:
        yield inst, dns, sinks
    finally:
        inst.destroy()
        dns.stop()
        sinks.stop()


def test_dns_that_never_answers_or_answers_garbage_defers_and_the_worker_keeps_serving(
        dns_setup: tuple[Instance, DnsServer, Sinks]) -> None:
    inst, dns, sinks = dns_setup
    worker = remote_worker(inst)
    dns.behaviour = Behaviour.SILENT
    send(inst, "joe@dns.test", "viadns")
    send(inst, "ann@good.test", "beside")  # needs no DNS: delivered meanwhile
    poll(lambda: copies(sinks["good"], "beside") == (1, 0), 20, "the message that needs no DNS", inst)
    assert wait_result(inst, "joe@dns.test") == [("deferral", TEMP_DNS)]
    assert ("relay.dns.test", "AAAA") in dns.queries or ("relay.dns.test", "A") in dns.queries

    dns.behaviour = Behaviour.GARBAGE
    inst.ctl("queue", "flush")
    assert wait_result(inst, "joe@dns.test", 2)[1] == ("deferral", TEMP_DNS)
    assert dns.garbage_sent > 0
    assert copies(sinks["good"], "viadns") == (0, 0)

    dns.behaviour = Behaviour.NORMAL
    inst.ctl("queue", "flush")
    assert wait_result(inst, "joe@dns.test", 3)[2][0] == "success"
    assert copies(sinks["good"], "viadns") == (1, 0)
    inst.wait_queue_empty()
    assert_worker_survived(inst, worker)
    assert inst.maildir_files() == []  # nothing bounced


# ------------------------------------------------------------------ a remote MTA that hangs


def test_remote_that_hangs_times_out_is_retried_and_delivered() -> None:
    sinks = make_sinks({"banner": Script(hang_at="banner"), "mail": Script(hang_at="mail"),
                        "final": Script(hang_at="final"), "good": Script()})
    inst = sender_instance(sinks.routes(), timeoutremote=3)
    try:
        worker = remote_worker(inst)
        for name in ("banner", "mail", "final"):
            send(inst, f"joe@{name}.test", name)
        send(inst, "ann@good.test", "beside")
        # the hanging receivers do not hold up the others
        poll(lambda: copies(sinks["good"], "beside") == (1, 0), 10, "delivery beside the hangs", inst)
        assert "deferral" not in inst.log()
        assert wait_result(inst, "joe@banner.test") == [("deferral", DIED)]
        assert wait_result(inst, "joe@mail.test") == [("deferral", DIED)]
        # the final dot went out, the answer never came: qmail's possible duplicate
        assert wait_result(inst, "joe@final.test") == [("deferral", DIED_DUP)]
        for name in ("banner", "mail", "final"):
            sinks[name].script = Script()
        inst.ctl("queue", "flush")
        for name in ("banner", "mail", "final"):
            poll(lambda n=name: copies(sinks[n], n) == (1, 0), 20, f"{name} delivered on retry", inst)
        inst.wait_queue_empty()
        assert_worker_survived(inst, worker)
        assert inst.maildir_files() == []
    finally:
        inst.destroy()
        sinks.stop()


# ------------------------------------------------------------------ dropped connections


def test_drop_mid_data_is_retried_without_a_duplicate_and_drop_after_dot_may_duplicate() -> None:
    sinks = make_sinks({"mid": Script(drop_in_data=True), "dot": Script(drop_after_dot=True)})
    inst = sender_instance(sinks.routes())
    try:
        worker = remote_worker(inst)
        # 6 MB: more than the socket buffers take while the receiver reads nothing, so
        # the connection dies (for the sender too) before the final dot is written.  A
        # small message would be all in the kernel when the drop is noticed, and qmail
        # then says "Possible duplicate!" (it cannot know): the same text as below.
        big = "".join(f"line {i:06d} of a message long enough to be sent in pieces\n" for i in range(100_000))
        res = submit(inst.root, SENDER, ["joe@mid.test"], f"Subject: fault mid\n\nbody mid\n{big}".encode())
        assert res.ok
        send(inst, "joe@dot.test", "dot")
        assert wait_result(inst, "joe@mid.test") == [("deferral", DIED)]
        assert wait_result(inst, "joe@dot.test") == [("deferral", DIED_DUP)]
        assert copies(sinks["mid"], "mid") == (0, 0)  # it never got the whole message
        assert copies(sinks["dot"], "dot") == (0, 1)  # it got it whole, and never said so
        for name in ("mid", "dot"):
            sinks[name].script = Script()
        inst.ctl("queue", "flush")
        poll(lambda: copies(sinks["mid"], "mid") == (1, 0), 20, "mid delivered once", inst)
        poll(lambda: copies(sinks["dot"], "dot") == (1, 1), 20, "dot delivered again", inst)
        inst.wait_queue_empty()
        # exactly one complete copy where the drop came before the dot
        got = next(t.data for t in sinks["mid"].transactions if b"body mid\r\n" in t.data)
        assert got.endswith(b"line 099999 of a message long enough to be sent in pieces\r\n")
        assert_worker_survived(inst, worker)
    finally:
        inst.destroy()
        sinks.stop()


# ------------------------------------------------------------------ garbage replies

GARBAGE = {  # name: (raw replies, "D" or the reason of the protocol-violation deferral)
    # a multi-line greeting with a line that is not SMTP at all
    "greet": ({"banner": b"220-sink.test hello\r\nthis is not smtp\r\n220 ok\r\n"}, "malformed reply"),
    # control bytes and a bare LF inside the EHLO answer
    "ehlo": ({"ehlo": b"250-sink.test\r\n250-PIPE\x00LINING\n\xff\xfe\r\n250 SIZE 1\r\n"},
             "malformed reply"),
    # an endless multi-line reply
    "flood": ({"mail": b"".join(b"250-%d more\r\n" % i for i in range(2000)) + b"250 ok\r\n"},
              "reply too long"),
    # a greeting line that never ends (40 kB and no line end, then silence)
    "long": ({"banner": b"220 " + b"x" * 40_000}, "reply line too long"),
    # a permanent refusal with garbage in its text: bounced, the text made printable
    "refuse": ({"rcpt": b"550-5.1.1 no such user\r\n550-\x00\x01\x7f ctl \xff\r\n550 5.1.1 bye\r\n"}, "D"),
    # garbage after the final dot: the message may have been taken
    "final": ({"final": b"250-taken, I think\r\n\r\n"}, "malformed reply, dup"),
}


def broke(reason: str) -> str:
    """The deferral for a server that broke the protocol (eqmail.smtp.client)."""
    why, _, dup = reason.partition(", ")
    return (f"Connected to 127.0.0.1 but the server broke the SMTP protocol ({why}). "
            f"{'Possible duplicate! ' if dup else ''}(#4.5.0)/")


def test_multiline_garbage_replies_defer_or_bounce_sensibly() -> None:
    sinks = make_sinks({name: Script(raw=raw) for name, (raw, _) in GARBAGE.items()})
    inst = sender_instance(sinks.routes())
    try:
        worker = remote_worker(inst)
        for name in GARBAGE:
            send(inst, f"joe@{name}.test", name)
        for name, (_, kind) in GARBAGE.items():
            result, text = wait_result(inst, f"joe@{name}.test")[0]
            if kind == "D":
                assert result == "failure", (name, text)
                assert text.startswith("127.0.0.1 does not like recipient./Remote host said: 550-5.1.1")
                assert "\x00" not in text and "\x01" not in text
            else:
                assert (result, text) == ("deferral", broke(kind)), name
        bounce = inst.wait_for_mail(1)[0].read_bytes()
        assert b"<joe@refuse.test>:\n127.0.0.1 does not like recipient.\n" in bounce
        assert b"550 5.1.1 bye\n" in bounce and b"\x00" not in bounce
        for sink in sinks.by_name.values():
            sink.script = Script()
        inst.ctl("queue", "flush")
        for name, (_, kind) in GARBAGE.items():
            if kind != "D":
                want = (1, 1) if kind.endswith("dup") else (1, 0)
                poll(lambda n=name, w=want: copies(sinks[n], n) == w, 20, f"{name} on retry", inst)
        inst.wait_queue_empty()
        assert copies(sinks["refuse"], "refuse") == (0, 0)
        assert len(inst.maildir_files()) == 1  # the one bounce, nothing else
        assert_worker_survived(inst, worker)
    finally:
        inst.destroy()
        sinks.stop()


# ------------------------------------------------------------------ SMTP and a full disk


@pytest.fixture
def smtp_small_queue() -> Iterator[tuple[Instance, int]]:
    """An instance with an SMTP listener whose queue/ is a 2 MB tmpfs."""
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\n")
    queue = inst.root / "queue"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0750", "eqmail-test", str(queue)],
                   check=True)
    try:
        inst.ctl("setup", "--me", ME)  # builds the queue tree on the new filesystem
        yield inst, port
    finally:
        inst.stop()
        inst.kill_all()
        subprocess.run(["umount", "-l", str(queue)], check=False)
        inst.destroy()


def smtp_send(port: int, rcpt: str, msg: bytes) -> tuple[int, bytes]:
    """One SMTP transaction; the reply to the end of DATA (or to what refused it)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.mail(SENDER)
        if code != 250:
            return code, text
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text
        return s.data(msg)


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a tmpfs")
def test_smtp_answers_451_when_the_queue_is_full_and_resumes(
        smtp_small_queue: tuple[Instance, int]) -> None:
    inst, port = smtp_small_queue
    hold = inst.home / ".qmail-hold"
    hold.write_text("|exit 111\n")  # keep the messages in the queue
    os.chown(hold, inst.uid, inst.gid)
    inst.start()
    body = b"".join(b"%07d " % i + b"z" * 91 + b"\r\n" for i in range(1000))  # ~100 KB
    acked: list[str] = []
    refusal: tuple[int, bytes] | None = None
    for n in range(60):
        tag = uuid.uuid4().hex
        reply = smtp_send(port, f"testuser+hold@{ME}", f"Subject: fill {n} {tag}\r\n\r\n".encode()
                          + body + f"END {tag}\r\n".encode())
        if reply[0] != 250:
            refusal = reply
            break
        acked.append(tag)
    assert refusal is not None, "the 2 MB queue never filled up"
    assert refusal == (451, b"qq write error or disk full (#4.3.0)"), refusal
    assert 5 <= len(acked) < 20
    # the refused message left nothing behind: no pid/ file, no mess without todo/info
    files = queue_files(inst)
    assert not [f for f in files if f.startswith("pid/")], files
    mess = {f.rsplit("/", 1)[1] for f in files if f.startswith("mess/")}
    assert mess <= {f.rsplit("/", 1)[1] for f in files if f.startswith(("info/", "todo/"))}
    # the listener is still there and still says 451 while the disk is full
    assert smtp_send(port, f"testuser+hold@{ME}", b"Subject: more\r\n\r\n" + body)[0] == 451
    # space comes back: everything acknowledged is delivered whole ...
    hold.write_text("./Maildir/\n")
    files_ = inst.flush_until_mail(len(acked))
    inst.wait_queue_empty(timeout=60)
    got = {}
    for f in files_:
        data = f.read_bytes()
        m = re.search(rb"Subject: fill \d+ (\w+)\n", data)
        assert m, data[:300]
        assert data.endswith(body.replace(b"\r\n", b"\n") + b"END " + m.group(1) + b"\n"), f
        got[m.group(1).decode()] = f
    assert set(got) == set(acked)
    # ... and SMTP accepts again
    tag = uuid.uuid4().hex
    assert smtp_send(port, f"testuser@{ME}", f"Subject: after {tag}\r\n\r\nback\r\n".encode())[0] == 250
    poll(lambda: any(tag.encode() in f.read_bytes() for f in inst.maildir_files()), 20, "mail after", inst)
    inst.wait_queue_empty()
    assert queue_files(inst) == []
