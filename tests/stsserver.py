"""A real HTTPS server for MTA-STS policies in tests (Python's ssl + http.server).

It serves ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` for every domain it is
given a :class:`Site` for, with a certificate from a test CA (tests/certs.py) chosen by
SNI: normally for ``mta-sts.<domain>``, or for other names (``Site.cert_names``: the
wrong-name case).  A site can also answer with another status or Content-Type, a
redirect (``location``), a body of any size or shape, or hang (``hang="handshake"``:
accepts the TCP connection and never speaks TLS; ``hang="answer"``: reads the request
and never answers).  Every request is noted in ``requests`` as (host, path).

The policy URL has no port, so the server binds port 443 of an address the test
chooses (a 127.x.y.z of its own, or an address inside a network namespace it made);
that needs root.  TLS is done in the connection's thread, so a client that stalls in
the handshake holds up nobody else.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from certs import CA, cert_pem, key_pem


@dataclass
class Site:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain"
    location: str = ""                          # a Location header (a redirect with a 3xx)
    hang: str = ""                              # "", "handshake" or "answer"
    cert_names: tuple[str, ...] | None = None   # None: mta-sts.<domain>


def policy(mode: str, *mx: str, max_age: int = 86400, newline: str = "\r\n") -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return (newline.join(lines) + newline).encode()


@dataclass
class StsServer:
    ca: CA
    address: str
    port: int = 443
    sites: dict[str, Site] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="stsserver-")
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ certificates by SNI
    def _context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        if names not in self._contexts:
            issued = self.ca.server(*names)
            path = Path(self._dir.name) / f"{len(self._contexts)}.pem"
            path.write_bytes(cert_pem(issued.cert) + key_pem(issued.key))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(path)
            ctx.sni_callback = self._sni
            self._contexts[names] = ctx
        return self._contexts[names]

    def site_for(self, host: str) -> tuple[str, Site | None]:
        domain = host.lower().removeprefix("mta-sts.")
        return domain, self.sites.get(domain)

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        domain, site = self.site_for(name or "")
        if site is not None:
            sslobj.context = self._context(site.cert_names or (f"mta-sts.{domain}",))

    # ------------------------------------------------------------ serving
    def start(self) -> StsServer:
        outer = self
        default = self._context(("default.invalid",))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one answer, then the connection closes

            def do_GET(self) -> None:
                host = self.headers.get("Host", "")
                outer.requests.append((host, self.path))
                _domain, site = outer.site_for(host)
                if site is None or self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                if site.hang == "answer":
                    outer._stop.wait(60)
                    return
                self.send_response(site.status)
                if site.content_type:
                    self.send_header("Content-Type", site.content_type)
                if site.location:
                    self.send_header("Location", site.location)
                self.send_header("Content-Length", str(len(site.body)))
                self.end_headers()
                self.wfile.write(site.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in outer.address else socket.AF_INET

            def finish_request(self, request: Any, client_address: Any) -> None:
                sock: socket.socket = request
                # a site that hangs before TLS: known only from the SNI, so peek at it
                sock.settimeout(10)
                try:
                    hello = sock.recv(4096, socket.MSG_PEEK)
                except OSError:
                    return
                if any(s.hang == "handshake" and f"mta-sts.{d}".encode() in hello
                       for d, s in outer.sites.items()):
                    outer._stop.wait(60)
                    return
                try:
                    tls = default.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                super().finish_request(tls, client_address)

        self._server = Server((self.address, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._dir.cleanup()

    def __enter__(self) -> StsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
