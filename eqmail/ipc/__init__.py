"""The message protocol between eqmail's processes, in one place.

Every byte stream between workers uses one framing: a type byte, a 4-byte big-endian
length, then the payload.  Lengths are bounded per type; a peer that sends a bigger
frame, an unknown type or a truncated frame is dropped.  No worker trusts another's
input (STYLE "Interfaces between processes").

Queue writer socket (run/queue.sock, world-connectable):
  client -> writer   ``H`` role hello (optional; honoured only from a peer with the
                     writer's own uid or root: "network", "bounce", "alias", "local")
                     ``B`` body chunk (<= 1 MiB) — the message, streamed
                     ``E`` envelope, qmail-queue's fd-1 format ``F<s>\\0T<r>\\0...\\0``;
                     ends the message, the writer commits and answers
                     ``C`` clean request (qmail-clean: ``foop/<id>``, ``todo/<n>/<id>``),
                     only from the scanner's uid
  writer -> client   ``R`` result: ASCII ``<exit code> <qp> <msgid>``
                     ``K`` clean answer: one byte ``+`` / ``!`` / ``x``

Delivery sockets (run/local.sock and run/remote.sock, scanner only; eqmail.workers.local
and eqmail.workers.remote), served through eqmail.workers.jobs:
  scanner -> worker  ``D`` delivery request ``slot\0msgid\0sender\0recipient\0``; the slot
                     names the delivery and comes back in its report.  The scanner's slot
                     is ``msgid.offset`` (the recipient's record in the channel file), a
                     name that stays valid when the scanner is restarted
                     ``A`` attach (empty): "I am the scanner now"
                     ``Q`` detach (empty): a scanner that hands over, before it exits
  worker -> scanner  ``r`` report ``slot\0`` + K/Z/D + text, exactly one per request
                     ``a`` the slot of a delivery this scanner takes over: still running,
                     or finished with a report nobody has received yet (sent next);
                     answers ``A``, followed by ``e`` (empty) at the end of the list
                     ``q`` (empty) answers ``Q``: nothing more comes on this connection
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass

from eqmail.logformat import LogFormat

HEADER = struct.Struct(">cI")
SLOT_MAX = 64  # bytes of a delivery request's slot

MAX_FRAME: dict[bytes, int] = {
    b"H": 64,
    b"B": 1 << 20,
    b"E": 64 << 20,
    b"C": 128,
    b"R": 128,
    b"K": 1,
    b"D": 64 << 10,
    b"r": 16 << 10,
    b"A": 0,
    b"a": SLOT_MAX,
    b"e": 0,
    b"Q": 0,
    b"q": 0,
    b"S": 1 << 20,  # status request/answer
}


class ProtocolError(Exception):
    """A peer broke the framing; the connection must be dropped."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    limit = MAX_FRAME.get(kind)
    if limit is None or len(payload) > limit:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes not allowed")
    return HEADER.pack(kind, len(payload)) + payload


def check_header(header: bytes) -> tuple[bytes, int]:
    kind, length = HEADER.unpack(header)
    limit = MAX_FRAME.get(kind)
    if limit is None:
        raise ProtocolError(f"unknown frame type {kind!r}")
    if length > limit:
        raise ProtocolError(f"frame {kind!r} too long ({length} > {limit})")
    return kind, length


def take_frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Every complete frame at the start of ``buf`` (removed from it); an incomplete
    one stays for the next read.  ProtocolError for an unknown or over-long frame."""
    frames: list[tuple[bytes, bytes]] = []
    pos = 0
    while len(buf) - pos >= HEADER.size:
        kind, length = check_header(bytes(buf[pos : pos + HEADER.size]))
        start = pos + HEADER.size
        if len(buf) - start < length:
            break
        frames.append((kind, bytes(buf[start : start + length])))
        pos = start + length
    del buf[:pos]
    return frames


def accept_from(listener: socket.socket, allowed_uids: set[int]) -> socket.socket | None:
    """Accept one connection, non-blocking, only from a peer whose uid is allowed
    (SO_PEERCRED); anyone else is closed at once."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    if peer_uid(conn) not in allowed_uids:
        conn.close()
        return None
    conn.setblocking(False)
    return conn


def read_frames(conn: socket.socket, buf: bytearray, kinds: bytes) -> list[tuple[bytes, bytes]] | None:
    """The frames now readable on a non-blocking connection whose type is one of the
    bytes of ``kinds``; None when the peer closed it.  ProtocolError for any other frame."""
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return []
    except OSError:
        data = b""
    if not data:
        return None
    buf += data
    frames = take_frames(buf)
    for got, _payload in frames:
        if got not in kinds:  # one byte: a membership test
            raise ProtocolError(f"unexpected frame {got!r}")
    return frames


def read_requests(conn: socket.socket, buf: bytearray, kind: bytes = b"D") -> list[bytes] | None:
    """The payloads of ``kind`` frames now readable on a non-blocking connection; None
    when the peer closed it.  ProtocolError for any other frame."""
    frames = read_frames(conn, buf, kind)
    return None if frames is None else [payload for _kind, payload in frames]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = check_header(recv_exact(sock, HEADER.size))
    return kind, recv_exact(sock, length) if length else b""


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class QQExit(enum.IntEnum):
    """qmail-queue's exit codes (qmail-core §1.2)."""

    OK = 0
    ADDR_TOO_LONG = 11
    PERM_REFUSED = 31
    NO_MEMORY = 51
    TIMEOUT = 52
    WRITE_ERROR = 53
    READ_ERROR = 54
    CONFIG = 55
    NETWORK = 56
    HOME_DIR = 61
    QUEUE_DIR = 62
    PID_DIR = 63
    MESS_DIR = 64
    INTD_DIR = 65
    TODO_DIR = 66
    TEMP_REJECT = 71
    TIMED_OUT = 72
    REFUSED = 73
    COMM_FAILED = 74
    BUG = 81
    BAD_ENVELOPE = 91
    CANNOT_EXEC = 120


def qq_text(code: int) -> str:
    """qmail.c's qmail_close() text for an exit code, with its leading D (permanent) or
    Z (temporary) letter."""
    fixed = {
        0: "",
        11: "Denvelope address too long for qq (#5.1.3)",
        115: "Denvelope address too long for qq (#5.1.3)",
        31: "Dmail server permanently rejected message (#5.3.0)",
        51: "Zqq out of memory (#4.3.0)",
        52: "Zqq timeout (#4.3.0)",
        53: "Zqq write error or disk full (#4.3.0)",
        54: "Zqq read error (#4.3.0)",
        55: "Zqq unable to read configuration (#4.3.0)",
        56: "Zqq trouble making network connection (#4.3.0)",
        61: "Zqq trouble in home directory (#4.3.0)",
        71: "Zmail server temporarily rejected message (#4.3.0)",
        72: "Zconnection to mail server timed out (#4.4.1)",
        73: "Zconnection to mail server rejected (#4.4.1)",
        74: "Zcommunication with mail server failed (#4.4.2)",
        81: "Zqq internal bug (#4.3.0)",
        91: "Zqq internal bug (#4.3.0)",
        120: "Zunable to exec qq (#4.3.0)",
    }
    if code in fixed:
        return fixed[code]
    if 62 <= code <= 66:
        return "Zqq trouble creating files in queue (#4.3.0)"
    if 11 <= code <= 40:
        return "Dqq permanent problem (#5.3.0)"
    return "Zqq temporary problem (#4.3.0)"


@dataclass(frozen=True)
class QueueAnswer:
    code: int
    qp: int
    msgid: int

    def encode(self) -> bytes:
        return f"{self.code} {self.qp} {self.msgid}".encode()

    @classmethod
    def decode(cls, payload: bytes) -> QueueAnswer:
        try:
            code, qp, msgid = (int(x) for x in payload.split(b" "))
        except ValueError:
            raise ProtocolError("malformed queue answer") from None
        return cls(code, qp, msgid)


# ---------------------------------------------------------------- supervisor -> logger
# A SOCK_SEQPACKET socketpair; the supervisor sends one ``LogTarget`` per message (at
# start-up the logger gets its first target in its context instead), with the output
# fd attached by SCM_RIGHTS when the target is a file or stdout.  The logger switches
# between two reads of the log pipe, so every line goes wholly to the old or the new
# output.


class LogSink(enum.StrEnum):
    FILE = "file"          # control/logfile names a file (or the background start's log)
    STDOUT = "stdout"      # the supervisor's stdout (a terminal, daemontools, a pipe)
    JOURNAL = "journal"    # stdout that is systemd's journal stream: no stamp of ours
    SYSLOG = "syslog"      # control/logfile says syslog: facility mail, tag eqmail


MAX_LOG_TARGET = 64


@dataclass(frozen=True)
class LogTarget:
    sink: LogSink
    fmt: LogFormat

    @property
    def has_fd(self) -> bool:
        return self.sink is not LogSink.SYSLOG

    def encode(self) -> bytes:
        return f"{self.sink} {self.fmt}".encode()

    @classmethod
    def decode(cls, payload: bytes) -> LogTarget:
        try:
            sink, fmt = payload.decode("ascii").split(" ")
            return cls(LogSink(sink), LogFormat(fmt))
        except ValueError:
            raise ProtocolError("malformed log target") from None
