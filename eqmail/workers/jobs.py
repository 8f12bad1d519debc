"""A delivery worker's deliveries, kept across scanner restarts (local and remote).

Owns: which deliveries a delivery worker has been asked for and not yet reported, and
the worker's side of the hand-over (eqmail.ipc.delivery: ``A`` attach, ``a``/``e``
hand-over, ``Q``/``q`` detach).  Used by the delivery-worker skeleton
(eqmail.workers.deliveryserver).  Runs inside the delivery
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

import socket
from dataclasses import dataclass

from eqmail.ipc import SLOT_MAX, ProtocolError
from eqmail.ipc.delivery import Adopted, DeliveryReport, Detached, EndOfList, Outcome


@dataclass
class Job:
    conn: socket.socket | None  # where its report goes; None: held for the next scanner
    report: DeliveryReport | None = None  # once finished and not yet received


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

    def finish(self, slot: bytes, outcome: Outcome) -> None:
        """The delivery ``slot`` ended: report it, or hold the report."""
        job = self.jobs.get(slot)
        if job is None:
            return
        job.report = DeliveryReport(slot, outcome.cut())
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
            out += Adopted(slot).frame()
        out += EndOfList().frame()
        if _sendall(conn, bytes(out)):
            for slot, job in list(self.jobs.items()):
                if job.report is not None:
                    self._send(slot, job)
        else:
            self.dropped(conn)
        return previous if previous is not conn else None

    def detach(self, conn: socket.socket) -> None:
        """``Q`` on ``conn``: answer ``q``; its deliveries' reports wait for the next ``A``."""
        _sendall(conn, Detached().frame())
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
        if _sendall(job.conn, job.report.frame()):
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
