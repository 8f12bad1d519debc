"""Issue 16's prepend: the QueuePrepend frame (eqmail.ipc.queue) and the queue writer's
step that puts its header fields right after its own Received line (QueueStore.prepend),
driven on a private queue tree."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_queue_writer import all_files

from eqmail.ipc.framing import ProtocolError, next_frame
from eqmail.ipc.queue import PREPEND, PREPEND_MAX, QQExit, QueuePrepend
from eqmail.queue.envelope import Envelope
from eqmail.queue.writer import QueueFailure, QueueStore, received_line

AR = (b"Authentication-Results: mx.example.org;\n\tspf=pass smtp.mailfrom=a@example.com;\n"
      b"\tdkim=pass header.d=example.com header.s=sel\n")




# ------------------------------------------------------------------ the frame


def test_frame_round_trip() -> None:
    frame = QueuePrepend(AR).frame()
    got = next_frame(frame)
    assert got is not None and got[0] == PREPEND == b"P" and got[2] == len(frame)
    assert QueuePrepend.decode(got[1]) == QueuePrepend(AR)
    two = AR + b"X-Eqmail-DMARC: quarantine (policy=reject; header.from=example.com)\n"
    assert QueuePrepend.decode(QueuePrepend(two).encode()).fields == two


@pytest.mark.parametrize("bad", [
    b"",                                            # nothing
    b"Authentication-Results: x; none",             # no line end
    b"Authentication-Results: x; none\r\n",         # CR
    b"Authentication-Results: x;\0 none\n",         # NUL
    b"\tcontinuation first\n",                      # not a field
    b"no colon here\n",
    b"A-R: x\n\n",                                  # an empty line would end the header
    b"A-R: x\n \n",                                 # so would a blank-only one, for some
    b"A-R: x\nBody text after a field\n",
    b"Bad Name: x\n",                               # a blank in the field name
    b": no name\n",
    b"A-R: " + b"x" * 995 + b"\n",                  # a line over 998 bytes
])
def test_frame_refuses_what_is_not_complete_header_fields(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        QueuePrepend.decode(bad)
    with pytest.raises(ProtocolError):
        QueuePrepend(bad).encode()


def test_frame_bound_is_64_kib() -> None:
    line = b"X-A: " + b"y" * 900 + b"\n"
    fields = line * (PREPEND_MAX // len(line))
    assert len(QueuePrepend(fields).frame()) == len(fields) + 5
    with pytest.raises(ProtocolError):
        QueuePrepend(fields + line).encode()
    with pytest.raises(ProtocolError):  # the framing refuses a longer P frame before decoding
        next_frame(b"P" + (PREPEND_MAX + 1).to_bytes(4, "big") + b"x" * (PREPEND_MAX + 1))


@given(st.binary(max_size=300))
def test_decode_takes_any_bytes(data: bytes) -> None:
    try:
        fields = QueuePrepend.decode(data).fields
    except ProtocolError:
        return
    assert fields.endswith(b"\n") and b"\r" not in fields and b"\0" not in fields
    assert b"\n\n" not in fields and fields[:1] not in (b" ", b"\t")


# ------------------------------------------------------------------ the writer's step


def test_prepend_puts_the_fields_after_the_writers_received_line(store: QueueStore) -> None:
    received = received_line(77, "from network", 1_700_000_000)
    body = b"Received: from client (1.2.3.4)\n  by mx with SMTP; date\nSubject: hi\n\nbody\n" * 50
    msg = store.start(77, 1000, received)
    first = msg.msgid
    store.write(msg, body[:100])
    store.write(msg, body[100:])
    store.prepend(msg, AR)
    assert msg.msgid != first and not store.paths.mess(first).exists()
    assert store.paths.mess(msg.msgid).stat().st_ino == msg.msgid
    msg.envelope = Envelope("a@example.com", ("u@mx.example.org",))
    store.commit([msg])
    assert msg.result is QQExit.OK
    assert store.paths.mess(msg.msgid).read_bytes() == received + AR + body
    assert store.paths.todo(msg.msgid).exists()
    assert store.inflight == set()
    assert all_files(store.paths) == sorted(
        os.path.relpath(p, store.paths.root)
        for p in (store.paths.mess(msg.msgid), store.paths.intd(msg.msgid),
                  store.paths.todo(msg.msgid)))


def test_prepend_of_a_large_message(store: QueueStore) -> None:
    body = os.urandom(3 << 20).replace(b"\n", b"x")
    msg = store.start(5, 0, b"Received: (qmail 5 invoked from network); now\n")
    for i in range(0, len(body), 1 << 20):
        store.write(msg, body[i:i + (1 << 20)])
    store.prepend(msg, AR)
    data = store.paths.mess(msg.msgid).read_bytes()
    assert data == b"Received: (qmail 5 invoked from network); now\n" + AR + body


def test_prepend_without_copy_file_range_copies_by_hand(store: QueueStore,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*_a: object, **_k: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    msg = store.start(5, 0, b"Received: r\n")
    store.write(msg, b"Subject: s\n\nbody\n")
    store.prepend(msg, AR)
    assert store.paths.mess(msg.msgid).read_bytes() == b"Received: r\n" + AR + b"Subject: s\n\nbody\n"


def test_a_failed_prepend_leaves_nothing(store: QueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_a: object, **_k: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    msg = store.start(5, 0, b"Received: r\n")
    store.write(msg, b"Subject: s\n\nbody\n")
    with pytest.raises(QueueFailure) as info:
        store.prepend(msg, AR)
    assert info.value.code is QQExit.WRITE_ERROR
    assert all_files(store.paths) == [] and store.inflight == set()


def test_a_prepend_that_cannot_create_its_file_leaves_nothing(store: QueueStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_file(qp: int) -> tuple[int, int]:
        raise QueueFailure(QQExit.MESS_DIR, "Permission denied")

    msg = store.start(5, 0, b"Received: r\n")
    store.write(msg, b"body\n")
    monkeypatch.setattr(store, "_create_mess", no_file)
    with pytest.raises(QueueFailure) as info:
        store.prepend(msg, AR)
    assert info.value.code is QQExit.MESS_DIR
    assert all_files(store.paths) == [] and store.inflight == set()


def test_crash_after_the_new_file_leaves_only_orphan_mess_files(store: QueueStore,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed inside prepend (simulated: the copy never returns) has linked
    nothing in intd/ or todo/: only mess files, which the scanner's sweep of mess
    files without todo/info removes; nothing is queued."""
    class Killed(BaseException):
        pass

    def killed(*_a: object, **_k: object) -> int:
        raise Killed

    msg = store.start(5, 0, b"Received: r\n")
    store.write(msg, b"body\n")
    monkeypatch.setattr("eqmail.queue.writer._copy_rest", killed)
    with pytest.raises(Killed):
        store.prepend(msg, AR)
    # even the BaseException path cleans up; nothing was ever in intd/ or todo/
    assert all_files(store.paths) == []
