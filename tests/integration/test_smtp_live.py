"""Issue 3 end to end: real SMTP clients (smtplib, swaks, raw sockets) against live
listeners on 127.0.0.1 and ::1, checked by what a user sees — reply lines, the bytes
of the delivered Maildir file, the log, the queue.

One instance serves the module (``mx``).  Its control files say:
- tcp.smtp: 127.0.0.1 may relay (``RELAYCLIENT=""``), 127.0.0.3 is denied, everyone
  else (127.0.0.2, ::1) is an ordinary client;
- timeoutsmtpd 2 (the slow-client tests wait that long, no more);
- virtualdomains ``remote.example:testuser``: mail that *is* relayed to remote.example
  lands in the test Maildir as ``testuser-<address>`` instead of going to the network,
  so relaying can be proven by delivery; rcpthosts (from setup) does not list it.
Listeners: ``smtp`` on both families; ``DATABYTES=1000`` on both; a ``concurrency=20``
one on 127.0.0.1; one with a checkpassword program that records its environment.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import shlex
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import ME, Instance, free_port
from live_smtp import (
    DATE_RE,
    RawClient,
    add_catchall_mailbox,
    install_checkpassword,
    log_size,
    qp_of,
    split_delivery,
    wait_deliveries,
    wait_log,
)

from eqmail.smtp import replies

LOCAL_RCPT = f"testuser@{ME}"
V4, V6 = "127.0.0.1", "::1"


@dataclass
class Mx:
    inst: Instance
    port: int          # smtp, both families
    port_small: int    # DATABYTES=1000, both families
    port_limited: int  # concurrency=20, 127.0.0.1
    port_auth: int     # checkpassword, both families
    cpw_state: Path


@pytest.fixture(scope="module")
def mx() -> Iterator[Mx]:
    ports = [free_port() for _ in range(4)]
    port, small, limited, auth = ports
    inst = Instance.create(listen=None, extra_controls={
        "tcp.smtp": '127.0.0.1:allow,RELAYCLIENT=""\n127.0.0.3:deny\n:allow\n',
        "timeoutsmtpd": "2",
        "virtualdomains": "remote.example:testuser",
        "authlimit": "0 600 0.1",
    })
    add_catchall_mailbox(inst)
    (inst.root / "control" / "servercert.pem").unlink(missing_ok=True)  # TLS: its own issue
    prog, state = install_checkpassword(inst.root, sys.executable)
    cpw = shlex.quote(f"checkpassword={prog} {state}")
    inst.write_control("listen", "\n".join([
        f"smtp {V4}:{port}", f"smtp [{V6}]:{port}",
        f"smtp {V4}:{small} DATABYTES=1000", f"smtp [{V6}]:{small} DATABYTES=1000",
        f"smtp {V4}:{limited} concurrency=20",
        f"smtp {V4}:{auth} {cpw}", f"smtp [{V6}]:{auth} {cpw}",
    ]))
    inst.start()
    try:
        yield Mx(inst, port, small, limited, auth, state)
    finally:
        inst.destroy()


def session(mx: Mx, host: str = V6, source: str | None = None, port: int | None = None) -> RawClient:
    c = RawClient(host, port or mx.port, source=source)
    assert c.line() == replies.greeting(ME).wire()
    return c


def send_marker(mx: Mx, token: str) -> None:
    """Queue one more message and wait for its delivery: anything an earlier, broken
    session had queued would have been committed (and delivered) before it."""
    with smtplib.SMTP(V4, mx.port, local_hostname="marker.example", timeout=10) as s:
        s.sendmail("m@client.example", [LOCAL_RCPT], f"Subject: {token}\r\n\r\nmarker\r\n")
    deadline = time.monotonic() + 20
    while not mailbox_with(mx, token.encode()):
        assert time.monotonic() < deadline, f"marker {token} never delivered"
        time.sleep(0.02)


def mailbox_with(mx: Mx, needle: bytes) -> list[bytes]:
    new = mx.inst.home / "Maildir" / "new"
    return [d for p in new.iterdir() if needle in (d := p.read_bytes())]


def data_session(c: RawClient, rcpt: str = LOCAL_RCPT) -> None:
    for cmd, want in ((b"HELO client.example", b"250 " + ME.encode()),
                      (b"MAIL FROM:<s@client.example>", b"250 ok"),
                      (f"RCPT TO:<{rcpt}>".encode(), b"250 ok"), (b"DATA", b"354 go ahead")):
        c.send(cmd + b"\r\n")
        assert c.line() == want + b"\r\n", cmd


# ---- delivery ------------------------------------------------------------------------

def test_smtplib_delivery_exact_bytes_ipv6(mx: Mx) -> None:
    """qmail's two Received lines (IPv6 remote address), dot-unstuffing, CRLF -> LF."""
    with smtplib.SMTP(V6, mx.port, local_hostname="client.example", timeout=10) as s:
        assert s.ehlo()[0] == 250
        s.mail("sender@client.example")
        s.rcpt(LOCAL_RCPT)
        code, text = s.data(b"Subject: exact\r\n\r\n.leading dot\r\nline\r\n..two dots\r\n")
    assert code == 250
    qp = qp_of(b"250 " + text + b"\r\n")
    assert qp is not None, text
    (data,) = wait_deliveries(mx.inst, qp)
    want = (b"Return-Path: <sender@client.example>\nDelivered-To: " + LOCAL_RCPT.encode() + b"\n"
            + b"Received: \\(qmail " + str(qp).encode() + b" invoked from network\\); " + DATE_RE + b"\n"
            + re.escape(b"Received: from unknown (HELO client.example) (::1)\n  by " + ME.encode()
                        + b" with SMTP; ") + DATE_RE + b"\n"
            + re.escape(b"Subject: exact\n\n.leading dot\nline\n..two dots\n") + b"\\Z")
    assert re.match(want, data), data


@pytest.mark.parametrize("host", [V4, V6])
def test_swaks_pipelined_delivery(mx: Mx, host: str) -> None:
    proc = subprocess.run(
        ["swaks", "--server", host, "--port", str(mx.port), "--pipeline",
         "--helo", "swaks.example", "--from", "s@client.example", "--to", LOCAL_RCPT,
         "--header", f"Subject: swaks {host}", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"<[-*]+\s+250 ok \d+ qp (\d+)", proc.stdout)
    assert m, proc.stdout
    (data,) = wait_deliveries(mx.inst, int(m.group(1)))
    _rp, _dt, _qq, header, body = split_delivery(data)
    assert header.startswith(f"Received: from unknown (HELO swaks.example) ({host})\n".encode())
    assert f"Subject: swaks {host}\n".encode() in body and b"\nhello from swaks\n" in body


# ---- relaying --------------------------------------------------------------------------

@pytest.mark.parametrize("host,source", [(V4, "127.0.0.2"), (V6, None)])
def test_relay_refused_without_relayclient(mx: Mx, host: str, source: str | None) -> None:
    with smtplib.SMTP(host, mx.port, timeout=10, source_address=(source, 0) if source else None) as s:
        s.mail("s@client.example")
        assert s.rcpt("victim@remote.example") == (553, replies.NO_RCPTHOSTS.text.encode())
        assert s.rcpt(LOCAL_RCPT) == (250, b"ok")


def test_relay_allowed_by_tcp_smtp(mx: Mx) -> None:
    """127.0.0.1 has RELAYCLIENT="" from tcp.smtp: the foreign recipient is accepted and
    the message really goes out (to the virtualdomains stand-in for the network)."""
    with smtplib.SMTP(V4, mx.port, timeout=10) as s:
        s.mail("s@client.example")
        assert s.rcpt("friend@remote.example") == (250, b"ok")
        code, text = s.data(b"Subject: relayed\r\n\r\nout\r\n")
    assert code == 250
    (data,) = wait_deliveries(mx.inst, qp_of(b"250 " + text + b"\r\n") or 0)
    assert b"\nDelivered-To: testuser-friend@remote.example\n" in data


RELAY_REFUSED = [
    "victim@remote.example", "@mx.test.example:victim@remote.example",
    "@a.example,@mx.test.example:victim@remote.example", f"victim%{ME}@remote.example",
    f"victim@{ME}@remote.example", f'"victim@{ME}"@remote.example', f"victim\\@{ME}@remote.example",
    "victim@[::1]", "victim@[192.0.2.99]", f"{ME}!victim@remote.example", "victim@remote.example.",
]
# The last domain is ours: local, never relayed -- refused at RCPT when no local mailbox
# takes the local part (control/rcptchecklocal, issue 12), accepted and delivered when one does.
RELAY_LOCAL = [
    f"victim%remote.example@{ME}", f"victim@remote.example@{ME}", f'"victim@remote.example"@{ME}',
    f"remote.example!victim@{ME}", "remote.example!victim",
    # localiphost defaults to me (qmail's control_rldef): our own literal is local
    "victim@[127.0.0.1]",
]
RELAY_LOCAL_DELIVERED = [f"@remote.example:testuser@{ME}", "testuser@[127.0.0.1]"]


@pytest.mark.parametrize("host,source", [(V4, "127.0.0.2"), (V6, None)])
def test_relay_battery(mx: Mx, host: str, source: str | None) -> None:
    start = log_size(mx.inst)
    c = session(mx, host, source)
    assert c.command("MAIL FROM:<>") == (250, ["ok"])
    for rcpt in RELAY_REFUSED:
        assert c.command(f"RCPT TO:<{rcpt}>") == (553, [replies.NO_RCPTHOSTS.text]), rcpt
    for rcpt in RELAY_LOCAL:
        assert c.command(f"RCPT TO:<{rcpt}>") == (550, [replies.NO_MAILBOX.text]), rcpt
    for rcpt in RELAY_LOCAL_DELIVERED:
        assert c.command(f"RCPT TO:<{rcpt}>") == (250, ["ok"]), rcpt
    assert c.command("DATA")[0] == 354
    code, text = c.command(b"Subject: battery\r\n\r\nx\r\n.")
    assert code == 250, text
    c.command("QUIT")
    c.close()
    mx.inst.wait_queue_empty()
    log = wait_log(mx.inst, "end msg", start)
    assert " to remote " not in log, log


# ---- replies and protocol edges ------------------------------------------------------

def test_reply_texts(mx: Mx) -> None:
    c = session(mx)
    expect = [
        (b"HELO client.example", replies.helo(ME)),
        (b"EHLO client.example", replies.ehlo(ME, ["PIPELINING", "8BITMIME", "CHUNKING", "SIZE 52428800"])),
        (b"NOOP", replies.OK), (b"VRFY postmaster", replies.VRFY), (b"HELP", replies.HELP),
        (b"RSET", replies.FLUSHED), (b"EXPN x", replies.UNRECOGNISED),
        (b"RCPT TO:<x@y>", replies.MAIL_FIRST), (b"DATA", replies.MAIL_FIRST),
        (b"MAIL FROM:<" + b"a" * 885 + b"@client.example>", replies.SYNTAX_ERROR), (b"MAIL FROM:<a@client.example>", replies.OK),
        (b"DATA", replies.RCPT_FIRST), (b"MAIL FROM:<a@client.example> SIZE=52428801", replies.TOO_BIG),
        (b"AUTH LOGIN", replies.AUTH_NOT_AVAILABLE), (b"STARTTLS", replies.TLS_NO_CERT),
        (b"QUIT", replies.quit_(ME)),
    ]
    for cmd, reply in expect:
        c.send(cmd + b"\r\n")
        got = b"".join(c.line() for _ in reply.wire().splitlines())
        assert got == reply.wire(), cmd
    assert c.read_to_eof() == b""


SMUGGLE = {
    "lf-dot-lf": b"\n.\n", "cr-dot-cr": b"\r.\r", "crlf-dot-lf": b"\r\n.\n", "lf-dot-crlf": b"\n.\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLE))
def test_smuggling(mx: Mx, name: str) -> None:
    token = f"smuggle-{name}"
    c = session(mx, V4, "127.0.0.2")
    data_session(c)
    c.send(b"Subject: " + token.encode() + b"\r\n\r\nbody" + SMUGGLE[name]
           + b"MAIL FROM:<evil@evil.example>\r\nRCPT TO:<" + LOCAL_RCPT.encode() + b">\r\nDATA\r\n"
           + b"Subject: " + token.encode() + b"-evil\r\n\r\nevil\r\n.\r\nQUIT\r\n")
    if name == "cr-dot-cr":  # a bare CR is data: one message, the commands in its body
        qp = qp_of(c.line())
        assert qp is not None
        assert c.line() == replies.quit_(ME).wire()
        assert c.read_to_eof() == b""
        (data,) = wait_deliveries(mx.inst, qp)
        assert data.endswith(b"\nbody\r.\rMAIL FROM:<evil@evil.example>\nRCPT TO:<" + LOCAL_RCPT.encode()
                             + b">\nDATA\nSubject: " + token.encode() + b"-evil\n\nevil\n")
    else:  # a bare LF: 451, the session ends, nothing queued
        assert c.line() == replies.BARE_LF.wire()
        assert c.read_to_eof() == b""
    c.close()
    send_marker(mx, f"checkpoint-{list(SMUGGLE).index(name)}")
    assert len(mailbox_with(mx, token.encode())) == (1 if name == "cr-dot-cr" else 0)


def test_bare_lf_in_header(mx: Mx) -> None:
    c = session(mx)
    data_session(c)
    c.send(b"Subject: bare-lf-header\nX: y\r\n\r\nbody\r\n.\r\n")
    assert c.line() == replies.BARE_LF.wire()
    assert c.read_to_eof() == b""
    send_marker(mx, "checkpoint-header")
    assert not mailbox_with(mx, b"bare-lf-header")


@pytest.mark.parametrize("host", [V4, V6])
def test_databytes_and_size(mx: Mx, host: str) -> None:
    c = session(mx, host, port=mx.port_small)
    assert c.command("EHLO client.example") == (250, [ME, "PIPELINING", "8BITMIME", "CHUNKING", "SIZE 1000"])
    assert c.command("MAIL FROM:<a@client.example> SIZE=1001") == (552, [replies.TOO_BIG.text])
    assert c.command("MAIL FROM:<a@client.example> SIZE=1000") == (250, ["ok"])
    assert c.command(f"RCPT TO:<{LOCAL_RCPT}>") == (250, ["ok"])
    assert c.command("DATA") == (354, ["go ahead"])
    c.send(b"Subject: too-big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 64)
    with pytest.raises(AssertionError):  # qmail reads the whole message before the 552
        c.line(timeout=0.3)
    assert c.command(b".") == (552, [replies.TOO_BIG.text])
    assert c.command("NOOP") == (250, ["ok"])
    c.command("QUIT")
    c.close()


def test_hop_count(mx: Mx) -> None:
    c = session(mx)
    for hops, want in ((100, replies.TOO_MANY_HOPS.wire()), (99, None)):
        c.send(f"MAIL FROM:<a@client.example>\r\nRCPT TO:<{LOCAL_RCPT}>\r\nDATA\r\n".encode())
        assert [c.line(), c.line(), c.line()] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
        c.send(b"".join(b"Received: from hop%d\r\n" % i for i in range(hops)) + b"\r\nbody\r\n.\r\n")
        got = c.line()
        if want is not None:
            assert got == want
        else:
            qp = qp_of(got)
            assert qp is not None, got
            (data,) = wait_deliveries(mx.inst, qp)
            assert data.count(b"\nReceived: from hop") == 99
    c.command("QUIT")
    c.close()


def test_pipelining_in_one_write(mx: Mx) -> None:
    c = RawClient(V6, mx.port)
    c.send(b"EHLO client.example\r\nMAIL FROM:<p@client.example>\r\n"
           + f"RCPT TO:<{LOCAL_RCPT}>\r\nRCPT TO:<x@remote.example>\r\n".encode()
           + f"RCPT TO:<testuser+pipe@{ME}>\r\nDATA\r\nSubject: piped\r\n\r\nall at once\r\n.\r\nQUIT\r\n".encode())
    assert c.line() == replies.greeting(ME).wire()
    assert c.reply() == (250, [ME, "PIPELINING", "8BITMIME", "CHUNKING", "SIZE 52428800"])
    assert [c.reply() for _ in range(5)] == [
        (250, ["ok"]), (250, ["ok"]), (553, [replies.NO_RCPTHOSTS.text]), (250, ["ok"]), (354, ["go ahead"])]
    qp = qp_of(c.line())
    assert qp is not None
    assert c.line() == replies.quit_(ME).wire()
    c.close()
    got = sorted(split_delivery(d)[1] for d in wait_deliveries(mx.inst, qp, 2))
    assert got == [f"testuser+pipe@{ME}".encode(), LOCAL_RCPT.encode()]


def test_overlong_command_lines(mx: Mx) -> None:
    c = session(mx)
    assert c.command(b"NOOP " + b"x" * (12288 - 5)) == (250, ["ok"])
    assert c.command(b"NOOP " + b"x" * (12288 - 4)) == (500, [replies.LINE_TOO_LONG.text])
    assert c.command(b"NOOP " + b"y" * (1 << 20)) == (500, [replies.LINE_TOO_LONG.text])
    assert c.command("NOOP") == (250, ["ok"])
    c.command("QUIT")
    c.close()


def test_8bit_and_nul_pass_through(mx: Mx) -> None:
    body = (b"Subject: eight-bit\r\n\r\nhigh: " + bytes(range(0x80, 0x100)) + b"\r\n"
            + b"nul:\x00\x00end \x01\x7f\r\nbare\rcr\r\n")
    c = session(mx)
    data_session(c)
    c.send(body + b".\r\n")
    qp = qp_of(c.line())
    assert qp is not None
    c.command("QUIT")
    c.close()
    (data,) = wait_deliveries(mx.inst, qp)
    assert split_delivery(data)[4] == body.replace(b"\r\n", b"\n")


def test_disconnect_mid_data_queues_nothing(mx: Mx) -> None:
    start = log_size(mx.inst)
    c = session(mx, V4, "127.0.0.2")
    data_session(c)
    c.send(b"Subject: vanished\r\n\r\npartial line without end")
    c.close()
    wait_log(mx.inst, "qmail-smtpd: read failed: s@client.example from 127.0.0.2", start)
    send_marker(mx, "checkpoint-disconnect")
    assert not mailbox_with(mx, b"vanished\n")
    mx.inst.wait_queue_empty()


# ---- tcpserver's part ---------------------------------------------------------------

def test_tcp_smtp_deny_closes_without_banner(mx: Mx) -> None:
    c = RawClient(V4, mx.port, source="127.0.0.3")
    assert c.read_to_eof(timeout=5) == b""
    c.close()


def test_slow_clients_time_out(mx: Mx) -> None:
    """timeoutsmtpd=2: an idle client and one stalled in DATA both get 451 timeout."""
    idle = session(mx)
    stalled = session(mx, V4, "127.0.0.2")
    data_session(stalled)
    stalled.send(b"Subject: stalled\r\n\r\nand then nothing")
    began = time.monotonic()
    for c in (idle, stalled):
        assert c.line(timeout=10) == replies.TIMEOUT.wire()
        assert c.read_to_eof() == b""
        c.close()
    assert time.monotonic() - began >= 1.5
    send_marker(mx, "checkpoint-timeout")
    assert not mailbox_with(mx, b"Subject: stalled")


@pytest.mark.parametrize("host", [V4, V6])
def test_checkpassword_sees_tcp_environment(mx: Mx, host: str) -> None:
    c = session(mx, host, port=mx.port_auth)
    assert c.command("AUTH PLAIN AGpvZQBzZWNyZXQ=") == (235, ["ok, joe, go ahead (#2.0.0)"])
    c.command("QUIT")
    c.close()
    (call,) = [json.loads(x) for x in (mx.cpw_state / f"{c.local_port}.calls").read_text().splitlines()]
    env = call["env"]
    assert (call["user"], call["password"]) == ("joe", "secret")
    assert env["PROTO"] == ("TCP6" if host == V6 else "TCP")
    assert (env["TCPREMOTEIP"], env["TCPLOCALIP"]) == (host, host)
    assert (env["TCPREMOTEPORT"], env["TCPLOCALPORT"]) == (str(c.local_port), str(mx.port_auth))
    assert env["TCPLOCALHOST"] == ME
    assert env["TCP6REMOTEIP"] == ("::1" if host == V6 else "::ffff:127.0.0.1")
    # tcp.smtp gives 127.0.0.1 RELAYCLIENT=""; ::1 falls through to ":allow"
    assert ("RELAYCLIENT" in env) == (host == V4)


def test_concurrency_limit_answers_421_at_once(mx: Mx) -> None:
    """concurrency=20: the 21st..25th connections are answered ``421 ... too many
    connections`` and closed at once (eqmail; tcpserver -c left them unanswered in the
    kernel's queue); a slot freed by a QUIT serves the next connection."""
    clients = [RawClient(V4, mx.port_limited) for _ in range(25)]
    full = replies.too_many_connections(ME).wire()
    try:
        firsts = [c.line(timeout=5) for c in clients]
        assert firsts.count(replies.greeting(ME).wire()) == 20
        assert firsts.count(full) == 5
        refused = [c for c, first in zip(clients, firsts, strict=True) if first == full]
        assert all(c.read_to_eof(timeout=5) == b"" for c in refused)
        greeted = [c for c in clients if c not in refused]
        assert greeted[0].command("QUIT")[0] == 221
        greeted[0].read_to_eof(timeout=5)
        deadline = time.monotonic() + 10
        while True:  # the QUIT's slot is free once that session has ended
            late = RawClient(V4, mx.port_limited)
            first = late.line(timeout=5)
            if first == replies.greeting(ME).wire():
                break
            assert first == full and time.monotonic() < deadline
            late.close()
            time.sleep(0.05)
        assert late.command("NOOP") == (250, ["ok"])
        late.close()
    finally:
        for c in clients:
            c.close()


def _has_data(c: RawClient, timeout: float) -> bool:
    return bool(c.buf) or bool(select.select([c.sock], [], [], timeout)[0])


def test_500_concurrent_connections(mx: Mx) -> None:
    """500 clients at once on the concurrency=20 listener: those over the limit get 421
    at once and try again, as an MTA does; every one is served in the end and queues its
    message; the supervisor and the listener stay up."""
    before = _listener_pids(mx)
    results = asyncio.run(_many(mx.port_limited, 500))
    failures = [r for r in results if not r.startswith("250 ok")]
    assert not failures, failures[:5]
    assert len(set(results)) == 500  # 500 distinct qp numbers
    assert _refusals, "nobody was over the limit?"
    assert _listener_pids(mx) == before
    assert "Traceback" not in mx.inst.log() and "warning: smtp session" not in mx.inst.log()


_refusals: list[bytes] = []


async def _many(port: int, n: int) -> list[str]:
    full = replies.too_many_connections(ME).wire()

    async def one(i: int) -> str:
        while True:
            try:
                reader, writer = await asyncio.open_connection(V4, port)
            except OSError as e:
                return f"connect: {e!r}"
            first = await reader.readline()
            if first != full:
                break
            _refusals.append(first)  # 421: try again a moment later
            assert await reader.read() == b""
            writer.close()
            await asyncio.sleep(0.05 + (i % 10) / 20)
        try:
            lines = [first]
            writer.write(f"HELO c{i}\r\nMAIL FROM:<c{i}@client.example>\r\nRCPT TO:<{LOCAL_RCPT}>\r\n"
                         f"DATA\r\nSubject: crowd {i}\r\n\r\nbody\r\n.\r\nQUIT\r\n".encode())
            await writer.drain()
            lines += [await reader.readline() for _ in range(6)]
            text = [x.decode().rstrip() for x in lines]
            ok = text[0].startswith("220 ") and text[1:5] == [f"250 {ME}", "250 ok", "250 ok", "354 go ahead"]
            return text[5] if ok and text[6].startswith("221 ") else f"bad: {text}"
        finally:
            writer.close()

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 90)


def _listener_pids(mx: Mx) -> list[tuple[str, int]]:
    status = json.loads(mx.inst.ctl("status", "--json").stdout)
    assert status["running"]
    return sorted((w["title"], w["pid"]) for w in status["workers"] if w["kind"] == "listener")

