"""The scanner's side of a delivery worker's socket (eqmail.workers.scanner.DeliveryChannel)
against a hand-driven worker: it attaches before sending anything, its requests carry the
scanner slot ``msgid.offset``, reports come back typed, deliveries a previous scanner
started are taken over, and a worker that breaks the protocol is refused."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from eqmail.ipc import ProtocolError, frame, recv_frame
from eqmail.ipc.delivery import Channel, Outcome, Verdict
from eqmail.queue.manager import Delivery
from eqmail.workers.scanner import DeliveryChannel, Slot


def _worker(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "remote.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    return listener, path


def _reports(dc: DeliveryChannel) -> list[tuple[Slot, Outcome]]:
    for _ in range(100):
        got = dc.read_reports()
        assert got is not None
        if got or dc.attached:
            return got
        time.sleep(0.01)
    return []


def test_attach_request_report_and_take_over(tmp_path: Path) -> None:
    listener, path = _worker(tmp_path)
    adopted = Delivery(5, Channel.REMOTE, 40, "s@x.test", "old@y.test")
    dc = DeliveryChannel(Channel.REMOTE, path, 1,
                         lambda ch, msgid, offset: Slot(adopted, 1) if (msgid, offset) == (5, 40) else None)
    assert dc.connect()
    worker, _ = listener.accept()
    worker.settimeout(5)
    assert recv_frame(worker) == (b"A", b"")
    item = Delivery(77, Channel.REMOTE, 12, "s@x.test", "u@y.test")
    assert not dc.send(item, 2)  # nothing starts before the hand-over list is read
    worker.sendall(frame(b"a", b"5.40") + frame(b"a", b"junk") + frame(b"e"))
    assert _reports(dc) == [] and dc.attached and dc.free == 1
    assert dc.send(item, 2)
    assert recv_frame(worker) == (b"D", b"77.12\00077\0s@x.test\0u@y.test\0")
    worker.sendall(frame(b"r", b"77.12\0Kok\n") + frame(b"r", b"5.40\0Zlater\n")
                   + frame(b"r", b"9.9\0Knot ours\n"))
    got: list[tuple[Slot, Outcome]] = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += _reports(dc)
        time.sleep(0.01)
    assert got == [(Slot(item, 2), Outcome(Verdict.SUCCESS, "ok\n")),
                   (Slot(adopted, 1), Outcome(Verdict.DEFERRAL, "later\n"))]
    assert dc.detach() and recv_frame(worker) == (b"Q", b"")
    worker.sendall(frame(b"q"))
    _reports(dc)
    assert dc.detached


def test_a_mangled_report_is_a_protocol_error(tmp_path: Path) -> None:
    listener, path = _worker(tmp_path)
    dc = DeliveryChannel(Channel.LOCAL, path, 1, lambda *a: None)
    assert dc.connect()
    worker, _ = listener.accept()
    worker.sendall(frame(b"e") + frame(b"r", b"1.2\0Xwhat\n"))
    time.sleep(0.1)
    with pytest.raises(ProtocolError):
        dc.read_reports()
    assert dc.lost() == []
