"""Issue 12, items 6-8 end to end: what one SMTP client may take from live listeners,
over real sockets on 127.0.0.x and ::1.

- ``flood``: default limits (control/concurrencyperclient 50, timeoutsmtpd 1200): a
  flood of idle connections from three IPv4 addresses and ::1, a listener at its
  ``concurrency``, relay clients exempt by control/concurrencyperclientrelay=0, the
  error delay of one session not holding up another;
- ``shared``: concurrencyperclient=4 over several listeners with ``processes=3`` (IPv4
  and IPv6), relay clients *not* exempt (no relay control), and no leaked count when
  a listener is kill -9'd or retired by a reload;
- ``slow``: timeoutsmtpd=3 and mindatarate=10: a command line dribbled a byte a
  second, message data below the rate, and clients that are slow but fast enough.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import ME, Instance, free_port, poll, status
from live_smtp import RawClient, add_catchall_mailbox, log_size, wait_log

from eqmail.smtp import replies

V4, V6 = "127.0.0.1", "::1"
GREETING = replies.greeting(ME).wire()
FULL = replies.too_many_connections(ME).wire()
PER_CLIENT = replies.too_many_from_client(ME).wire()

pytestmark = pytest.mark.timeout(240)


@dataclass
class Mx:
    inst: Instance
    port: int        # both families
    port_small: int  # concurrency=5, 127.0.0.1
    port_b: int = 0  # shared: a second listener line (127.0.0.1)
    port_smtps: int = 0  # flood: smtps concurrency=1


def _instance(listen: list[str], controls: dict[str, str], tls: bool = False) -> Instance:
    inst = Instance.create(listen=None, extra_controls=controls)
    add_catchall_mailbox(inst)
    if not tls:
        (inst.root / "control" / "servercert.pem").unlink(missing_ok=True)
    inst.write_control("listen", "\n".join(listen))
    inst.start()
    return inst


@pytest.fixture(scope="module")
def flood() -> Iterator[Mx]:
    port, small, smtps = free_port(), free_port(), free_port()
    inst = _instance([f"smtp {V4}:{port} concurrency=500", f"smtp [{V6}]:{port} concurrency=500",
                      f"smtp {V4}:{small} concurrency=5", f"smtps {V4}:{smtps} concurrency=1"],
                     {"tcp.smtp": '127.0.0.5:allow,RELAYCLIENT=""\n:allow\n',
                      "concurrencyperclientrelay": "0"}, tls=True)
    try:
        yield Mx(inst, port, small, port_smtps=smtps)
    finally:
        inst.destroy()


def first_lines(socks: list[socket.socket], timeout: float = 20.0) -> list[bytes]:
    """The first line each socket receives (b"" for a close without one)."""
    bufs = {s: b"" for s in socks}
    open_ = set(socks)
    deadline = time.monotonic() + timeout
    while open_:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(open_)} connections got no first line"
        ready, _, _ = select.select(list(open_)[:1000], [], [], min(left, 0.5))
        for s in ready:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            bufs[s] += data
            if b"\n" in bufs[s] or not data:
                open_.discard(s)
    return [bufs[s].split(b"\n", 1)[0] + b"\n" if b"\n" in bufs[s] else b"" for s in socks]


def connect_many(host: str, port: int, source: str, n: int) -> list[socket.socket]:
    return [socket.create_connection((host, port), 10, source_address=(source, 0)) for _ in range(n)]


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# ---- item 6: connection floods --------------------------------------------------------

def test_flood_of_idle_connections_does_not_keep_out_a_legitimate_client(flood: Mx) -> None:
    """150 idle connections from each of 127.0.0.2-4 and ::1: 50 of each get a greeting,
    the others ``421 ... too many connections from your address`` at once; meanwhile a
    client from 127.0.0.1 gets its greeting within 2 s, while new flood connections
    keep coming."""
    socks: list[socket.socket] = []
    by_source: dict[str, list[socket.socket]] = {}
    try:
        for source, host in (("127.0.0.2", V4), ("127.0.0.3", V4), ("127.0.0.4", V4), (V6, V6)):
            by_source[source] = connect_many(host, flood.port, source, 150)
            socks += by_source[source]
        lines = dict(zip(socks, first_lines(socks), strict=True))
        for source, group in by_source.items():
            got = [lines[s] for s in group]
            assert got.count(GREETING) == 50, (source, set(got))
            assert got.count(PER_CLIENT) == 100, (source, set(got))

        stop = threading.Event()
        flooded = [0]

        def keep_flooding() -> None:  # the flood goes on while the client connects
            while not stop.is_set():
                for s in connect_many(V4, flood.port, "127.0.0.2", 20):
                    flooded[0] += 1
                    s.close()

        flooder = threading.Thread(target=keep_flooding)
        flooder.start()
        try:
            time.sleep(0.3)
            for host in (V4, V4, V4):
                began = time.monotonic()
                c = RawClient(host, flood.port)
                assert c.line(timeout=5) == GREETING
                assert time.monotonic() - began < 2.0
                assert c.command("HELO legit.example") == (250, [ME])
                c.close()
        finally:
            stop.set()
            flooder.join()
        assert flooded[0] > 0
        assert "too many connections from one client: refused" in flood.inst.log()
    finally:
        close_all(socks)


def test_listener_at_its_concurrency_answers_421_and_closes(flood: Mx) -> None:
    """concurrency=5: the 6th connection (another address, so not the per-client limit)
    gets ``421 <me> too many connections, try again later (#4.3.2)`` within 2 s and is
    closed; it is not left unanswered in the kernel's queue."""
    held = [RawClient(V4, flood.port_small, source=f"127.0.1.{i}") for i in range(5)]
    try:
        for c in held:
            assert c.line() == GREETING
        for source in ("127.0.1.9", "127.0.1.10"):
            began = time.monotonic()
            extra = RawClient(V4, flood.port_small, source=source)
            assert extra.line(timeout=5) == FULL
            assert extra.read_to_eof(timeout=5) == b""
            assert time.monotonic() - began < 2.0
            extra.close()
        assert held[0].command("QUIT")[0] == 221
        held[0].read_to_eof(timeout=5)

        def greeted() -> bool:
            c = RawClient(V4, flood.port_small, source="127.0.1.11")
            ok = c.line(timeout=5) == GREETING
            c.close()
            return ok
        poll(greeted, 10, "a freed slot", flood.inst)
    finally:
        for c in held:
            c.close()


def test_full_smtps_listener_closes_without_clear_text(flood: Mx) -> None:
    """SMTPS at its concurrency: the connection is closed at once; no plain-text 421
    where the client expects a TLS handshake, and no handshake spent on it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    held = ctx.wrap_socket(socket.create_connection((V4, flood.port_smtps), 10))
    try:
        held.settimeout(10)
        assert held.recv(4096) == GREETING
        extra = socket.create_connection((V4, flood.port_smtps), 10)
        extra.settimeout(5)
        began = time.monotonic()
        assert extra.recv(4096) == b""
        assert time.monotonic() - began < 2.0
        extra.close()
    finally:
        held.close()


def test_relay_clients_exempt_when_the_admin_says_so(flood: Mx) -> None:
    """tcp.smtp gives 127.0.0.5 RELAYCLIENT and control/concurrencyperclientrelay is 0:
    60 sessions from it are all served (over the per-client 50)."""
    socks = connect_many(V4, flood.port, "127.0.0.5", 60)
    try:
        assert first_lines(socks) == [GREETING] * 60
    finally:
        close_all(socks)


# ---- item 8: the error delay is one session's --------------------------------------

def test_error_delay_holds_up_only_its_own_session(flood: Mx) -> None:
    """smtperrorsoftlimit 10, smtperrorsleep 1 (defaults): the 11th error reply comes
    after a second; another session is answered at once meanwhile."""
    bad = RawClient(V4, flood.port, source="127.0.0.6")
    other = RawClient(V6, flood.port)
    try:
        assert bad.line() == GREETING and other.line() == GREETING
        bad.send(b"BOGUS\r\n" * 10)
        began = time.monotonic()
        for _ in range(10):
            assert bad.line() == replies.UNRECOGNISED.wire()
        assert time.monotonic() - began < 0.9  # the first ten are not delayed
        bad.send(b"BOGUS\r\n")
        sent = time.monotonic()
        assert other.command("NOOP") == (250, ["ok"])
        assert time.monotonic() - sent < 0.8
        assert bad.line(timeout=5) == replies.UNRECOGNISED.wire()
        assert time.monotonic() - sent >= 0.9
        began = time.monotonic()
        assert bad.command("NOOP") == (250, ["ok"])  # every reply now waits
        assert time.monotonic() - began >= 0.9
    finally:
        bad.close()
        other.close()


# ---- item 6: one count across processes, listeners and generations -----------------

@pytest.fixture(scope="module")
def shared() -> Iterator[Mx]:
    port, port_b = free_port(), free_port()
    inst = _instance([f"smtp {V4}:{port} processes=3 concurrency=30",
                      f"smtp [{V6}]:{port} processes=3 concurrency=30",
                      f"smtp {V4}:{port_b}"],
                     {"tcp.smtp": '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n',
                      "concurrencyperclient": "4"})
    try:
        yield Mx(inst, port, 0, port_b)
    finally:
        inst.destroy()


def greet(host: str, port: int, source: str | None) -> RawClient:
    c = RawClient(host, port, source=source)
    assert c.line(timeout=10) == GREETING
    return c


def refused(host: str, port: int, source: str | None) -> None:
    c = RawClient(host, port, source=source)
    assert c.line(timeout=10) == PER_CLIENT
    assert c.read_to_eof(timeout=5) == b""
    c.close()


def listener_pids(inst: Instance, port: int, generation: int | None = None) -> list[int]:
    return [w["pid"] for w in status(inst)["workers"]
            if w["kind"] == "listener" and w["title"].startswith(f"eqmail: listener smtp {V4}:{port}")
            and w["pid"] and (generation is None or w.get("generation") == generation)]


@pytest.mark.parametrize("host,source", [(V4, "127.0.0.2"), (V6, None), (V4, V4)],
                         ids=["ipv4", "ipv6", "relayclient"])
def test_limit_is_shared_by_processes_and_listeners(shared: Mx, host: str, source: str | None) -> None:
    """concurrencyperclient=4 with 3 processes per listener line and two lines: four
    sessions in all, wherever they land; RELAYCLIENT (127.0.0.1) is no exemption
    without control/concurrencyperclientrelay."""
    if host == V6:
        held = [greet(V6, shared.port, None) for _ in range(4)]
        try:
            refused(V6, shared.port, None)
        finally:
            for c in held:
                c.close()
        return
    held = [greet(V4, p, source) for p in (shared.port, shared.port, shared.port_b, shared.port_b)]
    try:
        refused(V4, shared.port, source)
        refused(V4, shared.port_b, source)
        assert held[0].command("QUIT")[0] == 221
        held[0].read_to_eof(timeout=5)
        held.append(poll(lambda: _try_greet(V4, shared.port_b, source), 10, "the released slot",
                         shared.inst))  # type: ignore[arg-type]
    finally:
        for c in held:
            c.close()


def _try_greet(host: str, port: int, source: str | None) -> RawClient | None:
    """A greeted client, or None (closed) when refused."""
    c = RawClient(host, port, source=source)
    if c.line(timeout=10) == GREETING:
        return c
    c.close()
    return None


def test_kill_9_of_a_listener_leaks_no_count(shared: Mx) -> None:
    """Sessions of a listener killed with SIGKILL stop counting once the supervisor has
    reaped it: the address gets its four sessions again."""
    src = "127.0.0.3"
    on_a = [greet(V4, shared.port, src) for _ in range(2)]
    on_b = [greet(V4, shared.port_b, src) for _ in range(2)]
    try:
        refused(V4, shared.port_b, src)
        before = set(listener_pids(shared.inst, shared.port))
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        for c in on_a:
            assert c.read_to_eof(timeout=10) == b""
        poll(lambda: len(set(listener_pids(shared.inst, shared.port)) - before) == 3, 30,
             "restarted listeners", shared.inst)
        again = [greet(V4, shared.port, src), greet(V4, shared.port_b, src)]
        on_b += again
        refused(V4, shared.port, src)
        assert "left 2 client session(s) counted; forgotten" in shared.inst.log() or \
            "left 1 client session(s) counted; forgotten" in shared.inst.log()
    finally:
        for c in on_a + on_b:
            c.close()


def test_reload_shares_the_count_across_generations_and_retired_listeners_leak_nothing(
        shared: Mx) -> None:
    src = "127.0.0.4"
    old = [greet(V4, shared.port, src) for _ in range(2)]
    new: list[RawClient] = []
    try:
        generation = status(shared.inst)["generation"]
        old_pids = set(listener_pids(shared.inst, shared.port))
        shared.inst.write_control("listen", "\n".join([
            f"smtp {V4}:{shared.port} processes=3 concurrency=31",
            f"smtp [{V6}]:{shared.port} processes=3 concurrency=30", f"smtp {V4}:{shared.port_b}"]))
        poll(lambda: status(shared.inst)["generation"] > generation
             and len(set(listener_pids(shared.inst, shared.port)) - old_pids) == 3,
             30, "the reload", shared.inst)
        new = [greet(V4, shared.port, src) for _ in range(2)]  # served by the new generation
        refused(V4, shared.port, src)  # the old generation's two still count
        # the retired listeners still serve their sessions; killed, they leak nothing
        assert old[0].command("NOOP") == (250, ["ok"])
        for pid in old_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for c in old:
            assert c.read_to_eof(timeout=10) == b""
        new.append(poll(lambda: _try_greet(V4, shared.port, src), 10,  # type: ignore[arg-type]
                        "the retired listeners' slots", shared.inst))
        assert new[0].command("QUIT")[0] == 221  # an ordinary end releases its slot
        new[0].read_to_eof(timeout=5)
        new += [greet(V4, shared.port, src), greet(V4, shared.port, src)]
        refused(V4, shared.port, src)
    finally:
        for c in old + new:
            c.close()


# ---- item 7: slow clients ---------------------------------------------------------------

@pytest.fixture(scope="module")
def slow() -> Iterator[Mx]:
    port = free_port()
    inst = _instance([f"smtp {V4}:{port}", f"smtp [{V6}]:{port}"],
                     {"timeoutsmtpd": "3", "mindatarate": "10"})
    try:
        yield Mx(inst, port, 0)
    finally:
        inst.destroy()


def dribble(c: RawClient, data: bytes, interval: float, limit: float) -> bytes:
    """Send ``data`` a byte every ``interval`` s until the server says something (its
    first line is returned) or ``limit`` s pass (b"")."""
    began = time.monotonic()
    for i in range(len(data)):
        try:
            c.send(data[i:i + 1])
        except OSError:
            break
        if select.select([c.sock], [], [], interval)[0]:
            break
        if time.monotonic() - began > limit:
            return b""
    return c.line(timeout=5)


@pytest.mark.parametrize("host", [V4, V6])
def test_command_line_dribbled_a_byte_a_second_gets_451(slow: Mx, host: str) -> None:
    """timeoutsmtpd=3: a byte a second never trips the idle timeout, but the line must
    be complete 3 s after its first byte."""
    c = RawClient(host, slow.port)
    try:
        assert c.line() == GREETING
        since = log_size(slow.inst)
        began = time.monotonic()
        first = dribble(c, b"HELO " + b"x" * 60, 1.0, 15)
        assert first == replies.SLOW_LINE.wire()
        assert 2.5 < time.monotonic() - began < 8
        assert c.read_to_eof(timeout=5) == b""
        wait_log(slow.inst, "qmail-smtpd: timeout (command line too slow): (null) from", since)
    finally:
        c.close()


def test_slow_but_complete_lines_are_served(slow: Mx) -> None:
    """Each line is complete within timeoutsmtpd of its first byte: the session may take
    as long as it likes in all."""
    c = RawClient(V4, slow.port)
    try:
        assert c.line() == GREETING
        began = time.monotonic()
        for half in (b"HELO slow", b"NOOP", b"NOOP", b"NOOP"):
            c.send(half)
            time.sleep(1.2)
            c.send(b"\r\n" if half != b"HELO slow" else b".example\r\n")
            assert c.reply()[0] == 250
        assert time.monotonic() - began > 4  # longer than timeoutsmtpd in all
    finally:
        c.close()


@pytest.mark.parametrize("host", [V4, V6])
def test_data_below_mindatarate_gets_451_and_nothing_is_queued(slow: Mx, host: str) -> None:
    """mindatarate=10, timeoutsmtpd=3: data a byte a second may take 3 + n/10 s for n
    bytes; it runs out after about 3.3 s."""
    c = RawClient(host, slow.port)
    try:
        assert c.line() == GREETING
        for cmd in (b"HELO slow.example", b"MAIL FROM:<s@slow.example>",
                    f"RCPT TO:<testuser@{ME}>".encode()):
            assert c.command(cmd)[0] == 250
        assert c.command(b"DATA")[0] == 354
        began = time.monotonic()
        first = dribble(c, b"Subject: dribbled\r\n\r\n" + b"y" * 100, 1.0, 20)
        assert first == replies.SLOW_DATA.wire()
        assert 2.5 < time.monotonic() - began < 9
        assert c.read_to_eof(timeout=5) == b""
    finally:
        c.close()
    marker = RawClient(V4, slow.port)
    try:
        assert marker.line() == GREETING
        for cmd in (b"HELO m.example", b"MAIL FROM:<m@m.example>", f"RCPT TO:<testuser@{ME}>".encode()):
            assert marker.command(cmd)[0] == 250
        assert marker.command(b"DATA")[0] == 354
        assert marker.command(b"Subject: marker\r\n\r\nm\r\n.")[0] == 250
    finally:
        marker.close()
    mails = slow.inst.wait_for_mail(1)
    assert not any(b"dribbled" in p.read_bytes() for p in slow.inst.maildir_files())
    assert any(b"Subject: marker" in p.read_bytes() for p in mails)


def test_data_at_a_sufficient_rate_may_take_longer_than_timeoutsmtpd(slow: Mx) -> None:
    """200 bytes every 0.5 s (400 bytes/s, over mindatarate=10) for 5 s: accepted."""
    c = RawClient(V4, slow.port)
    try:
        assert c.line() == GREETING
        for cmd in (b"HELO steady.example", b"MAIL FROM:<s@steady.example>",
                    f"RCPT TO:<testuser@{ME}>".encode()):
            assert c.command(cmd)[0] == 250
        assert c.command(b"DATA")[0] == 354
        c.send(b"Subject: steady\r\n\r\n")
        began = time.monotonic()
        for _ in range(10):
            time.sleep(0.5)
            c.send(b"z" * 198 + b"\r\n")
        assert time.monotonic() - began > 4.5
        assert c.command(b".")[0] == 250
    finally:
        c.close()
