#!/usr/bin/env python3
"""Send N copies of one message file over SMTP, S sessions at a time, one TCP connection
per message (as smtp-source does), and time it (bench/auth.sh).

smtp-source cannot send a given message, and bench/auth.sh needs a DKIM-signed one (the
signature must verify, so every copy is the same bytes).  The dialogue per connection:
greeting, EHLO, then MAIL, RCPT and DATA pipelined (both servers offer PIPELINING), the
message, ``.``, QUIT.  Any reply but the expected ones counts as an error.

Prints one JSON line: messages, sessions, size, accept_s / accept_mps (until the last
``.`` got its 250), e2e_s / e2e_mps (until N new files are in --poll-dir, if given),
errors (with the first few replies), client_cpu_s.  Loopback targets only; stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import resource
import sys
import time


def count_files(d: str) -> int:
    try:
        with os.scandir(d) as it:
            return sum(1 for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One (possibly multi-line) reply; its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def one(host: str, port: int, mail_from: str, to: str, data: bytes) -> bytes | None:
    """None when the message was accepted, else the offending reply."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if not (r := await reply(reader)).startswith(b"220"):
            return r
        writer.write(b"EHLO load.bench.test\r\n")
        if not (r := await reply(reader)).startswith(b"250"):
            return r
        writer.write(f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n".encode())
        for want in (b"250", b"250", b"354"):
            if not (r := await reply(reader)).startswith(want):
                return r
        writer.write(data)
        if not (r := await reply(reader)).startswith(b"250"):
            return r
        writer.write(b"QUIT\r\n")
        await reply(reader)
        return None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def load(args: argparse.Namespace, data: bytes) -> tuple[float, list[bytes]]:
    host, _, port = args.target.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit("only loopback targets")
    todo = iter(range(args.n))
    errors: list[bytes] = []

    async def session() -> None:
        for _ in todo:
            try:
                bad = await one(host, int(port), args.sender, args.to, data)
            except OSError as e:
                bad = repr(e).encode()
            if bad is not None:
                errors.append(bad)

    began = time.monotonic()
    await asyncio.gather(*(session() for _ in range(args.sessions)))
    return time.monotonic() - began, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT (loopback)")
    p.add_argument("--sender", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--message", required=True, help="file: the message (LF or CRLF)")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("-s", "--sessions", type=int, default=10)
    p.add_argument("--poll-dir", default="-", help="directory where N new files appear, or -")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--label", default="")
    args = p.parse_args()
    with open(args.message, "rb") as f:
        text = re.sub(rb"\r?\n", b"\r\n", f.read())
    data = re.sub(rb"(?m)^\.", b"..", text) + b".\r\n"  # dot-stuffed, then the end line
    poll = args.poll_dir if args.poll_dir != "-" else None
    base = count_files(poll) if poll else 0
    began = time.monotonic()
    accept_s, errors = asyncio.run(load(args, data))
    e2e_s = None
    if poll:
        want = base + args.n - len(errors)
        while count_files(poll) < want and time.monotonic() - began < args.timeout:
            time.sleep(0.02)
        if count_files(poll) >= want:
            e2e_s = time.monotonic() - began
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "label": args.label, "messages": args.n, "sessions": args.sessions, "size": len(text),
        "accept_s": round(accept_s, 3), "accept_mps": round(args.n / accept_s, 1),
        "e2e_s": None if e2e_s is None else round(e2e_s, 3),
        "e2e_mps": None if e2e_s is None else round(args.n / e2e_s, 1),
        "delivered": (count_files(poll) - base) if poll else None,
        "errors": len(errors), "first_errors": [e.decode("latin-1")[:200] for e in errors[:3]],
        "client_cpu_s": round(cpu.ru_utime + cpu.ru_stime, 2)}))


if __name__ == "__main__":
    main()
