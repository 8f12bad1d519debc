"""The QueuePrepend frame on a live run/queue.sock (issue 16): honoured from the listener
(here: the network role, which the writer believes from its own uid or root), the
fields land right after the writer's Received line of the delivered message; from any
other client the connection is dropped and nothing is queued."""

from __future__ import annotations

import pytest
from harness import ME, Instance, poll

from eqmail.ipc.framing import ProtocolError, recv_frame
from eqmail.ipc.queue import BodyChunk, QueueAnswer, QueueEnvelope, QueuePrepend, QueueRole
from eqmail.queue.client import QueueConnection

FIELD = f"Authentication-Results: {ME}; spf=pass smtp.mailfrom=a@example.com\n".encode()
BODY = b"Received: from client (1.2.3.4)\n  by mx with SMTP; now\nSubject: p\n\nbody\n"


def test_prepend_from_the_network_role_lands_after_the_writers_received_line(
        running: Instance) -> None:
    conn = QueueConnection(running.root, role=QueueRole.NETWORK, timeout=10)
    try:
        conn.sock.sendall(BodyChunk(BODY[:20]).frame() + BodyChunk(BODY[20:]).frame()
                          + QueuePrepend(FIELD).frame()
                          + QueueEnvelope("a@example.com", (f"testuser@{ME}",)).frame())
        kind, payload = recv_frame(conn.sock)
        assert kind == b"R" and QueueAnswer.decode(payload).ok
    finally:
        conn.close()
    (path,) = running.wait_for_mail(1)
    lines = path.read_bytes().split(b"\n", 3)
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: (qmail ") and b" invoked from network); " in lines[2]
    assert lines[3] == FIELD + BODY


@pytest.mark.parametrize("role", [None, QueueRole.BOUNCE])
def test_prepend_from_another_client_drops_the_connection_and_queues_nothing(
        running: Instance, role: QueueRole | None) -> None:
    conn = QueueConnection(running.root, role=role, timeout=10)
    try:
        conn.sock.sendall(BodyChunk(BODY).frame() + QueuePrepend(FIELD).frame()
                          + QueueEnvelope("a@example.com", (f"testuser@{ME}",)).frame())
        with pytest.raises(ProtocolError, match="connection closed"):  # dropped, no answer
            recv_frame(conn.sock)
    finally:
        conn.close()
    running.wait_queue_empty()
    assert running.maildir_files() == []
    poll(lambda: "prepended fields from a client that is not the listener" in running.log(),
         what="the writer's log line")
