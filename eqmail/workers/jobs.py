"""A delivery worker's deliveries, kept across scanner restarts (local and remote).

Owns: which deliveries a delivery worker has been asked for and not yet reported, and
the scanner side of its socket protocol beyond requests and reports (eqmail.ipc:
``A`` attach, ``a``/``e`` hand-over, ``Q``/``q`` detach).  Runs inside the delivery
worker's event loop (the local spawner as root, the remote worker as eqmailr); no
threads, no blocking beyond a report's send.

Why: a delivery does not belong to the scanner connection that asked for it.  When the
scanner is replaced (a reload that changes its controls hands over with ``Q``; kill -9
just closes the connection), a delivery that is still running goes on, and its report
waits here.  The next scanner says ``A`` and is told, before it starts anything, every
delivery still running or finished without a received report (``a`` with its slot,
then ``e``); it takes those over instead of starting them again, and receives their
reports.  So a running delivery is never started twice, and a normal reload repeats
none: reports in flight when the old scanner detaches are answered after ``q`` and
so held for the successor.  After a crash a report that was sent but never read by
the dead scanner is lost and that recipient is delivered again, as in qmail.

A request for a slot that is still known here starts nothing: a held report is sent
at once, a running delivery reports when it ends.

Failure modes: a connection that cannot take a report (gone, broken) makes the report
wait for the next ``A``; reports held when the worker exits are lost (the recipient is
delivered again by the next scanner).
"""

from __future__ import annotations

import selectors
import socket
from dataclasses import dataclass

from eqmail.ipc import SLOT_MAX, ProtocolError, frame, read_frames
from eqmail.log import log
from eqmail.textio import encode

REPORT_MAX = 10000


@dataclass
class Job:
    conn: socket.socket | None  # where its report goes; None: held for the next scanner
    report: bytes | None = None  # K/Z/D + text, once finished and not yet received


class JobBoard:
    def __init__(self) -> None:
        self.jobs: dict[bytes, Job] = {}  # slot -> job
        self.scanner: socket.socket | None = None  # the connection that said A last

    def start(self, conn: socket.socket, slot: bytes) -> bool:
        """A request for ``slot`` arrived on ``conn``: True when the delivery is to be
        started; False when it is known already (running, or its held report was just
        sent)."""
        if len(slot) > SLOT_MAX:
            raise ProtocolError("delivery request slot too long")
        job = self.jobs.get(slot)
        if job is None:
            self.jobs[slot] = Job(conn)
            return True
        job.conn = conn
        if job.report is not None:
            self._send(slot, job)
        return False

    def finish(self, slot: bytes, text: str) -> None:
        """The delivery ``slot`` ended: report it, or hold the report."""
        job = self.jobs.get(slot)
        if job is None:
            return
        data = encode(text)[:REPORT_MAX]
        if data[:1] not in (b"K", b"Z", b"D"):
            data = b"Z" + data
        job.report = data
        self._send(slot, job)

    def running(self) -> int:
        return sum(1 for job in self.jobs.values() if job.report is None)

    def attach(self, conn: socket.socket) -> socket.socket | None:
        """``A`` on ``conn``: hand every known delivery to it.  Returns the previous
        scanner's connection, which the caller drops: there is one scanner."""
        previous, self.scanner = self.scanner, conn
        out = bytearray()
        for slot, job in self.jobs.items():
            job.conn = conn
            out += frame(b"a", slot)
        out += frame(b"e")
        if _sendall(conn, bytes(out)):
            for slot, job in list(self.jobs.items()):
                if job.report is not None:
                    self._send(slot, job)
        else:
            self.dropped(conn)
        return previous if previous is not conn else None

    def detach(self, conn: socket.socket) -> None:
        """``Q`` on ``conn``: answer ``q``; its deliveries' reports wait for the next ``A``."""
        _sendall(conn, frame(b"q"))
        self.dropped(conn)

    def dropped(self, conn: socket.socket) -> None:
        """``conn`` is gone (or detached): its deliveries' reports wait."""
        for job in self.jobs.values():
            if job.conn is conn:
                job.conn = None
        if self.scanner is conn:
            self.scanner = None

    def _send(self, slot: bytes, job: Job) -> None:
        assert job.report is not None
        if job.conn is None:
            return
        if _sendall(job.conn, frame(b"r", slot + b"\0" + job.report)):
            del self.jobs[slot]
        else:
            self.dropped(job.conn)


def _sendall(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.setblocking(True)
        conn.sendall(data)
        conn.setblocking(False)
    except OSError:
        return False
    return True


class ScannerClients:
    """The scanner side of a delivery worker's socket, shared by the local spawner and
    the remote worker: read the frames (``D`` request, ``A`` attach, ``Q`` detach), hand
    the board over, drop a connection that is gone or broke the protocol.  The worker
    sets ``sel``, ``clients``, ``board`` and ``role`` and handles the requests."""

    sel: selectors.BaseSelector
    clients: dict[socket.socket, bytearray]
    board: JobBoard
    role: str  # "local delivery" / "remote delivery", for log lines

    def handle_request(self, conn: socket.socket, payload: bytes) -> None:
        raise NotImplementedError

    def client_data(self, conn: socket.socket) -> None:
        buf = self.clients.get(conn)
        try:
            frames = read_frames(conn, buf, b"DAQ") if buf is not None else None
            for kind, payload in frames or ():
                if conn not in self.clients:
                    break  # superseded by another scanner's A
                if kind == b"D":
                    self.handle_request(conn, payload)
                elif kind == b"A":
                    superseded = self.board.attach(conn)
                    if superseded is not None and superseded in self.clients:
                        self.drop_client(superseded)
                else:
                    self.board.detach(conn)
        except ProtocolError as e:
            log(f"warning: {self.role}: {e}")
            frames = None
        if frames is None and conn in self.clients:
            self.drop_client(conn)

    def drop_client(self, conn: socket.socket) -> None:
        """Requests it made still run (or wait): their reports go to the next scanner."""
        self.sel.unregister(conn)
        self.clients.pop(conn, None)
        self.board.dropped(conn)
        conn.close()
