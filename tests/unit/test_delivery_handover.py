"""Deliveries outlive the scanner that started them (issue 12, item 14): the delivery
worker's JobBoard hands running deliveries and held reports to the next scanner over
real Unix sockets, and the queue manager of a restarted scanner takes them over
(QueueManager.adopt) instead of starting them a second time."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from eqmail.control import load_controls
from eqmail.ipc import ProtocolError, frame, recv_frame
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.ipc.queue import CleanAnswer
from eqmail.queue.envelope import parse_channel
from eqmail.queue.layout import create_queue
from eqmail.queue.manager import QueueManager
from eqmail.queue.schedule import Channel
from eqmail.workers.jobs import JobBoard


def pair() -> tuple[socket.socket, socket.socket]:
    """(the worker's end, the scanner's end)"""
    worker, scanner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker.setblocking(False)
    scanner.settimeout(5)
    return worker, scanner


def frames(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """Every frame readable now."""
    out = []
    sock.settimeout(0.2)
    try:
        while True:
            out.append(recv_frame(sock))
    except (TimeoutError, ProtocolError):
        return out


def test_a_report_without_a_scanner_waits_for_the_next_one() -> None:
    board = JobBoard()
    w1, s1 = pair()
    assert board.start(w1, b"77.12")
    assert board.start(w1, b"77.40")
    board.dropped(w1)  # the scanner was killed
    s1.close()
    board.finish(b"77.12", Outcome(Verdict.SUCCESS, "did 0+0+1\n"))  # ends while nobody listens: held
    w2, s2 = pair()
    assert board.attach(w2) is None
    # the hand-over list names both, then the held report follows; the running one
    # reports when it ends
    assert frames(s2) == [(b"a", b"77.12"), (b"a", b"77.40"), (b"e", b""),
                          (b"r", b"77.12\0Kdid 0+0+1\n")]
    board.finish(b"77.40", Outcome(Verdict.DEFERRAL, "later\n"))
    assert frames(s2) == [(b"r", b"77.40\0Zlater\n")]
    assert board.jobs == {}


def test_a_running_delivery_is_not_started_twice() -> None:
    board = JobBoard()
    w1, s1 = pair()
    assert board.start(w1, b"5.0")
    w2, s2 = pair()
    assert board.attach(w2) is None
    assert board.start(w2, b"5.0") is False  # asked again: nothing new starts
    board.finish(b"5.0", Outcome(Verdict.SUCCESS, "ok\n"))
    assert frames(s2)[-1] == (b"r", b"5.0\0Kok\n")
    assert frames(s1) == []  # exactly one report, to the scanner of now
    assert board.start(w2, b"5.0")  # a later retry of the same recipient is new


def test_a_new_scanner_supersedes_the_previous_connection() -> None:
    board = JobBoard()
    w1, _s1 = pair()
    assert board.attach(w1) is None
    board.start(w1, b"9.3")
    w2, s2 = pair()
    assert board.attach(w2) is w1  # the caller drops it: one scanner at a time
    assert frames(s2) == [(b"a", b"9.3"), (b"e", b"")]


def test_detach_holds_the_reports_that_come_after_it() -> None:
    board = JobBoard()
    w1, s1 = pair()
    board.attach(w1)
    board.start(w1, b"8.1")
    board.start(w1, b"8.2")
    board.finish(b"8.1", Outcome(Verdict.SUCCESS, "first\n"))
    board.detach(w1)
    board.finish(b"8.2", Outcome(Verdict.SUCCESS, "second\n"))
    assert [f for f in frames(s1) if f[0] != b"e"] == [(b"r", b"8.1\0Kfirst\n"), (b"q", b"")]
    w2, s2 = pair()
    board.attach(w2)
    assert frames(s2) == [(b"a", b"8.2"), (b"e", b""), (b"r", b"8.2\0Ksecond\n")]


def test_a_slot_longer_than_the_protocol_allows_is_refused() -> None:
    w1, _s1 = pair()
    with pytest.raises(ProtocolError):
        JobBoard().start(w1, b"1" * 65)
    with pytest.raises(ProtocolError):
        frame(b"A", b"x")


def _manager(root: Path) -> QueueManager:
    return QueueManager(load_controls(root), create_queue(root / "queue"),
                        lambda reqs: [CleanAnswer.DONE] * len(reqs), lambda *a: (True, "1"))


def test_a_restarted_scanner_takes_over_instead_of_starting_again(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test.example\n")
    first = _manager(tmp_path)
    first.paths.mess(77).write_bytes(b"Subject: x\n\nbody\n")
    first.paths.todo(77).write_bytes(b"u0\0p1\0Fs@x\0Ta@mx.test.example\0Tb@mx.test.example\0"
                                     b"Tc@mx.test.example\0\0")
    assert first.process_todo() == 1
    started = first.next_requests(Channel.LOCAL, limit=1)
    assert [r.recipient for r in started] == ["a@mx.test.example"]
    # the scanner is replaced while a@ is running; its successor recovers from the files
    second = _manager(tmp_path)
    second.recover()
    req = second.adopt(Channel.LOCAL, 77, started[0].offset)
    assert req is not None and req.recipient == "a@mx.test.example"
    assert second.channels[Channel.LOCAL].active == 1
    rest = second.next_requests(Channel.LOCAL)
    assert [r.recipient for r in rest] == ["b@mx.test.example", "c@mx.test.example"]
    assert second.next_requests(Channel.LOCAL) == []
    # the report of the delivery taken over is applied: its done marker is written
    second.report(req, Verdict.SUCCESS, "did 0+0+1\n")
    records = parse_channel(second.paths.split_file("local", 77).read_bytes())
    assert [(r.address, r.done) for r in records] == [
        ("a@mx.test.example", True), ("b@mx.test.example", False), ("c@mx.test.example", False)]
    # a record that is no longer waiting (done) or a message that is gone: nothing to take
    assert second.adopt(Channel.LOCAL, 77, started[0].offset) is None
    assert second.adopt(Channel.LOCAL, 4242, 0) is None
