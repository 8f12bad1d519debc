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
client retries over TCP.  Binds port 0 on the given address and reports the port (or
the port given: a resolver that cannot be told a port, such as OpenDKIM's, needs 53).
TXT values are zone-file text; :func:`txt` quotes a long value as several strings.

A name may also map to ``"GARBAGE"`` (answered with a malformed message), and the whole
server can misbehave: ``server.behaviour = Behaviour.SILENT`` (it reads every query and
never answers, like a dead or firewalled resolver) or ``Behaviour.GARBAGE`` (every answer
is broken: random bytes, a bare header, a record with a bad length, the wrong question,
a truncated message — in turn, see :func:`garbage`).  The behaviour can be changed while
the server runs.
"""

from __future__ import annotations

import enum
import random
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


class Behaviour(enum.Enum):
    NORMAL = "normal"
    SILENT = "silent"    # never answers
    GARBAGE = "garbage"  # answers every query with a broken message


GARBAGE_KINDS = 6


def garbage(query: bytes, kind: int, rng: random.Random) -> bytes:
    """A broken answer to ``query`` (wire bytes); ``kind`` picks how it is broken."""
    qid = query[:2] if len(query) >= 2 else b"\0\0"
    kind %= GARBAGE_KINDS
    if kind == 0:  # noise, not even a header
        return rng.randbytes(rng.randint(1, 11))
    if kind == 1:  # right id, response bit, then noise claiming many records
        return qid + b"\x81\x80" + b"\x00\x01\xff\xff\xff\xff\x00\x00" + rng.randbytes(40)
    if kind == 2:  # the question echoed, then an A record whose RDLENGTH lies
        question = query[12:] if len(query) > 12 else b"\x00\x00\x01\x00\x01"
        return (qid + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question
                + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x09\x7f\x00\x00")
    if kind == 3:  # an answer to a different question
        other = dns.message.make_query("garbage.invalid.", "A")
        other.id = int.from_bytes(qid, "big")
        resp = dns.message.make_response(other)
        resp.answer.append(dns.rrset.from_text("garbage.invalid.", 60, "IN", "A", "192.0.2.66"))
        return resp.to_wire()
    if kind == 4:  # a valid answer cut in the middle
        try:
            q = dns.message.from_wire(query)
            resp = dns.message.make_response(q)
            resp.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "TXT",
                                                   '"' + "x" * 200 + '"'))
            wire = resp.to_wire()
            return wire[: len(wire) // 2]
        except dns.exception.DNSException:
            return qid
    # a compression pointer loop in the answer's owner name
    return qid + b"\x81\x80\x00\x00\x00\x01\x00\x00\x00\x00" + b"\xc0\x0c\x00\x01\x00\x01"


def _truncated(query: bytes) -> bytes | None:
    """An empty answer with TC set: "ask me again over TCP"."""
    try:
        resp = dns.message.make_response(dns.message.from_wire(query))
    except dns.exception.DNSException:
        return None
    resp.flags |= dns.flags.TC
    return resp.to_wire()


def txt(value: str) -> str:
    """A TXT value as zone-file text: quoted strings of at most 255 characters each."""
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class DnsServer:
    def __init__(self, zone: Zone, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.behaviour = Behaviour.NORMAL
        self.garbage_sent = 0
        self.udp_garbage_then_tc = False
        self._rng = random.Random(8)

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
            self.udp.bind((self.host, self.port))
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
        if self.behaviour is Behaviour.SILENT:
            self._note(data)
            return None
        if self.behaviour is Behaviour.GARBAGE or self._wants_garbage(data):
            self._note(data)
            self.garbage_sent += 1
            if limit is not None:
                # A resolver drops a malformed UDP answer and keeps waiting (that is only
                # a timeout): send the garbage, then a truncated answer, so that it asks
                # again over TCP and has to parse the garbage it gets there.
                self.udp_garbage_then_tc = True
                return garbage(data, self.garbage_sent, self._rng)
            return garbage(data, self.garbage_sent, self._rng)
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

    def _note(self, data: bytes) -> None:
        """Record a query the server will not answer properly (for assertions)."""
        try:
            q = dns.message.from_wire(data).question[0]
            self.queries.append((q.name.to_text(omit_final_dot=True).lower(),
                                 dns.rdatatype.to_text(q.rdtype)))
        except (dns.exception.DNSException, IndexError):
            self.queries.append(("?", "?"))

    def _wants_garbage(self, data: bytes) -> bool:
        try:
            q = dns.message.from_wire(data).question[0]
        except (dns.exception.DNSException, IndexError):
            return False
        return self.zone.get(q.name.to_text(omit_final_dot=True).lower()) == "GARBAGE"

    def _serve_udp(self) -> None:
        while not self.stopping:
            try:
                data, addr = self.udp.recvfrom(65535)
            except OSError:
                return
            if addr is None or self.stopping:  # woken by stop()'s shutdown
                return
            self.udp_garbage_then_tc = False
            wire = self._reply_wire(data, limit=512)
            if wire is not None:
                self.udp.sendto(wire, addr)
            if self.udp_garbage_then_tc:
                tc = _truncated(data)
                if tc is not None:
                    self.udp.sendto(tc, addr)

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

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
