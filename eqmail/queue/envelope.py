"""Queue records: qmail's NUL-terminated, one-letter-tagged envelope formats.

- qmail-queue input (fd 1): a frame payload of run/queue.sock, so its reader and writer
  are eqmail.ipc.queue.QueueEnvelope's.
- todo/intd files: ``u<uid>\\0p<pid>\\0F<sender>\\0T<rcpt>\\0...`` (no final extra NUL),
  then ``Xorigin=<origin>\\0`` for every origin but NETWORK, then ``Xrequiretls=1\\0``
  for a message sent with REQUIRETLS (RFC 8689) (docs/queue-format.md).
- info files: ``F<sender>\\0``, then the same ``X`` records when the todo had them.
- local/remote channel files: ``T<addr>\\0`` (to do) or ``D<addr>\\0`` (done).

Pure functions on bytes; addresses are returned as ``str`` via eqmail.textio so that any
byte sequence round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eqmail.ipc.queue import REQUIRETLS_RECORD, Origin
from eqmail.textio import decode, encode

ORIGIN_KEY = "origin"  # the key of the X record: ``Xorigin=<value>``


@dataclass(frozen=True)
class Envelope:
    """A message's envelope as the queue stores it; ``origin`` is what the queue writer
    believed (eqmail.queue.origin), None for a message that has no record of it;
    ``requiretls``: its delivery must meet RFC 8689 (an ``Xrequiretls=1`` record)."""

    sender: str
    recipients: tuple[str, ...]
    origin: Origin | None = None
    requiretls: bool = False


def origin_record(origin: Origin | None) -> bytes:
    """The X record of ``origin``, or nothing: NETWORK (an outsider's mail, the origin
    that is never signed) and None leave the file exactly as qmail writes it."""
    if origin is None or origin is Origin.NETWORK:
        return b""
    return f"X{ORIGIN_KEY}={Origin(origin).value}\0".encode("ascii")


def todo_bytes(uid: int, qp: int, env: Envelope) -> bytes:
    parts = [f"u{uid}\0p{qp}\0".encode(), b"F", encode(env.sender), b"\0"]
    for r in env.recipients:
        parts += [b"T", encode(r), b"\0"]
    parts.append(origin_record(env.origin))  # after the T records: qmail's bytes come first
    parts.append(requiretls_record(env.requiretls))
    return b"".join(parts)


def requiretls_record(requiretls: bool) -> bytes:
    """``Xrequiretls=1\\0`` for a REQUIRETLS message; nothing for any other, whose
    files stay qmail's (or issue 16's) bytes."""
    return REQUIRETLS_RECORD if requiretls else b""


def info_bytes(sender: str, origin: Origin | None, requiretls: bool = False) -> bytes:
    """An info/ file: ``F<sender>\\0`` and the X records (qmail-qread and qmail-send
    read only the first record of info/)."""
    return b"F" + encode(sender) + b"\0" + origin_record(origin) + requiretls_record(requiretls)


def requiretls_of(records: Iterable[TodoRecord]) -> bool:
    """Whether a todo/ or info/ file has the ``Xrequiretls=1`` record (another value is
    a newer eqmail's that this one does not know: not REQUIRETLS)."""
    return any(rec.kind == "X" and rec.value == "requiretls=1" for rec in records)


def origin_of(records: Iterable[TodoRecord]) -> Origin | None:
    """The origin an ``Xorigin=`` record of a todo/ or info/ file names; None when there
    is none (NETWORK's files have none) or its value is not one this eqmail knows (a
    newer eqmail's: treated as having no origin, so never signed)."""
    found: Origin | None = None
    for rec in records:
        if rec.kind == "X":
            key, sep, value = rec.value.partition("=")
            if key == ORIGIN_KEY and sep:
                try:
                    found = Origin(value)
                except ValueError:
                    found = None
    return found


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
