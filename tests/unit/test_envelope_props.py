"""Hypothesis properties of the queue's record formats (eqmail.queue.envelope) beyond the
qmail-queue envelope reader already covered in test_queue_writer.py: the readers of
todo/intd/info files (parse_records) and of local/remote channel files (parse_channel),
which the scanner runs on whatever a crash left on disk.

- neither reader raises on any bytes; a record cut short by a crash (no NUL) is dropped,
  never half-read;
- todo_bytes -> parse_records and QueueEnvelope.encode -> decode (eqmail.ipc.queue)
  round-trip any addresses (every byte survives, surrogateescape);
- a channel record's offset points at its T/D letter, so writing ``D`` there (the scanner's
  done mark) marks exactly that recipient done.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.ipc.queue import QueueEnvelope
from eqmail.queue.envelope import (
    Envelope,
    parse_channel,
    parse_records,
    todo_bytes,
)
from eqmail.textio import decode

addr = st.binary(max_size=60).filter(lambda b: b"\0" not in b).map(decode)


@settings(max_examples=400)
@given(st.binary(max_size=400))
def test_readers_take_any_bytes(data: bytes) -> None:
    records = parse_records(data)
    assert sum(len(r.value.encode("utf-8", "surrogateescape")) + 2 for r in records) <= len(data)
    for rec in parse_channel(data):
        assert data[rec.offset:rec.offset + 1] == (b"D" if rec.done else b"T")


@given(st.integers(0, 2**31), st.integers(0, 2**31), addr, st.lists(addr, max_size=6))
def test_todo_round_trip(uid: int, qp: int, sender: str, rcpts: list[str]) -> None:
    data = todo_bytes(uid, qp, Envelope(sender, tuple(rcpts)))
    recs = [(r.kind, r.value) for r in parse_records(data)]
    assert recs[:3] == [("u", str(uid)), ("p", str(qp)), ("F", sender)]
    assert [v for k, v in recs[3:]] == rcpts and all(k == "T" for k, _ in recs[3:])


@given(addr, st.lists(addr, max_size=6), st.integers(0, 300))
def test_a_record_cut_by_a_crash_is_dropped(sender: str, rcpts: list[str], cut: int) -> None:
    data = todo_bytes(0, 1, Envelope(sender, tuple(rcpts)))
    cut = min(cut, len(data))
    whole = parse_records(data)
    partial = parse_records(data[:cut])
    assert partial == whole[:len(partial)]  # a prefix: nothing half-read
    assert len(partial) == data[:cut].count(b"\0") - sum(1 for r in data[:cut].split(b"\0")[:-1] if not r)


@given(addr, st.lists(addr, max_size=6))
def test_queue_envelope_round_trip(sender: str, rcpts: list[str]) -> None:
    env = QueueEnvelope(sender, tuple(rcpts))
    if all(len(a.encode("utf-8", "surrogateescape")) <= 1002 for a in [sender, *rcpts]):
        assert QueueEnvelope.decode(env.encode()) == env


@given(st.lists(st.tuples(st.booleans(), addr), max_size=8), st.data())
def test_done_mark_at_the_offset_marks_exactly_one(records: list[tuple[bool, str]], data: st.DataObject) -> None:
    raw = bytearray(b"".join((b"D" if done else b"T") + a.encode("utf-8", "surrogateescape") + b"\0"
                             for done, a in records))
    parsed = parse_channel(bytes(raw))
    assert [(r.done, r.address) for r in parsed] == records
    todo = [i for i, r in enumerate(parsed) if not r.done]
    if not todo:
        return
    i = data.draw(st.sampled_from(todo))
    raw[parsed[i].offset] = ord("D")
    after = parse_channel(bytes(raw))
    assert [r.done for r in after] == [r.done or j == i for j, r in enumerate(parsed)]
