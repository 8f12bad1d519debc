"""The PROXY protocol on live listeners, behind a real HAProxy (Debian's) and against
hostile clients.

One eqmail instance and one private HAProxy (module scope) serve every test:

=============  ===========================================================================
eqmail         ``smtp 127.0.0.1:EQ proxy=127.0.0.1`` and ``smtp [::1]:EQ proxy=::1`` (AUTH
               by a checkpassword that always fails, control/authlimit 2 failures),
               ``smtps 127.0.0.1:EQS proxy=127.0.0.1``, and ``smtp 127.0.0.1:PLAIN`` without
               proxy=; tcp.smtp gives RELAYCLIENT to 127.0.0.2 and ::1 only; an spp plugin
               writes TCPREMOTEIP, TCPREMOTEPORT and PROXYIP into a header;
               concurrencyperclient 2
HAProxy        frontends on 127.0.0.1 and [::1] relaying to EQ with ``send-proxy`` (v1) and
               ``send-proxy-v2``, one relaying over IPv6 to [::1]:EQ, one to the SMTPS
               listener; three health-checked backends (``option smtpchk`` with v1, with
               v2, and without a PROXY header)
=============  ===========================================================================

Clients connect from other loopback addresses (127.0.0.2 ...) than HAProxy's
(127.0.0.1), so the Received line, tcprules, the plugin and the per-client limits show
whose address they see.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from certs import CA
from haproxy import HAPROXY, HAProxy
from harness import IS_ROOT, ME, Instance, free_port

from eqmail.smtp.proxy import V2_SIGNATURE, encode_v1, encode_v2

pytestmark = pytest.mark.skipif(not os.path.exists(HAPROXY), reason="haproxy is not installed")

FOREIGN = "someone@remote.example"
LOCAL = f"testuser@{ME}"


@dataclass
class World:
    inst: Instance
    lb: HAProxy
    eq: int
    eqs: int
    plain: int
    fe: dict[str, int]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    eq, eqs, plain = free_port(), free_port(("127.0.0.1",)), free_port(("127.0.0.1",))
    fe = {name: free_port() for name in ("v1", "v2", "v2six", "smtps")}
    inst = Instance.create(listen=(
        f"smtp 127.0.0.1:{eq} proxy=127.0.0.1 checkpassword=/bin/false\n"
        f"smtp [::1]:{eq} proxy=::1 checkpassword=/bin/false\n"
        f"smtps 127.0.0.1:{eqs} proxy=127.0.0.0/30\n"
        f"smtp 127.0.0.1:{plain}\n"))
    inst.write_control("tcp.smtp", '127.0.0.2:allow,RELAYCLIENT=""\n::1:allow,RELAYCLIENT=""\n:allow\n')
    inst.write_control("smtpplugins", '[mail]\n:echo "HX-Client: $TCPREMOTEIP $TCPREMOTEPORT '
                       '${PROXYIP:-none} ${PROXYDESTPORT:-none}"\n')
    inst.write_control("authlimit", "2 60 0.1")
    inst.write_control("concurrencyperclient", "2")
    server = CA.create().server(ME, "127.0.0.1", rsa_bits=2048 if IS_ROOT else 0)
    (inst.root / "control" / "servercert.pem").write_bytes(server.chain_and_key)
    os.chmod(inst.root / "control" / "servercert.pem", 0o600)
    chk = "option smtpchk HELO lb.example\n"
    every = "check inter 300ms fall 1 rise 1"
    lb = HAProxy(
        f"frontend v1\n    bind 127.0.0.1:{fe['v1']}\n    bind [::1]:{fe['v1']}\n    default_backend v1\n"
        f"backend v1\n    server eq 127.0.0.1:{eq} send-proxy\n"
        f"frontend v2\n    bind 127.0.0.1:{fe['v2']}\n    bind [::1]:{fe['v2']}\n    default_backend v2\n"
        f"backend v2\n    server eq 127.0.0.1:{eq} send-proxy-v2\n"
        f"frontend v2six\n    bind 127.0.0.1:{fe['v2six']}\n    default_backend v2six\n"
        f"backend v2six\n    server eq [::1]:{eq} send-proxy-v2\n"
        f"frontend smtps\n    bind 127.0.0.1:{fe['smtps']}\n    default_backend smtps\n"
        f"backend smtps\n    server eq 127.0.0.1:{eqs} send-proxy-v2\n"
        f"backend check_v1\n    {chk}    server eq 127.0.0.1:{eq} send-proxy {every}\n"
        f"backend check_v2\n    {chk}    server eq 127.0.0.1:{eq} send-proxy-v2 {every}\n"
        f"backend check_none\n    {chk}    server eq 127.0.0.1:{eq} {every}\n")
    try:
        inst.start()
        lb.start()
        yield World(inst, lb, eq, eqs, plain, fe)
    finally:
        lb.stop()
        inst.destroy()


def client(port: int, source: str, host: str = "127.0.0.1") -> smtplib.SMTP:
    s = smtplib.SMTP(timeout=30, local_hostname="client.example", source_address=(source, 0))
    code, text = s.connect(host, port)
    if code != 220:
        s.close()
        raise smtplib.SMTPConnectError(code, text)
    return s


def received_and_plugin(msg: bytes) -> tuple[bytes, bytes]:
    head = msg.split(b"\n\n", 1)[0]
    received = re.search(rb"^Received: from .*\n  by .*$", head, re.MULTILINE)
    plugin = re.search(rb"^X-Client: (.*)$", head, re.MULTILINE)
    assert received and plugin, head
    return received.group(0), plugin.group(1)


def send_one(world: World, port: int, source: str, host: str = "127.0.0.1") -> tuple[bytes, bytes, int]:
    before = len(world.inst.maildir_files())
    with client(port, source, host) as s:
        local_port = s.sock.getsockname()[1]
        s.sendmail("a@example.org", [LOCAL], b"Subject: proxy\r\n\r\nhi\r\n")
    files = world.inst.wait_for_mail(before + 1)
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    return *received_and_plugin(newest.read_bytes()), local_port


# ------------------------------------------------------------ behind HAProxy

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_received_plugin_and_tcprules_see_the_real_client(world: World, version: str) -> None:
    received, plugin, port = send_one(world, world.fe[version], "127.0.0.2")
    assert received.startswith(b"Received: from unknown (HELO client.example) (127.0.0.2)\n  by "), received
    assert b"127.0.0.1" not in received
    assert plugin == f"127.0.0.2 {port} 127.0.0.1 {world.fe[version]}".encode()
    # the relay rule is for 127.0.0.2 alone: HAProxy's own address (127.0.0.1) has none
    with client(world.fe[version], "127.0.0.2") as s:
        s.ehlo()
        s.mail("a@example.org")
        assert s.rcpt(FOREIGN)[0] == 250
    with client(world.fe[version], "127.0.0.3") as s:
        s.ehlo()
        s.mail("a@example.org")
        assert s.rcpt(FOREIGN) == (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
    log = world.inst.wait_log(r"message accepted: .* from 127\.0\.0\.2 .* via 127\.0\.0\.1:\d+")
    assert re.search(rf"message accepted: <?a@example.org>? from 127\.0\.0\.2 to <?{re.escape(LOCAL)}>? "
                     rf"helo client\.example via 127\.0\.0\.1:\d+\n", log), log


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_ipv6_client_through_an_ipv4_link(world: World, version: str) -> None:
    received, plugin, port = send_one(world, world.fe[version], "::1", host="::1")
    assert received.startswith(b"Received: from unknown (HELO client.example) (::1)\n  by "), received
    assert plugin == f"::1 {port} 127.0.0.1 {world.fe[version]}".encode()


def test_an_ipv4_client_through_an_ipv6_link(world: World) -> None:
    received, plugin, port = send_one(world, world.fe["v2six"], "127.0.0.3")
    assert received.startswith(b"Received: from unknown (HELO client.example) (127.0.0.3)\n  by "), received
    assert plugin == f"127.0.0.3 {port} ::1 {world.fe['v2six']}".encode()
    with client(world.fe["v2six"], "127.0.0.3") as s:  # ::1, the balancer, may relay; 127.0.0.3 not
        s.ehlo()
        s.mail("a@example.org")
        assert s.rcpt(FOREIGN)[0] == 553


def test_smtps_behind_haproxy(world: World) -> None:
    before = len(world.inst.maildir_files())
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", world.fe["smtps"], timeout=30, local_hostname="client.example",
                          source_address=("127.0.0.2", 0), context=ctx) as s:
        s.sendmail("a@example.org", [LOCAL], b"Subject: smtps\r\n\r\nhi\r\n")
    (newest,) = sorted(world.inst.wait_for_mail(before + 1), key=lambda p: p.stat().st_mtime_ns)[-1:]
    received, plugin = received_and_plugin(newest.read_bytes())
    assert received.startswith(b"Received: from unknown (HELO client.example) (127.0.0.2)\n  by "), received
    assert b"127.0.0.1" not in received and plugin.startswith(b"127.0.0.2 ")


def test_health_checks_are_served_as_the_balancer(world: World) -> None:
    # smtpchk: the 220 greeting, then 250 to HELO -- after a v1 UNKNOWN or v2 LOCAL header
    world.lb.wait_check("check_v1/eq", "L7OK", "UP")
    world.lb.wait_check("check_v2/eq", "L7OK", "UP")
    # without a header the listener says nothing at all: the check times out
    world.lb.wait_check("check_none/eq", "L7TOUT", "DOWN")


def test_per_client_limits_count_the_real_client(world: World) -> None:
    # concurrencyperclient 2: a third session of 127.0.0.6 is refused, 127.0.0.7's is not
    # (all of them come from HAProxy's 127.0.0.1)
    first, second = client(world.fe["v2"], "127.0.0.6"), client(world.fe["v1"], "127.0.0.6")
    try:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            client(world.fe["v2"], "127.0.0.6")
        assert info.value.smtp_code == 421 and b"(#4.7.0)" in info.value.smtp_error
        with client(world.fe["v2"], "127.0.0.7") as other:
            assert other.noop()[0] == 250
    finally:
        first.close()
        second.close()
    log = world.inst.wait_log(r"too many connections from one client: refused \d+ connection\(s\), "
                              r"the last from 127\.0\.0\.6 via 127\.0\.0\.1:\d+")
    assert re.search(r"the last from 127\.0\.0\.6 via 127\.0\.0\.1:\d+", log), log


def test_auth_failures_count_per_real_client(world: World) -> None:
    # control/authlimit 2: 127.0.0.4 is locked out after two failures, 127.0.0.5 is not
    # (both through HAProxy, whose address would otherwise lock out everyone)
    def auth(source: str) -> int:
        with client(world.fe["v2"], source) as s:
            s.ehlo()
            code, _ = s.docmd("AUTH", "PLAIN AGEAYg==")
            return code

    assert [auth("127.0.0.4") for _ in range(3)] == [535, 535, 454]
    assert auth("127.0.0.5") == 535
    log = world.inst.wait_log(r"auth refused \(too many failures\): plain a from 127\.0\.0\.4 via")
    assert re.search(r"auth failed: plain a from 127\.0\.0\.5 via 127\.0\.0\.1:\d+", log), log


# ------------------------------------------------------------ clients that are not HAProxy

def raw(port: int, source: str, payload: bytes, *, half_close: bool = False, wait: float = 20,
        family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> tuple[bytes, float]:
    """Send ``payload`` from ``source``; everything the server sent until it closed, and
    how long that took."""
    with socket.socket(family) as s:
        s.settimeout(wait)
        s.bind((source, 0))
        s.connect((host, port))
        began = time.monotonic()
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        return got, time.monotonic() - began


def test_forged_headers_from_an_untrusted_client_get_no_reply(world: World) -> None:
    forged = [encode_v1(("192.0.2.9", 1234), ("127.0.0.1", world.eq)),
              encode_v2(("192.0.2.9", 1234), ("127.0.0.1", world.eq)) + b"EHLO x\r\n"]
    for payload in forged:
        got, took = raw(world.eq, "127.0.0.2", payload)
        assert got == b"" and took < 5
    got, _ = raw(world.eq, "::1", forged[0] + b"QUIT\r\n", family=socket.AF_INET6, host="::1")
    assert got.startswith(b"220 ")  # ::1 is the [::1] listener's balancer: a v1 header is fine
    got, _ = raw(world.eqs, "127.0.0.4", forged[1])  # SMTPS trusts 127.0.0.0/30 only
    assert got == b""
    log = world.inst.wait_log(r"connection not from a proxy= balancer: refused \d+ connection\(s\), "
                              r"the last from 127\.0\.0\.2")
    assert "192.0.2.9" not in log


V4 = struct.pack("!4s4sHH", bytes([192, 0, 2, 1]), bytes([127, 0, 0, 1]), 4000, 25)


@pytest.mark.parametrize(("payload", "half_close", "reason"), [
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 025\r\nEHLO x\r\n", False, "malformed PROXY header"),
    (b"PROXY TCP4 " + b"1" * 120, False, "PROXY header too long"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 4000) + V4, False, "PROXY header too long"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0c" + V4[:6], True, "truncated PROXY header"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + V4, False, "PROXY header for a protocol other than TCP"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + V4, False, "unsupported PROXY protocol version"),
    (b"EHLO client.example\r\n", False, "not a PROXY protocol header"),
])
def test_hostile_headers_from_the_balancer_get_no_reply(world: World, payload: bytes, half_close: bool,
                                                         reason: str) -> None:
    time.sleep(1.1)  # refusals are logged at most once a second per reason
    got, took = raw(world.eq, "127.0.0.1", payload, half_close=half_close)
    assert got == b"" and took < 5
    log = world.inst.wait_log(re.escape(reason) + r": refused \d+ connection\(s\), the last from 127\.0\.0\.1")
    assert re.search(re.escape(reason) + r": refused", log), log


def test_a_slow_header_is_dropped_after_a_few_seconds(world: World) -> None:
    got, took = raw(world.eq, "127.0.0.1", b"PROXY TCP4 192.0.2.1 ")
    assert got == b"" and 4 < took < 10
    log = world.inst.wait_log(r"no PROXY header in time: refused")
    assert "no PROXY header in time: refused" in log


def test_bytes_after_the_header_reach_the_session_once(world: World) -> None:
    # header and commands in one segment, before the greeting: the greeting comes first,
    # then one reply per command; TLVs (NOOP, unique id) are skipped
    v2 = encode_v2(("192.0.2.1", 4000), ("127.0.0.1", world.eq), ((0x04, b"\0" * 5), (0x05, b"id-1")))
    for header in (encode_v1(("192.0.2.1", 4000), ("127.0.0.1", world.eq)), v2):
        got, _ = raw(world.eq, "127.0.0.1", header + b"HELO client.example\r\nNOOP\r\nQUIT\r\n")
        lines = got.split(b"\r\n")
        assert lines[0].startswith(b"220 ") and lines[1:] == [
            f"250 {ME}".encode(), b"250 ok", f"221 {ME}".encode(), b""], got


def test_proxy_unknown_is_served_as_the_balancer(world: World) -> None:
    before = len(world.inst.maildir_files())
    with socket.create_connection(("127.0.0.1", world.eq), timeout=30) as s:
        s.sendall(b"PROXY UNKNOWN\r\n")
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        for line, code in ((b"HELO lb.example", b"250"), (b"MAIL FROM:<a@example.org>", b"250"),
                           (f"RCPT TO:<{LOCAL}>".encode(), b"250"), (b"DATA", b"354"),
                           (b"Subject: u\r\n\r\nhi\r\n.", b"250"), (b"QUIT", b"221")):
            s.sendall(line + b"\r\n")
            assert f.readline().startswith(code + b" ")
    newest = max(world.inst.wait_for_mail(before + 1), key=lambda p: p.stat().st_mtime_ns)
    received, plugin = received_and_plugin(newest.read_bytes())
    assert received.startswith(b"Received: from unknown (HELO lb.example) (127.0.0.1)\n  by ")
    assert plugin.endswith(b" none none")  # no PROXYIP: this session is the balancer's own


def test_tls_after_the_header_on_smtps(world: World) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    for header in (encode_v1(("192.0.2.1", 4000), ("127.0.0.1", world.eqs)),
                   encode_v2(("2001:db8::1", 4000), ("2001:db8::25", 465))):
        with socket.create_connection(("127.0.0.1", world.eqs), timeout=30) as raw_sock:
            raw_sock.sendall(header)  # the ClientHello follows at once, maybe in one segment
            with ctx.wrap_socket(raw_sock) as tls:
                f = tls.makefile("rb")
                assert f.readline().startswith(b"220 ")
                tls.sendall(b"QUIT\r\n")
                assert f.readline().startswith(b"221 ")


def test_a_listener_without_proxy_is_qmail(world: World) -> None:
    # no proxy=: a PROXY line is just an unknown command, as in qmail-smtpd
    got, _ = raw(world.plain, "127.0.0.1", b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 25\r\nQUIT\r\n")
    lines = got.split(b"\r\n")
    assert lines[0].startswith(b"220 ") and lines[1:] == [b"500 unrecognised (#5.5.2)",
                                                         f"221 {ME}".encode(), b""], got


def test_a_reload_turns_proxy_on_and_keeps_it_across_an_unrelated_change() -> None:
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\n")
    header = encode_v2(("192.0.2.1", 4000), ("127.0.0.1", port))
    try:
        inst.start()
        got, _ = raw(port, "127.0.0.1", b"QUIT\r\n")
        assert got.startswith(b"220 ")
        inst.write_control("listen", f"smtp 127.0.0.1:{port} proxy=127.0.0.1")
        assert inst.ctl("reload").stdout.startswith("eqmail: reload complete")
        assert raw(port, "127.0.0.1", b"QUIT\r\n")[0] == b""  # no header: nothing
        got, _ = raw(port, "127.0.0.1", header + b"QUIT\r\n")
        assert got.startswith(b"220 ") and got.endswith(f"221 {ME}\r\n".encode())
        # the kept listener gets the new configuration pushed (its proxy= list with it)
        inst.write_control("databytes", "1000")
        assert inst.ctl("reload").stdout.startswith("eqmail: reload complete")
        got, _ = raw(port, "127.0.0.1", header + b"EHLO x\r\nQUIT\r\n")
        assert b"\r\n250-SIZE 1000\r\n" in got or b"\r\n250 SIZE 1000\r\n" in got, got
        assert raw(port, "127.0.0.2", header + b"QUIT\r\n")[0] == b""
    finally:
        inst.destroy()
