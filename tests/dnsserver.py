"""A small authoritative DNS server for tests (dnspython + sockets, UDP and TCP).

The zone is data::

    {"example.net": {"MX": [(10, "mx.example.net")]},
     "mx.example.net": {"A": ["10.99.0.2"], "AAAA": ["fd99::2"]},
     "alias.example.net": {"CNAME": "example.net"},
     "broken.example.net": "SERVFAIL",
     "slow.example.net": "TIMEOUT"}          # never answered

A name absent from the zone is NXDOMAIN; a present name without the asked type is an
empty NOERROR answer.  In-zone CNAMEs are chased in the answer like a real
authoritative server does.  Answers too big for UDP are sent truncated (TC), so the
client retries over TCP.  Binds port 0 on the given address and reports the port.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, Any]


class DnsServer:
    def __init__(self, zone: Zone, host: str = "127.0.0.1") -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self.stopping = False
        self.threads: list[threading.Thread] = []

    # ------------------------------------------------------------ answers
    def _records(self, name: str, rdtype: str) -> list[str]:
        entry = self.zone.get(name)
        if not isinstance(entry, dict) or rdtype not in entry:
            return []
        value = entry[rdtype]
        if rdtype == "MX":
            return [f"{p} {n.rstrip('.')}." for p, n in value]
        if rdtype == "CNAME":
            return [value.rstrip(".") + "."]
        return list(value)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        entry = self.zone.get(name)
        if entry == "TIMEOUT":
            return None
        if entry == "SERVFAIL":
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp
        if entry is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
            return resp
        for _ in range(10):  # chase in-zone CNAMEs
            cname = self._records(name, "CNAME")
            if cname and rdtype != "CNAME":
                resp.answer.append(self._rrset(name, "CNAME", cname))
                name = cname[0].rstrip(".").lower()
                if self.zone.get(name) is None:
                    break
                continue
            recs = self._records(name, rdtype)
            if recs:
                resp.answer.append(self._rrset(name, rdtype, recs))
            break
        return resp

    @staticmethod
    def _rrset(name: str, rdtype: str, values: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(name + ".", 60, "IN", rdtype, values)

    # ------------------------------------------------------------ serving
    def start(self) -> int:
        """Bind (in the caller's network namespace) and serve; returns the port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.bind((self.host, 0))
            port = self.udp.getsockname()[1]
            self.tcp = socket.socket(family, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((self.host, port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.port = port
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)
        return port

    def _reply_wire(self, data: bytes, limit: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        resp = self.answer(query)
        if resp is None:
            return None
        if limit is None:
            return resp.to_wire(max_size=65535)
        size = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return resp.to_wire(max_size=size)
        except dns.exception.TooBig:
            resp.answer.clear()
            resp.flags |= dns.flags.TC
            return resp.to_wire()

    def _serve_udp(self) -> None:
        while not self.stopping:
            try:
                data, addr = self.udp.recvfrom(65535)
            except OSError:
                return
            wire = self._reply_wire(data, limit=512)
            if wire is not None:
                self.udp.sendto(wire, addr)

    def _serve_tcp(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                head = conn.recv(2)
                (length,) = struct.unpack(">H", head)
                data = b""
                while len(data) < length:
                    chunk = conn.recv(length - len(data))
                    if not chunk:
                        return
                    data += chunk
                wire = self._reply_wire(data, limit=None)
                if wire is not None:
                    conn.sendall(struct.pack(">H", len(wire)) + wire)
            except (OSError, struct.error):
                return

    def stop(self) -> None:
        self.stopping = True
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
