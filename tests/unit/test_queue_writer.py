"""The queue writer's file work (qmail-queue + qmail-clean, qmail-core §1.2/§1.3/§1.8),
driven directly on a private queue tree."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.queue import (
    ADDR_MAX,
    CleanAnswer,
    CleanRequest,
    EnvelopeRefused,
    QQExit,
    QueueEnvelope,
)
from eqmail.queue.envelope import Envelope, todo_bytes
from eqmail.queue.layout import SPLIT, SPLIT_DIRS, QueuePaths, create_queue
from eqmail.queue.writer import OSSIFIED, PendingMessage, QueueFailure, QueueStore, received_line


def all_files(paths: QueuePaths) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(paths.root):
        rel = os.path.relpath(dirpath, paths.root)
        if rel.startswith("spare-"):
            continue  # recycled inodes, not queue entries
        out += [os.path.relpath(os.path.join(dirpath, f), paths.root) for f in files]
    return sorted(out)


def queue_one(store: QueueStore, body: bytes, env: Envelope, qp: int = 4242, uid: int = 1000) -> PendingMessage:
    msg = store.start(qp, uid, received_line(qp, f"by uid {uid}"))
    store.write(msg, body)
    msg.envelope = env
    store.commit([msg])
    return msg


# ------------------------------------------------------------------ layout


def test_create_queue_makes_qmail_layout_with_big_todo(tmp_path: Path) -> None:
    paths = create_queue(tmp_path / "queue")
    for name in ("pid", "bounce", "lock"):
        assert paths.dir(name).is_dir()
        assert not (paths.dir(name) / "0").exists()
    assert set(SPLIT_DIRS) == {"mess", "intd", "todo", "info", "local", "remote"}
    for name in SPLIT_DIRS:
        assert sorted(os.listdir(paths.dir(name)), key=int) == [str(i) for i in range(SPLIT)]
    assert paths.mess(457) == tmp_path / "queue" / "mess" / str(457 % 23) / "457"
    assert paths.todo(46) == tmp_path / "queue" / "todo" / "0" / "46"
    assert paths.bounce(457) == tmp_path / "queue" / "bounce" / "457"
    assert os.stat(paths.dir("intd")).st_mode & 0o777 == 0o700
    assert os.stat(paths.dir("mess")).st_mode & 0o777 == 0o750


# ------------------------------------------------------------------ one message


def test_message_id_is_the_inode_and_files_use_split_names(store: QueueStore) -> None:
    msg = queue_one(store, b"Subject: x\n\nbody\n", Envelope("joe@x.org", ("a@b.example",)))
    assert msg.result is QQExit.OK
    mess = store.paths.mess(msg.msgid)
    assert mess.parent.name == str(msg.msgid % 23) and mess.name == str(msg.msgid)
    assert os.stat(mess).st_ino == msg.msgid
    assert store.paths.todo(msg.msgid).exists() and store.paths.intd(msg.msgid).exists()
    assert os.listdir(store.paths.dir("pid")) == []
    assert all_files(store.paths) == sorted([
        f"mess/{msg.msgid % 23}/{msg.msgid}", f"intd/{msg.msgid % 23}/{msg.msgid}",
        f"todo/{msg.msgid % 23}/{msg.msgid}"])


def test_todo_and_intd_bytes_exactly(store: QueueStore) -> None:
    env = Envelope("joe@x.org", ("a@b.example", "c@d.example"))
    msg = queue_one(store, b"\n", env, qp=77, uid=1234)
    expected = b"u1234\0p77\0Fjoe@x.org\0Ta@b.example\0Tc@d.example\0"
    assert store.paths.todo(msg.msgid).read_bytes() == expected
    assert store.paths.intd(msg.msgid).read_bytes() == expected
    assert todo_bytes(1234, 77, env) == expected  # no extra final NUL
    # todo is a hard link of intd (the commit point is the link)
    assert os.stat(store.paths.todo(msg.msgid)).st_ino == os.stat(store.paths.intd(msg.msgid)).st_ino


def test_empty_sender_and_no_recipients(store: QueueStore) -> None:
    msg = queue_one(store, b"x", Envelope("", ()), qp=1, uid=0)
    assert store.paths.todo(msg.msgid).read_bytes() == b"u0\0p1\0F\0"


def test_eight_bit_addresses_round_trip(store: QueueStore) -> None:
    env = QueueEnvelope.decode(b"F\xff\xfejoe@x\0T\xe9@y\0\0")
    msg = queue_one(store, b"x", Envelope(env.sender, env.recipients), qp=1, uid=0)
    assert store.paths.todo(msg.msgid).read_bytes() == b"u0\0p1\0F\xff\xfejoe@x\0T\xe9@y\0"


def test_mess_file_is_received_line_then_body_verbatim(store: QueueStore) -> None:
    body = b"Subject: hi\r\n\r\nline\nno final newline\x00\xff"
    msg = queue_one(store, body, Envelope("s@x", ("r@y",)), qp=99, uid=1000)
    data = store.paths.mess(msg.msgid).read_bytes()
    first, rest = data.split(b"\n", 1)
    assert re.fullmatch(rb"Received: \(qmail 99 invoked by uid 1000\); "
                        rb"\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                        rb"\d\d:\d\d:\d\d [+-]\d{4}", first), first
    assert rest == body


def test_received_line_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert received_line(123, "by uid 1000", 1_700_000_000) == (
            b"Received: (qmail 123 invoked by uid 1000); 14 Nov 2023 22:13:20 +0000\n")
        assert received_line(5, "from network", 1_699_000_000) == (
            b"Received: (qmail 5 invoked from network); 3 Nov 2023 08:26:40 +0000\n")
        monkeypatch.setenv("TZ", "EST+5")
        time.tzset()
        assert received_line(1, "for bounce", 1_700_000_000) == (
            b"Received: (qmail 1 invoked for bounce); 14 Nov 2023 17:13:20 -0500\n")
    finally:
        monkeypatch.undo()
        time.tzset()


def test_body_streamed_in_chunks(store: QueueStore) -> None:
    msg = store.start(1, 0, b"R\n")
    chunks = [bytes([65 + i % 26]) * 100_000 for i in range(30)]
    for c in chunks:
        store.write(msg, c)
    msg.envelope = Envelope("s@x", ("r@y",))
    store.commit([msg])
    assert store.paths.mess(msg.msgid).read_bytes() == b"R\n" + b"".join(chunks)
    assert msg.bytes_written == 2 + 3_000_000


# ------------------------------------------------------------------ batches and failures


def test_batch_commit_of_several_messages(store: QueueStore) -> None:
    msgs = []
    for i in range(5):
        m = store.start(100 + i, 1000, received_line(100 + i, "by uid 1000"))
        store.write(m, f"Subject: {i}\n\nbody {i}\n".encode())
        m.envelope = Envelope(f"s{i}@x", (f"r{i}@y",))
        msgs.append(m)
    store.commit(msgs)
    assert [m.result for m in msgs] == [QQExit.OK] * 5
    assert len({m.msgid for m in msgs}) == 5
    for i, m in enumerate(msgs):
        assert store.paths.todo(m.msgid).read_bytes() == f"u1000\0p{100 + i}\0Fs{i}@x\0Tr{i}@y\0".encode()
        assert store.paths.mess(m.msgid).read_bytes().endswith(f"body {i}\n".encode())
        assert m.mess_fd == -1 and m.intd_fd == -1  # descriptors closed after the commit


def test_abort_leaves_nothing_behind(store: QueueStore) -> None:
    msg = store.start(1, 0, b"Received: x\n")
    store.write(msg, b"half a message")
    store.abort(msg)
    assert all_files(store.paths) == []


def test_failed_link_fails_only_that_message_and_leaves_nothing_of_it(store: QueueStore) -> None:
    msgs = []
    for i in range(3):
        m = store.start(i + 1, 0, b"R\n")
        store.write(m, b"body")
        m.envelope = Envelope("s@x", ("r@y",))
        msgs.append(m)
    # make one todo/N directory vanish: the link of that message fails (qmail-queue's 66)
    victim = store.paths.todo(msgs[1].msgid).parent
    os.rmdir(victim)
    try:
        store.commit(msgs)
    finally:
        victim.mkdir()
    assert [m.result for m in msgs] == [QQExit.OK, QQExit.TODO_DIR, QQExit.OK]
    n = msgs[1].msgid
    assert not any(f.endswith(f"/{n}") for f in all_files(store.paths))
    assert store.paths.todo(msgs[0].msgid).exists() and store.paths.todo(msgs[2].msgid).exists()


def test_failed_intd_create_fails_only_that_message(store: QueueStore) -> None:
    good = store.start(1, 0, b"R\n")
    bad = store.start(2, 0, b"R\n")
    good.envelope = bad.envelope = Envelope("s@x", ("r@y",))
    store.paths.intd(bad.msgid).write_bytes(b"stale")  # O_EXCL create must fail
    store.commit([good, bad])
    assert good.result is QQExit.OK and bad.result is QQExit.INTD_DIR
    assert not store.paths.mess(bad.msgid).exists()
    assert store.paths.todo(good.msgid).exists()


def test_mess_file_is_created_without_a_pid_name(store: QueueStore) -> None:
    """O_TMPFILE: the mess file gets its name (its inode) in one link; pid/ stays empty."""
    msg = store.start(1, 0, b"R\n")
    assert os.listdir(store.paths.dir("pid")) == []
    assert store.paths.mess(msg.msgid).stat().st_ino == msg.msgid


def test_pid_dir_trouble_is_63(tmp_path: Path) -> None:
    """Without O_TMPFILE, qmail-queue's pid/ sequence; trouble there is exit 63."""
    create_queue(tmp_path / "queue")
    s = QueueStore(tmp_path / "queue")
    s._tmpfile = False  # as on a filesystem without O_TMPFILE
    os.rmdir(tmp_path / "queue" / "pid")
    with pytest.raises(QueueFailure) as info:
        s.start(1, 0, b"R\n")
    assert info.value.code is QQExit.PID_DIR
    os.close(s.root_fd)


def test_write_error_on_the_received_line_leaves_nothing(store: QueueStore,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # a full disk can refuse the very first write: the linked mess file must go too
    def full(msg: PendingMessage, data: bytes) -> None:
        raise QueueFailure(QQExit.WRITE_ERROR, "No space left on device")

    monkeypatch.setattr(store, "write", full)
    with pytest.raises(QueueFailure):
        store.start(1, 0, b"Received: x\n")
    assert all_files(store.paths) == []


# ------------------------------------------------------------------ qmail-clean


def test_clean_requests(store: QueueStore) -> None:
    msg = queue_one(store, b"x", Envelope("s@x", ("r@y",)))
    n = msg.msgid
    assert store.clean(CleanRequest.todo(n)) is CleanAnswer.DONE
    assert not store.paths.todo(n).exists() and not store.paths.intd(n).exists()
    assert store.paths.mess(n).exists()
    assert store.clean(CleanRequest.todo(n)) is CleanAnswer.DONE  # absent is fine
    assert store.clean(CleanRequest.foop(n)) is CleanAnswer.DONE
    assert all_files(store.paths) == []
    assert store.clean(CleanRequest.foop(n)) is CleanAnswer.DONE


def test_finished_files_are_recycled_as_the_next_messages_files(store: QueueStore) -> None:
    # the todo and mess inodes of a finished message become the next message's mess and
    # intd files (renamed, emptied), so no inode is allocated or freed per message
    first = queue_one(store, b"first body\n", Envelope("s@x", ("r@y",)))
    n = first.msgid
    todo_ino = os.stat(store.paths.todo(n)).st_ino
    assert store.clean(CleanRequest.todo(n)) is CleanAnswer.DONE
    assert store.clean(CleanRequest.foop(n)) is CleanAnswer.DONE
    spare_dir = store.paths.dir("spare-queue")
    store.spares.settle()
    assert len(os.listdir(spare_dir)) == 2 and len(store.spares) == 2
    second = queue_one(store, b"second\n", Envelope("a@b", ("c@d",)))
    assert os.listdir(spare_dir) == [] and len(store.spares) == 0
    assert {second.msgid, os.stat(store.paths.intd(second.msgid)).st_ino} == {n, todo_ino}
    assert store.paths.mess(second.msgid).read_bytes().endswith(b"\nsecond\n")
    assert store.paths.todo(second.msgid).read_bytes() == todo_bytes(1000, 4242, Envelope("a@b", ("c@d",)))


def test_clean_foop_refuses_committed_and_in_flight_messages(store: QueueStore) -> None:
    # eqmail's guard (so the scanner may sweep orphans at any time): foop/ of a message
    # that still has todo/, or that the writer is still writing, is refused with "!"
    msg = queue_one(store, b"x", Envelope("s@x", ("r@y",)))
    assert store.clean(CleanRequest.foop(msg.msgid)) is CleanAnswer.REFUSED
    assert store.paths.mess(msg.msgid).exists() and store.paths.todo(msg.msgid).exists()
    writing = store.start(2, 0, b"R\n")
    assert store.clean(CleanRequest.foop(writing.msgid)) is CleanAnswer.REFUSED
    assert store.paths.mess(writing.msgid).exists()
    # an orphan (what a killed writer leaves: mess, maybe intd, no todo) is removed
    orphan = store.start(3, 0, b"R\n")
    os.close(orphan.mess_fd)
    store.inflight.discard(orphan.msgid)  # as if the writer that created it had died
    store.paths.intd(orphan.msgid).write_bytes(b"u0\0p3\0F\0")
    assert store.clean(CleanRequest.foop(orphan.msgid)) is CleanAnswer.DONE
    assert not store.paths.mess(orphan.msgid).exists() and not store.paths.intd(orphan.msgid).exists()
    # once aborted, a message is no longer in flight
    store.abort(writing)
    assert writing.msgid not in store.inflight


@pytest.mark.parametrize("request_", ["foop/1", "bogus/12345", "todo/abc", "foop/12x45", "x" * 101,
                                      "todo/1/", "mess/1234567"])
def test_clean_malformed_requests(request_: str) -> None:
    # what qmail-clean answers "x" to: the writer answers CleanAnswer.BAD for these
    with pytest.raises(ProtocolError):
        CleanRequest.decode(request_.encode())


@pytest.mark.parametrize(("request_", "expected"), [
    ("foop/1234567", CleanRequest.foop(1234567)), ("todo/1234567", CleanRequest.todo(1234567)),
    ("todo/5/1234567", CleanRequest.todo(1234567))])
def test_clean_requests_read_as_qmail_clean_reads_them(request_: str, expected: CleanRequest) -> None:
    assert CleanRequest.decode(request_.encode()) == expected


def test_clean_unlink_failure_is_bang(store: QueueStore) -> None:
    store.paths.mess(1234567).mkdir()  # unlink of a directory fails with something other than ENOENT
    assert store.clean(CleanRequest.foop(1234567)) is CleanAnswer.REFUSED


def test_clean_pid_dir_removes_only_ossified_files(store: QueueStore) -> None:
    old = store.paths.pid("1.1.1")
    new = store.paths.pid("2.2.2")
    old.write_bytes(b"")
    new.write_bytes(b"")
    past = time.time() - OSSIFIED - 10
    os.utime(old, (past, past))
    assert store.clean_pid_dir() == 1
    assert os.listdir(store.paths.dir("pid")) == ["2.2.2"]


# ------------------------------------------------------------------ envelope parser


def test_envelope_errors() -> None:
    cases = {
        b"": 54,
        b"Xjoe\0\0": 91,
        b"Fjoe\0Xr\0\0": 91,
        b"Fjoe\0Tr\0": 54,  # no terminating NUL
        b"Fjoe": 54,
        b"F" + b"a" * 1003 + b"\0\0": 11,
        b"Fs\0T" + b"a" * 1003 + b"\0\0": 11,
        b"Fs\0T" + b"a" * 2000: 11,
    }
    for data, code in cases.items():
        with pytest.raises(EnvelopeRefused) as info:
            QueueEnvelope.decode(data)
        assert info.value.code == code, data[:20]


def test_envelope_address_length_limit_is_1002_bytes() -> None:
    ok = "a" * (ADDR_MAX - 1)
    assert QueueEnvelope.decode(b"F" + ok.encode() + b"\0T" + ok.encode() + b"\0\0") == QueueEnvelope(ok, (ok,))


def test_envelope_bytes_after_the_terminator_are_not_read() -> None:
    assert QueueEnvelope.decode(b"Fs\0Tr\0\0garbage") == QueueEnvelope("s", ("r",))


_addr = st.binary(max_size=1100).filter(lambda b: b"\0" not in b)


@given(st.tuples(_addr, st.lists(_addr, max_size=5)))
def test_envelope_round_trip_or_too_long(parts: tuple[bytes, list[bytes]]) -> None:
    sender, recips = parts
    data = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recips) + b"\0"
    if any(len(a) > 1002 for a in [sender, *recips]):
        with pytest.raises(EnvelopeRefused) as info:
            QueueEnvelope.decode(data)
        assert info.value.code == 11
        return
    env = QueueEnvelope.decode(data)
    assert env.encode() == data
    assert len(env.recipients) == len(recips)


@given(st.binary(max_size=300))
def test_envelope_parser_takes_any_bytes(data: bytes) -> None:
    try:
        env = QueueEnvelope.decode(data)
    except EnvelopeRefused as e:
        assert e.code in (11, 54, 91)
    else:
        assert data.startswith(env.encode())


def test_pipelined_step_links_the_previous_batch_with_one_barrier(store: QueueStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the committer's step: the files of the new batch and the todo links of the previous
    # one (whose files are already durable) share one barrier; a todo link is never made
    # before the barrier that covered its files
    import eqmail.queue.writer as writer_mod

    calls: list[str] = []
    real_syncfs = writer_mod.syncfs
    monkeypatch.setattr(writer_mod, "syncfs", lambda fd: (calls.append("syncfs"), real_syncfs(fd)))

    def ready(i: int) -> PendingMessage:
        m = store.start(i, 0, b"R\n")
        store.write(m, b"body %d\n" % i)
        m.envelope = Envelope("s@x", (f"r{i}@y",))
        return m

    a, b = ready(1), ready(2)
    assert store.commit_step([], [a, b]) == [a, b]
    assert calls == ["syncfs"] and a.result is None and not store.paths.todo(a.msgid).exists()
    c = ready(3)
    assert store.commit_step([a, b], [c]) == [c]
    assert calls == ["syncfs", "syncfs"]
    assert a.result is b.result is QQExit.OK and c.result is None
    assert store.paths.todo(a.msgid).exists() and not store.paths.todo(c.msgid).exists()
    assert store.commit_step([c], []) == []  # one link alone: fsync of its todo/N, no syncfs
    assert calls == ["syncfs", "syncfs"] and c.result is QQExit.OK and store.paths.todo(c.msgid).exists()
