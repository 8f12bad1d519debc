"""run/queue.sock and run/status.sock as a live instance serves them (the messages of
eqmail.ipc.queue and eqmail.ipc.status): qmail-clean answers ``x`` to a request it
cannot read and reads on; an envelope qmail-queue refuses is answered with its exit
code and the connection serves the next message; a role the writer does not know is
ignored; the status socket answers ``status`` only."""

from __future__ import annotations

import socket

from harness import ME, Instance

from eqmail.ipc.framing import frame, recv_frame
from eqmail.ipc.queue import (
    BodyChunk,
    CleanAnswer,
    CleanRequest,
    QQExit,
    QueueAnswer,
    QueueEnvelope,
)
from eqmail.ipc.status import StatusAnswer, StatusRequest
from eqmail.queue.client import QueueConnection


def test_clean_answers_x_to_an_unreadable_request_and_reads_on(running: Instance) -> None:
    conn = QueueConnection(running.root, timeout=10)
    try:
        conn.sock.sendall(frame(b"C", b"mess/1234567") + CleanRequest.foop(999_999_937).frame())
        answers = [recv_frame(conn.sock) for _ in range(2)]
        assert answers == [(b"K", b"x"), (b"K", b"+")]  # an absent message is fine
        assert conn.clean(CleanRequest.todo(999_999_937)) is CleanAnswer.DONE
    finally:
        conn.close()


def test_a_refused_envelope_gets_its_exit_code_and_the_next_message_is_queued(running: Instance) -> None:
    conn = QueueConnection(running.root, timeout=10)
    try:
        conn.sock.sendall(frame(b"H", b"no such role") + BodyChunk(b"Subject: x\n\nbody\n").frame()
                          + frame(b"E", b"Xnot an envelope\0\0"))
        kind, payload = recv_frame(conn.sock)
        answer = QueueAnswer.decode(payload)
        assert kind == b"R" and answer.code is QQExit.BAD_ENVELOPE and answer.msgid == 0
        assert answer.text == "qq internal bug (#4.3.0)" and not answer.permanent
        conn.sock.sendall(BodyChunk(b"Subject: y\n\nbody\n").frame()
                          + QueueEnvelope("", ("a" * 1003,)).frame())
        kind, payload = recv_frame(conn.sock)
        answer = QueueAnswer.decode(payload)
        assert answer.code is QQExit.ADDR_TOO_LONG and answer.permanent
        result = conn.submit("", [f"postmaster@{ME}"], b"Subject: z\n\nbody\n")
        assert result.ok and result.msgid and result.text == ""
    finally:
        conn.close()


def _ask(inst: Instance, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(inst.root / "run" / "status.sock"))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_the_status_socket_answers_status_only(running: Instance) -> None:
    answer = StatusAnswer.decode(_ask(running, StatusRequest().encode()))
    assert answer.running and answer.report["pid"] == running.supervisor_pid()
    assert _ask(running, b"shutdown\n") == b""
