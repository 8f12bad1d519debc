"""Queue records: qmail's NUL-terminated, one-letter-tagged envelope formats.

- qmail-queue input (fd 1): ``F<sender>\\0`` then ``T<recipient>\\0``... then ``\\0``.
- todo/intd files: ``u<uid>\\0p<pid>\\0F<sender>\\0T<rcpt>\\0...`` (no final extra NUL).
- info files: ``F<sender>\\0``.
- local/remote channel files: ``T<addr>\\0`` (to do) or ``D<addr>\\0`` (done).

Pure functions on bytes; addresses are returned as ``str`` via eqmail.textio so that any
byte sequence round-trips.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.textio import decode, encode

ADDR_MAX = 1003  # qmail-queue: an address needs its NUL within this many bytes, else exit 11


class EnvelopeError(Exception):
    """The envelope is malformed (exit 91), an address too long (exit 11) or the
    envelope truncated (exit 54, qmail-queue's read error)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]

    def encode_for_queue(self) -> bytes:
        """The bytes a client sends to the queue writer (qmail-queue's fd 1)."""
        parts = [b"F", encode(self.sender), b"\0"]
        for r in self.recipients:
            parts += [b"T", encode(r), b"\0"]
        parts.append(b"\0")
        return b"".join(parts)


def parse_queue_envelope(data: bytes) -> Envelope:
    """qmail-queue's envelope reader, byte for byte as qmail-queue.c reads fd 1.

    First byte not ``F`` or a record not starting with ``T``: 91.  An address with no
    NUL within its first ADDR_MAX bytes (i.e. longer than 1002 bytes): 11.  The data
    ending before the terminating extra NUL: 54 (qmail-queue's die_read).  Anything
    after the terminating NUL is not read.  (The earlier version checked the length
    with the tag letter included, refusing a 1002-byte address qmail accepts, and
    called a truncated envelope 91.)
    """
    pos = 0

    def address() -> str:
        nonlocal pos
        end = data.find(b"\0", pos, pos + ADDR_MAX)
        if end < 0:
            if len(data) - pos >= ADDR_MAX:
                raise EnvelopeError(11, "address too long")
            raise EnvelopeError(54, "envelope ends inside an address")
        value = decode(data[pos:end])
        pos = end + 1
        return value

    if not data:
        raise EnvelopeError(54, "empty envelope")
    if data[:1] != b"F":
        raise EnvelopeError(91, "envelope does not start with F")
    pos = 1
    sender = address()
    recips: list[str] = []
    while True:
        if pos >= len(data):
            raise EnvelopeError(54, "envelope not terminated")
        tag = data[pos : pos + 1]
        pos += 1
        if tag == b"\0":
            break
        if tag != b"T":
            raise EnvelopeError(91, "recipient record does not start with T")
        recips.append(address())
    return Envelope(sender, tuple(recips))


def todo_bytes(uid: int, qp: int, env: Envelope) -> bytes:
    parts = [f"u{uid}\0p{qp}\0".encode(), b"F", encode(env.sender), b"\0"]
    for r in env.recipients:
        parts += [b"T", encode(r), b"\0"]
    return b"".join(parts)


@dataclass(frozen=True)
class TodoRecord:
    kind: str  # one letter
    value: str


def parse_records(data: bytes) -> list[TodoRecord]:
    """Split a todo/info/channel file into records.  A trailing record without its NUL
    (a crash mid-write) is dropped."""
    out: list[TodoRecord] = []
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\0", pos)
        if end < 0:
            break
        rec = data[pos:end]
        pos = end + 1
        if rec:
            out.append(TodoRecord(chr(rec[0]), decode(rec[1:])))
    return out


@dataclass(frozen=True)
class ChannelRecord:
    offset: int  # byte offset of the T/D letter: where the done marker is written
    done: bool
    address: str


def parse_channel(data: bytes) -> list[ChannelRecord]:
    out: list[ChannelRecord] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\0", pos)
        if end < 0:
            break
        rec = data[pos:end]
        if rec[:1] in (b"T", b"D"):
            out.append(ChannelRecord(pos, rec[:1] == b"D", decode(rec[1:])))
        pos = end + 1
    return out
