"""The scanner's incremental pqstart (QueueManager.start_recovery / recover_step):
every info/ entry is recovered exactly once while new mail is preprocessed and
deliveries finish in between (issue 15: readiness does not wait for the queue)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.control import load_controls
from eqmail.ipc.delivery import Verdict
from eqmail.ipc.queue import CleanAnswer, CleanRequest
from eqmail.queue.layout import create_queue
from eqmail.queue.manager import QueueManager
from eqmail.queue.schedule import Channel


def _manager(root: Path, foops: list[int]) -> QueueManager:
    paths = create_queue(root / "queue")

    def cleaner(requests: list[CleanRequest]) -> list[CleanAnswer]:
        for r in requests:  # as the queue writer does
            kind, _, rest = str(r).partition("/")
            msgid = int(rest.rpartition("/")[2])
            if kind == "todo":
                paths.todo(msgid).unlink()
            elif kind == "foop":
                foops.append(msgid)
        return [CleanAnswer.DONE] * len(requests)

    return QueueManager(load_controls(root), paths, cleaner, lambda *a: (True, "1"))


def _queue(m: QueueManager, msgid: int, rcpt: str) -> None:
    m.paths.mess(msgid).write_bytes(b"Subject: x\n\nbody\n")
    m.paths.todo(msgid).write_bytes(b"u0\0p1\0Fs@x.test\0T" + rcpt.encode() + b"\0\0")


@settings(max_examples=30, deadline=None)
@given(old=st.integers(0, 60), new=st.integers(0, 20), slice_=st.integers(1, 50),
       finish=st.integers(0, 5))
def test_every_entry_is_recovered_exactly_once_while_mail_flows(
        old: int, new: int, slice_: int, finish: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "control").mkdir()
        (root / "control" / "me").write_text("mx.test\n")
        foops: list[int] = []
        first = _manager(root, foops)
        old_ids = list(range(1000, 1000 + old))
        for msgid in old_ids:
            _queue(first, msgid, "u@mx.test" if msgid % 2 else "r@remote.test")
        assert first.process_todo() == old
        for i, msgid in enumerate(old_ids):  # next try times saved by a graceful stop
            ch = "local" if msgid % 2 else "remote"
            t = 1_000_000.0 + i
            os.utime(first.paths.split_file(ch, msgid), (t, t))
        # a crash leftover: info/ without a channel file is completed once
        first.paths.mess(5).write_bytes(b"x\n")
        first.paths.info(5).write_bytes(b"Fs@x.test\0")

        m = _manager(root, foops)
        m.start_recovery()
        new_ids = iter(range(3000, 3000 + new))
        finishing = [i for i in old_ids if i % 2][:finish]
        while m.recover_step(slice_):
            msgid = next(new_ids, None)  # new mail between two slices
            if msgid is not None:
                _queue(m, msgid, "n@remote.test")
                m.process_todo()
            if finishing:  # a delivery the previous scanner left running finishes
                req = m.adopt(Channel.LOCAL, finishing.pop(), 0)
                if req is not None:
                    m.report(req, Verdict.SUCCESS, "did 1\n")
        for msgid in new_ids:
            _queue(m, msgid, "n@remote.test")
            m.process_todo()
        m.flush_cleans()
        assert not m.recovering and m.fresh_ids == set()
        local, remote = m.channels[Channel.LOCAL], m.channels[Channel.REMOTE]
        done = set(foops)
        assert foops.count(5) == 1 and all(foops.count(i) == 1 for i in done)
        for i, msgid in enumerate(old_ids):
            state = local if msgid % 2 else remote
            if msgid in done:
                assert msgid not in state.scheduled
            else:  # scheduled at its saved time, once
                assert state.scheduled[msgid] == 1_000_000.0 + i
        for msgid in range(3000, 3000 + new):  # due at once, not at a recovered mtime
            assert remote.scheduled[msgid] > 1_000_000.0 + old


def test_recover_all_at_once_still_works(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test\n")
    foops: list[int] = []
    first = _manager(tmp_path, foops)
    _queue(first, 42, "r@remote.test")
    first.process_todo()
    m = _manager(tmp_path, foops)
    m.recover()
    assert 42 in m.channels[Channel.REMOTE].scheduled and not m.recovering
