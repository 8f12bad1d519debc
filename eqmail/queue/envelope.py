"""Queue records: qmail's NUL-terminated, one-letter-tagged envelope formats.

- qmail-queue input (fd 1): a frame payload of run/queue.sock, so its reader and writer
  are eqmail.ipc.queue.QueueEnvelope's.
- todo/intd files: ``u<uid>\\0p<pid>\\0F<sender>\\0T<rcpt>\\0...`` (no final extra NUL).
- info files: ``F<sender>\\0``.
- local/remote channel files: ``T<addr>\\0`` (to do) or ``D<addr>\\0`` (done).

Pure functions on bytes; addresses are returned as ``str`` via eqmail.textio so that any
byte sequence round-trips.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.textio import decode, encode


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]


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
