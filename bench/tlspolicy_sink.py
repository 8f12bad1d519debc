#!/usr/bin/env python3
"""The STARTTLS sink of bench/tlspolicy.sh: the shared aiosmtpd sink's Maildir writer
(../shared/bench/aiosmtpd_sink.py, MaildirSink: tmp/ then rename to new/, here without
fsync) behind an aiosmtpd server that offers STARTTLS with a given certificate.

The shared sink cannot do TLS and binds only 127.0.0.1 or ::1; this one binds the
loopback address the bench's DNS gives mx.relay.test (port 25, the port remote
delivery uses for an MX host).  TLS is offered, not required: eqmail's opportunistic
variant and its DANE/MTA-STS variant meet the same server.

  tlspolicy_sink.py --host 127.x.y.z --port 25 --maildir DIR --cert PEM --shared DIR

PEM holds the certificate, then its key.  Run with a python that has aiosmtpd (the
bench's sink venv).  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
import ssl
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=25)
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--cert", required=True, help="certificate then key, PEM")
    ap.add_argument("--shared", required=True, help="directory of the shared aiosmtpd_sink.py")
    args = ap.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        sys.exit("refusing to listen anywhere but loopback")
    sys.path.insert(0, args.shared)
    from aiosmtpd.smtp import SMTP
    from aiosmtpd_sink import MaildirSink

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert)
    handler = MaildirSink(args.maildir, "none", False)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    sock.setblocking(False)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="mx.relay.test", ident="tlspolicy-bench-sink",
                         tls_context=ctx, require_starttls=False, data_size_limit=33554432),
            sock=sock)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"STARTTLS sink on {args.host}:{args.port} maildir={args.maildir}", flush=True)
        async with server:
            await stop.wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
