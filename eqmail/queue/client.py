"""Submitting a message to the queue writer: the qmail.c library of eqmail.

Used by eqmail-inject/sendmail, local forwards and the scanner's bounces (blocking
sockets), and — through :class:`AsyncQueueClient` — by the SMTP listener, which streams
DATA into the queue as it arrives.  Never raises for a queue failure: the result carries
qmail-queue's exit code and qmail_close()'s text.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from eqmail.instance import Instance
from eqmail.ipc.framing import ProtocolError, expect, read_frame_async, recv_frame
from eqmail.ipc.queue import (
    ANSWER,
    CLEAN_ANSWER,
    BodyChunk,
    CleanAnswer,
    CleanRequest,
    Origin,
    QQExit,
    QueueAnswer,
    QueueEnvelope,
    QueueHello,
    QueuePrepend,
    QueueRole,
)

CHUNK = 256 * 1024


@dataclass(frozen=True)
class SubmitResult:
    code: QQExit
    text: str  # qmail_close()'s text for the code, without its D/Z letter; "" on success
    msgid: int | None
    qp: int | None

    @property
    def ok(self) -> bool:
        return self.code is QQExit.OK

    @property
    def permanent(self) -> bool:
        return self.code.permanent

    @classmethod
    def from_code(cls, code: QQExit, qp: int | None = None, msgid: int | None = None) -> SubmitResult:
        return cls(code, code.text, msgid if code is QQExit.OK else None, qp)

    @classmethod
    def from_answer(cls, answer: QueueAnswer) -> SubmitResult:
        return cls.from_code(answer.code, answer.qp, answer.msgid)


def _chunks(message: bytes | BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]
        return
    if hasattr(message, "read"):
        f: BinaryIO = message  # type: ignore[assignment]
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return
            yield chunk
        return
    for chunk in message:
        for i in range(0, len(chunk), CHUNK):
            yield chunk[i : i + CHUNK]


class QueueConnection:
    """A blocking connection that may carry several messages."""

    def __init__(self, root: Path, role: QueueRole | None = None, timeout: float = 600.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(Instance(root).queue_socket))
        if role:
            self.sock.sendall(QueueHello(role).frame())

    def close(self) -> None:
        self.sock.close()

    def submit(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO | Iterable[bytes],
               prefix: bytes = b"", origin: Origin | None = None,
               requiretls: bool = False) -> SubmitResult:
        if prefix:
            self.sock.sendall(BodyChunk(prefix).frame())
        for chunk in _chunks(message):
            if chunk:
                self.sock.sendall(BodyChunk(chunk).frame())
        self.sock.sendall(QueueEnvelope(sender, tuple(recipients), origin, requiretls).frame())
        kind, payload = recv_frame(self.sock)
        expect(ANSWER, kind)
        return SubmitResult.from_answer(QueueAnswer.decode(payload))

    def clean(self, request: CleanRequest) -> CleanAnswer:
        return self.clean_many([request])[0]

    def clean_many(self, requests: list[CleanRequest]) -> list[CleanAnswer]:
        """qmail-clean requests, pipelined: all sent, then all answers read (in order)."""
        self.sock.sendall(b"".join(r.frame() for r in requests))
        answers = []
        for _ in requests:
            kind, payload = recv_frame(self.sock)
            expect(CLEAN_ANSWER, kind)
            answers.append(CleanAnswer.decode(payload))
        return answers


def submit(root: Path, sender: str, recipients: Sequence[str], message: bytes | BinaryIO | Iterable[bytes],
           *, prefix: bytes = b"", role: QueueRole | None = None,
           origin: Origin | None = None, requiretls: bool = False) -> SubmitResult:
    """Queue one message.  Returns code 120 ("unable to exec qq") when no queue writer
    answers, code 53/54/... as qmail-queue would otherwise."""
    try:
        conn = QueueConnection(Path(root), role)
    except OSError:
        return SubmitResult.from_code(QQExit.CANNOT_EXEC)
    try:
        return conn.submit(sender, recipients, message, prefix, origin, requiretls)
    except (OSError, ProtocolError):
        return SubmitResult.from_code(QQExit.BUG)
    finally:
        conn.close()


class AsyncQueueClient:
    """One asyncio connection to the queue writer, used by a listener for one SMTP
    session's messages: ``begin`` nothing, ``write`` chunks as DATA arrives, ``finish``
    with the envelope.  ``abandon`` drops the connection so the writer removes the
    half-written message."""

    # Idle connections kept for the next session of this process (a connect per SMTP
    # session was a visible cost under load); only between messages, never mid-message.
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    MAX_IDLE = 64

    def __init__(self, root: Path, role: QueueRole = QueueRole.NETWORK) -> None:
        self.root = root
        self.role = role
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.broken = False
        # body frames not sent yet: a small message goes out with its envelope in one
        # write (one syscall here, one read in the writer), a big one in FLUSH pieces
        self.pending = bytearray()

    FLUSH = 64 * 1024

    async def _connect(self) -> None:
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                self.reader, self.writer = reader, writer
                return
            writer.close()
        path = str(Instance(self.root).queue_socket)
        for attempt in range(50):  # a full accept backlog (EAGAIN) is a moment, not a failure
            try:
                self.reader, self.writer = await asyncio.open_unix_connection(path)
                break
            except BlockingIOError:
                await asyncio.sleep(0.01 * (attempt + 1))
        else:
            raise BlockingIOError("queue writer busy")
        self.writer.write(QueueHello(self.role).frame())

    def release(self) -> None:
        """The session is over and no message is in flight: keep the connection."""
        if self.writer is None or self.reader is None:
            return
        if self.broken or self.pending or self.writer.is_closing() or len(self._idle) >= self.MAX_IDLE:
            self.pending.clear()
            self.writer.close()
        else:
            self._idle.append((self.reader, self.writer))
        self.reader = self.writer = None

    async def write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            if self.writer is None:
                await self._connect()
            assert self.writer is not None
            for i in range(0, len(data), CHUNK):
                self.pending += BodyChunk(data[i : i + CHUNK]).frame()
            if len(self.pending) >= self.FLUSH:
                self.writer.write(bytes(self.pending))
                self.pending.clear()
                if self.writer.transport.get_write_buffer_size() > 1 << 20:
                    await self.writer.drain()
        except OSError:
            self.broken = True

    def prepend(self, fields: bytes) -> None:
        """Header fields for the writer to put right after its Received line (issue 16:
        the listener's Authentication-Results); after the last write, before finish,
        with whose envelope they go out."""
        if not self.broken:
            self.pending += QueuePrepend(fields).frame()

    async def finish(self, sender: str, recipients: Sequence[str],
                     origin: Origin | None = None, requiretls: bool = False) -> SubmitResult:
        if self.broken:
            await self.abandon()
            return SubmitResult.from_code(QQExit.CANNOT_EXEC)
        try:
            if self.writer is None:
                await self._connect()
            assert self.writer is not None and self.reader is not None
            self.pending += QueueEnvelope(sender, tuple(recipients), origin, requiretls).frame()
            self.writer.write(bytes(self.pending))
            self.pending.clear()
            kind, payload = await read_frame_async(self.reader)
            expect(ANSWER, kind)
            return SubmitResult.from_answer(QueueAnswer.decode(payload))
        except (OSError, asyncio.IncompleteReadError, ProtocolError):
            # no connection at all: qmail's "unable to exec qq"; lost mid-way: "crashed"
            code = QQExit.CANNOT_EXEC if self.writer is None else QQExit.BUG
            await self.abandon()
            return SubmitResult.from_code(code)

    async def abandon(self) -> None:
        self.broken = False
        self.pending.clear()
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.writer = self.reader = None
