"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2): a pure parser.

Owns: :class:`ProxyParser`, fed the first bytes of a connection that a trusted load
balancer opened, which tells how many of them belong to the header and, once the
header is complete, the :class:`ProxyHeader` -- the real client's address and port and
the address it connected to, or none for the balancer's own connections (v1
``PROXY UNKNOWN``, v2 ``LOCAL``: health checks, which are served as the balancer).
:func:`encode_v1` and :func:`encode_v2` write headers (the tests' round trips; nothing
in eqmail sends one).

Why a count of consumed bytes: the listener peeks at the socket, feeds the peeked bytes
and then reads exactly the count the parser took, so the bytes after the header -- a
TLS ClientHello on SMTPS, commands a client pipelined early -- stay in the kernel for
the TLS layer or the session, neither lost nor read twice.  The parser never takes a
byte past the header: a v1 header ends at its CR LF, a v2 header after 16 + its length
field bytes.

Bounds: a v1 header is at most 107 bytes (the specification's limit, CR LF included), a
v2 header at most ``16 + V2_MAX_PAYLOAD`` (addresses and TLVs; the specification
allows 64 KiB, a balancer sends a few dozen bytes).  TLVs are walked for their
structure (one running past the header is malformed) and otherwise ignored, as the
specification asks of a receiver that does not know them.

Failure modes: bytes that are not a valid header raise :class:`ProxyError`, and
nothing else; its ``reason`` is one of a few fixed texts (never client bytes), so a log
line or a per-reason counter stays bounded.  No I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes, "PROXY" to CR LF inclusive (proxy-protocol.txt 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version+command, family+protocol, length
V2_MAX_PAYLOAD = 1024  # bytes after the 16-byte fixed part: addresses + TLVs
_V4_BLOCK = struct.Struct("!4s4sHH")
_V6_BLOCK = struct.Struct("!16s16sHH")
_UNIX_BLOCK = 216  # two 108-byte sun_path fields
_TLV = struct.Struct("!BH")


class Reason(enum.Enum):
    """Why a header was refused: fixed texts for the log."""

    NOT_PROXY = "not a PROXY protocol header"
    TOO_LONG = "PROXY header too long"
    MALFORMED = "malformed PROXY header"
    VERSION = "unsupported PROXY protocol version"
    NOT_TCP = "PROXY header for a protocol other than TCP"
    TRUNCATED = "truncated PROXY header"


class ProxyError(Exception):
    """The bytes are not an acceptable PROXY header; ``reason`` says why."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Command(enum.Enum):
    PROXY = "proxy"  # relayed for a client: the addresses are the client's
    LOCAL = "local"  # the balancer's own connection (health check), or addresses unknown


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header.  ``source`` is the client's (address, port) and ``destination``
    what it connected to; both None when the balancer speaks for itself (v1
    UNKNOWN, v2 LOCAL, a v2 UNSPEC or UNIX address family)."""

    version: int
    command: Command
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    length: int = 0  # bytes of the whole header

    @property
    def relayed(self) -> bool:
        """True when the header names a client to serve instead of the balancer."""
        return self.source is not None


class ProxyParser:
    """Incremental parser: :meth:`feed` bytes as they arrive (any split); it returns how
    many it consumed, all of them until the header is complete and then only up to
    the header's end.  :attr:`header` is set when complete; :meth:`eof` says the
    connection ended (raises unless complete)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None

    @property
    def done(self) -> bool:
        return self.header is not None

    def want(self) -> int:
        """At most how many more bytes the header can have (0 when complete): the
        size to peek at next."""
        if self.header is not None:
            return 0
        if self._buf[:1] == b"\r":
            return self._v2_want()
        return V1_MAX - len(self._buf)

    def _v2_want(self) -> int:
        if len(self._buf) < V2_HEADER.size:
            return V2_HEADER.size - len(self._buf)  # the fixed part first: it has the length
        return V2_HEADER.size + _v2_length(self._buf) - len(self._buf)

    def feed(self, data: bytes) -> int:
        """Consume the header bytes at the start of ``data``; returns how many."""
        used = 0
        while self.header is None and used < len(data):
            if self._buf[:1] == b"\r" or (not self._buf and data[used:used + 1] == b"\r"):
                # version 2: the fixed part, then exactly the length it announces
                take = min(len(data) - used, self._v2_want())
                self._buf += data[used:used + take]
                used += take
                self._v2_step()
                continue
            chunk = data[used:used + V1_MAX - len(self._buf)]
            end = chunk.find(b"\n")
            if end >= 0:
                chunk = chunk[:end + 1]  # version 1 ends at its LF: not a byte further
            self._buf += chunk
            used += len(chunk)
            self._v1_step()
        return used

    def eof(self) -> None:
        """The connection ended: fine only after a complete header."""
        if self.header is None:
            raise ProxyError(Reason.TRUNCATED if self._buf else Reason.NOT_PROXY)

    # ---- version 1: one text line ------------------------------------------------------

    def _v1_step(self) -> None:
        buf = bytes(self._buf)
        head = min(len(buf), len(V1_PREFIX))
        if buf[:head] != V1_PREFIX[:head]:
            raise ProxyError(Reason.NOT_PROXY)
        if not buf.endswith(b"\n"):
            if len(buf) >= V1_MAX:
                raise ProxyError(Reason.TOO_LONG)
            return
        if not buf.endswith(b"\r\n"):
            raise ProxyError(Reason.MALFORMED)
        self.header = parse_v1_line(buf[:-2])

    # ---- version 2: a binary block -----------------------------------------------------

    def _v2_step(self) -> None:
        buf = bytes(self._buf)
        head = min(len(buf), len(V2_SIGNATURE))
        if buf[:head] != V2_SIGNATURE[:head]:
            raise ProxyError(Reason.NOT_PROXY)
        if len(buf) > 12 and buf[12] >> 4 != 2:  # the version nibble
            raise ProxyError(Reason.VERSION)
        if len(buf) < V2_HEADER.size:
            return
        if _v2_length(buf) > V2_MAX_PAYLOAD:
            raise ProxyError(Reason.TOO_LONG)
        if len(buf) == V2_HEADER.size + _v2_length(buf):
            self.header = parse_v2_block(buf)


def _v2_length(buf: bytes | bytearray) -> int:
    return int.from_bytes(buf[14:16], "big")


def _port(text: bytes) -> int:
    """A v1 port: decimal 0..65535 without a sign or leading zeros."""
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyError(Reason.MALFORMED)
    port = int(text)
    if port > 65535:
        raise ProxyError(Reason.MALFORMED)
    return port


def _address(text: bytes, v6: bool) -> str:
    """A v1 address of the family the header named, as ``ipaddress`` prints it."""
    try:
        raw = text.decode("ascii")
        addr = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(Reason.MALFORMED) from None
    if "%" in raw:  # a zone index names an interface of the balancer, not a client
        raise ProxyError(Reason.MALFORMED)
    return str(addr)


def parse_v1_line(line: bytes) -> ProxyHeader:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT`` or ``PROXY UNKNOWN ...`` without CR LF.
    Single spaces exactly, as the specification writes them."""
    length = len(line) + 2
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, Command.LOCAL, length=length)  # the rest is to be ignored
    words = line.split(b" ")
    if len(words) != 6 or words[0] != b"PROXY" or words[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError(Reason.MALFORMED)
    v6 = words[1] == b"TCP6"
    source = (_address(words[2], v6), _port(words[4]))
    destination = (_address(words[3], v6), _port(words[5]))
    return ProxyHeader(1, Command.PROXY, source, destination, length)


def parse_v2_block(buf: bytes) -> ProxyHeader:
    """A whole v2 header (16 bytes + its length field's bytes)."""
    _sig, ver_cmd, fam, length = V2_HEADER.unpack_from(buf, 0)
    payload = buf[V2_HEADER.size:V2_HEADER.size + length]
    total = V2_HEADER.size + length
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: "the receiver must use the real connection endpoints"
        return ProxyHeader(2, Command.LOCAL, length=total)
    if command != 1:
        raise ProxyError(Reason.MALFORMED)
    if fam == 0x00:  # UNSPEC: no address to use, so the balancer's
        return ProxyHeader(2, Command.LOCAL, length=total)
    if fam in (0x12, 0x22, 0x32):
        raise ProxyError(Reason.NOT_TCP)
    if fam == 0x11:
        block, v6 = _V4_BLOCK, False
    elif fam == 0x21:
        block, v6 = _V6_BLOCK, True
    elif fam == 0x31:  # a client on a Unix socket of the balancer: no IP to use
        if length < _UNIX_BLOCK:
            raise ProxyError(Reason.MALFORMED)
        _check_tlvs(payload[_UNIX_BLOCK:])
        return ProxyHeader(2, Command.LOCAL, length=total)
    else:  # the specification: other values must be rejected
        raise ProxyError(Reason.MALFORMED)
    if length < block.size:
        raise ProxyError(Reason.MALFORMED)
    src, dst, sport, dport = block.unpack_from(payload, 0)
    _check_tlvs(payload[block.size:])
    addr = ipaddress.IPv6Address if v6 else ipaddress.IPv4Address
    return ProxyHeader(2, Command.PROXY, (str(addr(src)), sport), (str(addr(dst)), dport), total)


def _check_tlvs(data: bytes) -> None:
    """Walk the TLVs (type, 2-byte length, value): each must fit in the header.  Their
    values are not used (eqmail needs none of them)."""
    at = 0
    while at < len(data):
        if len(data) - at < _TLV.size:
            raise ProxyError(Reason.MALFORMED)
        _type, size = _TLV.unpack_from(data, at)
        at += _TLV.size + size
        if at > len(data):
            raise ProxyError(Reason.MALFORMED)


def parse_header(data: bytes) -> ProxyHeader:
    """The header at the start of ``data`` (which may go on past it); ProxyError when
    there is none or it is incomplete."""
    parser = ProxyParser()
    parser.feed(data)
    parser.eof()
    assert parser.header is not None
    return parser.header


def peer_text(ip: str) -> str:
    """A socket peer address as the logs and the environment show it: an IPv4-mapped
    IPv6 peer (a dual-stack socket) as IPv4, a zone index dropped."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _hostport(ip: str, port: int) -> str:
    ip = peer_text(ip)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def balancer_environment(balancer: tuple[str, int], header: ProxyHeader) -> dict[str, str]:
    """What a session relayed by ``balancer`` (the socket's peer) has besides
    tcpserver's variables, which name the client: PROXYIP and PROXYPORT (the
    balancer), PROXYDESTIP and PROXYDESTPORT (the address the client connected to, on
    the balancer).  Empty for the balancer's own connections, served as a client."""
    if header.source is None or header.destination is None:
        return {}
    return {"PROXYIP": peer_text(balancer[0]), "PROXYPORT": str(balancer[1]),
            "PROXYDESTIP": peer_text(header.destination[0]), "PROXYDESTPORT": str(header.destination[1])}


def via(balancer: tuple[str, int]) -> str:
    """The suffix of a relayed session's log lines: `` via ADDR:PORT`` of the balancer
    (its port finds the connection in the balancer's own log)."""
    return f" via {_hostport(*balancer)}"


# ---- writing headers (for the tests' round trips) ------------------------------------

def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line; without addresses ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination of different families")
    proto = "TCP6" if src.version == 6 else "TCP4"
    return f"PROXY {proto} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None,
              tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A v2 header; without addresses the LOCAL command."""
    tail = b"".join(_TLV.pack(t, len(v)) + v for t, v in tlvs)
    if source is None or destination is None:
        return V2_HEADER.pack(V2_SIGNATURE, 0x20, 0x00, len(tail)) + tail
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination of different families")
    block, fam = (_V6_BLOCK, 0x21) if src.version == 6 else (_V4_BLOCK, 0x11)
    addrs = block.pack(src.packed, dst.packed, source[1], destination[1])
    return V2_HEADER.pack(V2_SIGNATURE, 0x21, fam, len(addrs) + len(tail)) + addrs + tail
