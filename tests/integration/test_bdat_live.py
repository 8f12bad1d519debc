"""CHUNKING (RFC 3030, issue 18) end to end: BDAT over real sockets against a live
listener, checked by what a user sees — reply lines, the delivered Maildir bytes, the
log, and that refused or broken transactions queue nothing.

smtplib and swaks have no BDAT (``swaks --help`` lists none), so the client is a raw
socket; smtplib shows the EHLO keyword.  One instance serves the module: ``smtp`` on
127.0.0.1 and ::1, one listener with ``DATABYTES=1000``, timeoutsmtpd 2.
"""

from __future__ import annotations

import io
import re
import smtplib
import socket
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
    log_size,
    qp_of,
    split_delivery,
    wait_deliveries,
    wait_log,
)

from eqmail.ipc.delivery import Verdict
from eqmail.smtp import replies
from eqmail.smtp.client import Destination, SmtpSession
from eqmail.smtp.transport import TlsConfig, Transport

LOCAL_RCPT = f"testuser@{ME}"
V4, V6 = "127.0.0.1", "::1"


@dataclass
class Mx:
    inst: Instance
    port: int
    port_small: int  # DATABYTES=1000


@pytest.fixture(scope="module")
def mx() -> Iterator[Mx]:
    port, small = free_port(), free_port()
    inst = Instance.create(listen=None, extra_controls={"timeoutsmtpd": "2"})
    add_catchall_mailbox(inst)
    (inst.root / "control" / "servercert.pem").unlink(missing_ok=True)
    inst.write_control("listen", "\n".join([
        f"smtp {V4}:{port}", f"smtp [{V6}]:{port}", f"smtp {V4}:{small} DATABYTES=1000"]))
    inst.start()
    try:
        yield Mx(inst, port, small)
    finally:
        inst.destroy()


def session(mx: Mx, host: str = V4, port: int | None = None) -> RawClient:
    c = RawClient(host, port or mx.port)
    assert c.line() == replies.greeting(ME).wire()
    assert c.command("EHLO client.example")[0] == 250
    return c


def transaction(c: RawClient, sender: str = "s@client.example") -> None:
    c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{LOCAL_RCPT}>\r\n".encode())
    assert [c.line(), c.line()] == [b"250 ok\r\n", b"250 ok\r\n"]


def mailbox_with(mx: Mx, needle: bytes) -> list[bytes]:
    new = mx.inst.home / "Maildir" / "new"
    return [d for p in new.iterdir() if needle in (d := p.read_bytes())]


def marker(mx: Mx, token: str) -> None:
    """One more message, delivered: anything a broken session queued would be too."""
    c = session(mx)
    transaction(c)
    body = f"Subject: {token}\r\n\r\nmarker\r\n".encode()
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    qp = qp_of(c.line())
    assert qp is not None
    wait_deliveries(mx.inst, qp)
    c.close()


def test_smtplib_sees_chunking(mx: Mx) -> None:
    with smtplib.SMTP(V4, mx.port, local_hostname="client.example", timeout=10) as s:
        s.ehlo()
        assert s.has_extn("chunking") and not s.has_extn("binarymime")


@pytest.mark.parametrize("host", [V4, V6])
def test_chunks_delivered_exactly_with_pipelining(mx: Mx, host: str) -> None:
    """Three chunks and the commands after them in one write: CRLF split across two
    chunks, a ``.\\r\\n`` line and a leading dot stored as they came, bare CR kept."""
    parts = [b"Subject: chunked\r\n\r\n.\r\n", b"..dots\r", b"\nbare\rcr\r\n\r\n.\r\nend\r\n"]
    c = RawClient(host, mx.port)
    c.send(b"EHLO client.example\r\nMAIL FROM:<s@client.example>\r\n"
           + f"RCPT TO:<{LOCAL_RCPT}>\r\n".encode()
           + b"BDAT %d\r\n" % len(parts[0]) + parts[0]
           + b"BDAT %d\r\n" % len(parts[1]) + parts[1]
           + b"BDAT %d LAST\r\n" % len(parts[2]) + parts[2] + b"NOOP\r\nQUIT\r\n")
    assert c.line() == replies.greeting(ME).wire()
    assert c.reply() == (250, [ME, "PIPELINING", "8BITMIME", "CHUNKING", "SIZE 52428800"])
    assert [c.reply() for _ in range(4)] == [
        (250, ["ok"]), (250, ["ok"]), (250, [f"{len(parts[0])} octets received"]),
        (250, [f"{len(parts[1])} octets received"])]
    last = c.line()
    assert re.fullmatch(rb"250 ok \d+ qp \d+\r\n", last), last
    assert c.line() == b"250 ok\r\n"
    assert c.line() == replies.quit_(ME).wire()
    c.close()
    qp = qp_of(last)
    assert qp is not None
    (data,) = wait_deliveries(mx.inst, qp)
    received, body = split_delivery(data)[3:]
    assert re.fullmatch(re.escape(b"Received: from unknown (HELO client.example) ("
                                  + host.encode() + b")\n  by " + ME.encode() + b" with SMTP; ")
                        + DATE_RE + b"\n", received), received
    assert body == b"".join(parts).replace(b"\r\n", b"\n")


def test_bdat_zero_last(mx: Mx) -> None:
    c = session(mx)
    transaction(c)
    c.send(b"BDAT 12\r\nSubject: z\r\nBDAT 0 LAST\r\n")
    assert c.line() == b"250 12 octets received\r\n"
    qp = qp_of(c.line())
    assert qp is not None
    (data,) = wait_deliveries(mx.inst, qp)
    assert split_delivery(data)[4] == b"Subject: z\n"
    c.close()


def test_refusals_keep_the_session_in_step(mx: Mx) -> None:
    """503 without MAIL (the chunk is read, so the command in it is never run), DATA
    after BDAT 503, 552 over databytes then 503 until RSET."""
    c = session(mx, port=mx.port_small)
    c.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert c.reply() == (503, [replies.MAIL_FIRST.text])
    assert c.reply() == (250, ["ok"])
    transaction(c)
    c.send(b"BDAT 12\r\nSubject: x\r\nDATA\r\n")
    assert c.reply() == (250, ["12 octets received"])
    assert c.reply() == (503, [replies.BDAT_MIXED.text])
    c.send(b"BDAT 991\r\n" + b"y" * 991)
    assert c.reply() == (552, [replies.TOO_BIG.text])
    c.send(b"BDAT 4 LAST\r\nabcd")
    assert c.reply() == (503, [replies.BDAT_FAILED.text])
    assert c.command("RSET") == (250, ["flushed"])
    transaction(c)
    body = b"Subject: fits\r\n\r\n" + b"z" * 900 + b"\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    qp = qp_of(c.line())
    assert qp is not None
    assert split_delivery(wait_deliveries(mx.inst, qp)[0])[4] == body.replace(b"\r\n", b"\n")
    c.close()
    assert not mailbox_with(mx, b"Subject: x\n")


@pytest.mark.parametrize("size", [b"-1", b"x", b"1234567890123456789", b"", b"5 MORE"])
def test_bad_sizes_501_and_close(mx: Mx, size: bytes) -> None:
    c = session(mx)
    transaction(c)
    c.send(b"BDAT " + size + b"\r\nNOOP\r\n")
    assert c.reply() == (501, [replies.BDAT_SYNTAX.text])
    assert c.read_to_eof() == b""
    c.close()


def test_huge_refused_chunk_closes(mx: Mx) -> None:
    c = session(mx)
    c.send(b"BDAT 999999999999\r\n")
    assert c.reply() == (503, [replies.MAIL_FIRST.text])
    assert c.read_to_eof() == b""
    c.close()


def test_short_chunk_then_close_queues_nothing(mx: Mx) -> None:
    start = log_size(mx.inst)
    c = session(mx)
    transaction(c, "gone@client.example")
    c.send(b"BDAT 5\r\nSubj\r\nBDAT 100 LAST\r\nSubject: vanished\r\n")
    assert c.reply() == (250, ["5 octets received"])
    c.close()
    wait_log(mx.inst, "qmail-smtpd: read failed: gone@client.example", start)
    marker(mx, "checkpoint-short")
    assert not mailbox_with(mx, b"vanished")
    mx.inst.wait_queue_empty()


def test_chunk_announced_larger_than_sent_times_out(mx: Mx) -> None:
    """timeoutsmtpd=2: a chunk that never completes gets DATA's 451 timeout."""
    c = session(mx)
    transaction(c)
    c.send(b"BDAT 50 LAST\r\nSubject: stalled-bdat\r\n")
    began = time.monotonic()
    assert c.line(timeout=10) == replies.TIMEOUT.wire()
    assert c.read_to_eof() == b""
    assert time.monotonic() - began >= 1.5
    c.close()
    marker(mx, "checkpoint-stalled")
    assert not mailbox_with(mx, b"stalled-bdat")


def test_bare_lf_in_a_chunk(mx: Mx) -> None:
    c = session(mx)
    transaction(c)
    c.send(b"BDAT 20 LAST\r\nSubject: lf-bdat\nX: y\r\n")
    assert c.line() == replies.BARE_LF.wire()
    assert c.read_to_eof() == b""
    c.close()
    marker(mx, "checkpoint-lf")
    assert not mailbox_with(mx, b"lf-bdat")


def test_end_of_data_inside_a_chunk_is_not_smuggling(mx: Mx) -> None:
    """``\\r\\n.\\r\\nMAIL FROM...`` inside a chunk is message text, not commands."""
    inner = (b"Subject: outer\r\n\r\nx\r\n.\r\nMAIL FROM:<evil@client.example>\r\n"
             b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n")
    c = session(mx)
    transaction(c)
    c.send(b"BDAT %d LAST\r\n" % len(inner) + inner + b"QUIT\r\n")
    qp = qp_of(c.line())
    assert qp is not None
    assert c.line() == replies.quit_(ME).wire()
    c.close()
    (data,) = wait_deliveries(mx.inst, qp)
    assert split_delivery(data)[4] == inner.replace(b"\r\n", b"\n")
    marker(mx, "checkpoint-smuggle")
    assert all(b"Subject: outer" in d for d in mailbox_with(mx, b"Subject: smuggled"))


def test_eqmails_own_client_sends_bdat_to_eqmail(mx: Mx) -> None:
    """The sending side (eqmail.smtp.client) against the receiving side: the peer
    offers CHUNKING, so the message goes as one BDAT LAST chunk and arrives intact."""
    sock = socket.create_connection((V4, mx.port), timeout=5)
    s = SmtpSession(Transport(sock, 5), Destination(V4, mx.port, "", None, None, False),
                    "client.example", TlsConfig(Path("/nonexistent")))
    s.open()
    assert "CHUNKING" in s.keywords
    body = b"Subject: from-eqmail-client\n\n.\n..two\nbare\rcr\n"
    start = log_size(mx.inst)
    rcpts, msg = s.transaction("s@client.example", [LOCAL_RCPT], io.BytesIO(body))
    s.close()
    assert msg.verdict is Verdict.SUCCESS, msg
    said = msg.text.split("Remote host said: ", 1)[1].strip()
    qp = qp_of(said.encode() + b"\r\n")
    assert qp is not None, msg.text
    (data,) = wait_deliveries(mx.inst, qp)
    # bare CR becomes CRLF on the wire (dataout's rule), stored as LF
    assert split_delivery(data)[4] == body.replace(b"\r", b"\n")
    assert "message accepted" in wait_log(mx.inst, "qmail-smtpd: message accepted: s@client.example",
                                          start)
