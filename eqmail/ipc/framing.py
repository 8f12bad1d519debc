"""The framing every stream socket between eqmail's processes uses, and its helpers.

A frame is a type byte, a 4-byte big-endian length, then the payload.  Lengths are
bounded per type (``MAX_FRAME``); a peer that sends a bigger frame, an unknown type or a
truncated frame is dropped: every such fault raises :class:`ProtocolError` and nothing
else.  No worker trusts another's input (STYLE "Interfaces between processes").

The frame types of run/queue.sock are eqmail.ipc.queue's messages; those of the
delivery sockets are the scanner's and the delivery workers' (eqmail.workers.jobs).
The plugin sandbox's sockets use the same header with their own bounded types
(eqmail.ipc.sandbox), and run/status.sock is line-based (eqmail.ipc.status).

Also here: the peer check of a Unix socket (SO_PEERCRED), which every socket served
to one set of uids (the delivery sockets, the sandbox's) goes through.
"""

from __future__ import annotations

import asyncio
import socket
import struct

HEADER = struct.Struct(">cI")
SLOT_MAX = 64  # bytes of a delivery request's slot

MAX_FRAME: dict[bytes, int] = {
    # run/queue.sock (eqmail.ipc.queue)
    b"H": 64,
    b"B": 1 << 20,
    b"E": 64 << 20,
    b"C": 128,
    b"R": 128,
    b"K": 1,
    b"P": 64 << 10,  # QueuePrepend (issue 16): header fields the listener adds at commit
    # delivery sockets
    b"D": 64 << 10,
    b"r": 16 << 10,
    b"A": 0,
    b"a": SLOT_MAX,
    b"e": 0,
    b"Q": 0,
    b"q": 0,
}


class ProtocolError(Exception):
    """A peer broke the protocol (framing or a message's fields); the connection must
    be dropped.  The only exception a message's ``decode`` raises."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    limit = MAX_FRAME.get(kind)
    if limit is None or len(payload) > limit:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes not allowed")
    return HEADER.pack(kind, len(payload)) + payload


def check_header(header: bytes) -> tuple[bytes, int]:
    """``(type, length)`` of a frame header of HEADER.size bytes; ProtocolError for an
    unknown type or a length over its bound."""
    if len(header) != HEADER.size:
        raise ProtocolError("truncated frame header")
    kind, length = HEADER.unpack(header)
    limit = MAX_FRAME.get(kind)
    if limit is None:
        raise ProtocolError(f"unknown frame type {kind!r}")
    if length > limit:
        raise ProtocolError(f"frame {kind!r} too long ({length} > {limit})")
    return kind, length


def next_frame(buf: bytes | bytearray, pos: int = 0) -> tuple[bytes, bytes, int] | None:
    """``(type, payload, end)`` of the frame starting at ``pos`` in ``buf``, or None
    while it is incomplete.  ProtocolError for an unknown or over-long frame."""
    if len(buf) - pos < HEADER.size:
        return None
    kind, length = check_header(bytes(buf[pos : pos + HEADER.size]))
    start = pos + HEADER.size
    if len(buf) - start < length:
        return None
    return kind, bytes(buf[start : start + length]), start + length


def take_frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Every complete frame at the start of ``buf`` (removed from it); an incomplete
    one stays for the next read.  ProtocolError for an unknown or over-long frame."""
    frames: list[tuple[bytes, bytes]] = []
    pos = 0
    while (got := next_frame(buf, pos)) is not None:
        kind, payload, pos = got
        frames.append((kind, payload))
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
    """The next frame on a blocking socket."""
    kind, length = check_header(recv_exact(sock, HEADER.size))
    return kind, recv_exact(sock, length) if length else b""


async def read_frame_async(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next frame from an asyncio stream.  Raises asyncio.IncompleteReadError when
    the stream ends first."""
    kind, length = check_header(await reader.readexactly(HEADER.size))
    return kind, await reader.readexactly(length) if length else b""


def expect(kind: bytes, got: bytes) -> None:
    """ProtocolError unless a frame read where ``kind`` must come is of that type."""
    if got != kind:
        raise ProtocolError(f"unexpected frame {got!r} (expected {kind!r})")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
