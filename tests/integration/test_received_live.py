"""The Received line a live listener writes for hostile HELO names: qmail's byte rules."""

from __future__ import annotations

import socket

from harness import Instance, free_port


def _send(port: int, family: socket.AddressFamily, host: str, helo: bytes) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect((host, port))
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        for line, code in ((b"HELO " + helo, b"250"), (b"MAIL FROM:<a@example.org>", b"250"),
                           (b"RCPT TO:<testuser@mx.test.example>", b"250"), (b"DATA", b"354"),
                           (b"Subject: r\r\n\r\nbody\r\n.", b"250"), (b"QUIT", b"221")):
            c.sendall(line + b"\r\n")
            assert f.readline().startswith(code + b" ")


def test_received_helo_is_made_safe_byte_by_byte() -> None:
    port = free_port()
    inst = Instance.create(listen=f"smtp 127.0.0.1:{port}\nsmtp [::1]:{port}\n")
    try:
        inst.start()
        _send(port, socket.AF_INET, "127.0.0.1", "h\u00e9llo.example".encode())
        _send(port, socket.AF_INET6, "::1", b"cut\0X-Injected: yes")
        files = inst.wait_for_mail(2)
        texts = [p.read_bytes() for p in files]
        received = sorted(t.split(b"\n  by ", 1)[0].split(b"\n")[-1] for t in texts)
        # qmail's commands.c turns a NUL in a command line into LF, which safeput makes ?
        assert received == [b"Received: from unknown (HELO cut?X-Injected:?yes) (::1)",
                            b"Received: from unknown (HELO h??llo.example) (127.0.0.1)"], received
        assert not any(b"\nX-Injected" in t for t in texts)
    finally:
        inst.destroy()
