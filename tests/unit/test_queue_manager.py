"""The scanner's queue logic (eqmail.queue.manager): bounded reads, retries, stale clean requests."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from eqmail.control import load_controls
from eqmail.ipc.queue import CleanAnswer, CleanRequest
from eqmail.queue.fileio import read_bounded
from eqmail.queue.layout import create_queue
from eqmail.queue.manager import QueueManager


def test_read_bounded_reads_whole_small_files_and_stops_at_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "todo"
    f.write_bytes(b"")
    assert read_bounded(f, 100) == b""
    data = bytes(range(256)) * 1000  # 256 000 bytes: several 64 KiB reads
    f.write_bytes(data)
    assert read_bounded(f, 1 << 20) == data
    assert read_bounded(f, 70_000) == data[:70_000]


def _manager(tmp_path: Path, cleaned: list[str]) -> QueueManager:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test.example\n")
    paths = create_queue(tmp_path / "queue")

    def cleaner(requests: list[CleanRequest]) -> list[CleanAnswer]:
        cleaned.extend(str(r) for r in requests)  # as the frames carry them
        return [CleanAnswer.DONE] * len(requests)

    return QueueManager(load_controls(tmp_path), paths, cleaner, lambda *a: (True, "1"))


def test_a_late_foop_never_hits_a_newer_message_with_the_recycled_id(tmp_path: Path) -> None:
    # message 4242 finished, but its foop/ was refused (writer restarting) and waits for
    # a retry; meanwhile its inode was recycled as the id of a new message, which has
    # been preprocessed (info/ exists): the retry must be dropped, not remove mess/4242
    cleaned: list[str] = []
    m = _manager(tmp_path, cleaned)
    m.foop_retry[4242] = 0.0
    m.paths.mess(4242).write_bytes(b"the new message\n")
    m.paths.info(4242).write_bytes(b"Fs@x\0")
    m.retry_done()
    m.pending_foop.append(4242)
    m.flush_cleans()
    assert cleaned == [] and 4242 not in m.foop_retry
    # without a newer message the retry goes out as before
    m.paths.info(4242).unlink()
    m.foop_retry[4242] = 0.0
    m.retry_done()
    assert cleaned == ["foop/4242"]


def test_sweep_leaves_messages_whose_foop_is_already_on_its_way(tmp_path: Path) -> None:
    cleaned: list[str] = []
    m = _manager(tmp_path, cleaned)
    for msgid in (100, 200, 300):
        m.paths.mess(msgid).write_bytes(b"x")
    m.foop_retry[100] = 1e12
    m.pending_foop.append(200)
    assert m.sweep() == 1 and cleaned == ["foop/300"]


def test_a_todo_entry_that_cannot_be_preprocessed_is_flagged_for_an_early_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # disk full while splitting todo/: the entry stays, and the scanner is told to try
    # again soon (TODO_TROUBLE_RETRY) rather than at its 60 s rescan
    cleaned: list[str] = []
    m = _manager(tmp_path, cleaned)
    m.paths.mess(77).write_bytes(b"Subject: x\n\nbody\n")
    m.paths.todo(77).write_bytes(b"u0\0p1\0Fs@x\0Tr@mx.test.example\0\0")

    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(m.preprocessor, "_write_split", full)
    assert m.process_todo() == 0 and m.todo_trouble and m.paths.todo(77).exists() and cleaned == []
    monkeypatch.undo()
    m.todo_trouble = False
    assert m.process_todo() == 1 and not m.todo_trouble and cleaned == ["todo/8/77"]


def test_bounces_to_one_sender_are_limited_double_bounces_are_not_and_the_copy_is_bounded(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test.example\n")
    (tmp_path / "control" / "bouncelimit").write_text("2\n")
    (tmp_path / "control" / "bouncemaxbytes").write_text("1000\n")
    paths = create_queue(tmp_path / "queue")
    injected: list[tuple[str, list[str], bytes, int, int]] = []

    def injector(sender: str, rcpts: list[str], head: bytes, msgid: int, limit: int) -> tuple[bool, str]:
        injected.append((sender, rcpts, head, msgid, limit))
        return True, "1"

    m = QueueManager(load_controls(tmp_path), paths, lambda r: [CleanAnswer.DONE] * len(r), injector)
    senders = {101: "Forged@Victim.example", 102: "forged@victim.example",
               103: "FORGED@victim.example", 104: "other@victim.example",
               201: "", 202: "", 203: "", 204: ""}
    for msgid, sender in senders.items():
        m.paths.mess(msgid).write_bytes(b"Subject: x\n\n" + b"y\n" * 5000)
        m.paths.info(msgid).write_bytes(f"F{sender}\0".encode())
        m.paths.bounce(msgid).write_bytes(b"<nobody@mx.test.example>:\nSorry. (#5.1.1)\n\n")
        assert m.message_done(msgid)
        assert not m.paths.bounce(msgid).exists()
    got = [(msgid, rcpts[0]) for _s, rcpts, _h, msgid, _l in injected]
    assert got == [(101, "Forged@Victim.example"), (102, "forged@victim.example"),
                   (104, "other@victim.example")] + [
        (i, "postmaster@mx.test.example") for i in (201, 202, 203, 204)]
    err = capfd.readouterr().err
    assert ("bounce limit: discarding bounce/103 to FORGED@victim.example: more than 2 "
            "bounces to this address within an hour") in err
    assert err.count("bounce limit:") == 1
    # every bounce says its copy is cut, and the injector is told to cut it
    assert all(limit == 1000 and b"cut to at most 1000 of its 10012 bytes" in head
               for _s, _r, head, _m, limit in injected)
