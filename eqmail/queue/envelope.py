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

ADDR_MAX = 1003  # qmail-queue: an address incl. its terminator longer than this -> exit 11


class EnvelopeError(Exception):
    """The envelope is malformed (exit 91) or an address too long (exit 11)."""

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
    """qmail-queue's envelope reader: 91 for bad format, 11 for an over-long address."""
    if not data.endswith(b"\0\0") and data != b"":
        # EOF before the final NUL: qmail-queue aborts without queueing.
        raise EnvelopeError(91, "envelope not terminated")
    if not data.startswith(b"F"):
        raise EnvelopeError(91, "envelope does not start with F")
    records = data[:-1].split(b"\0")[:-1]
    if any(len(rec) + 1 > ADDR_MAX for rec in records):
        raise EnvelopeError(11, "address too long")
    sender = decode(records[0][1:])
    recips: list[str] = []
    for rec in records[1:]:
        if not rec.startswith(b"T"):
            raise EnvelopeError(91, "recipient record does not start with T")
        recips.append(decode(rec[1:]))
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
