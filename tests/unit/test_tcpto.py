"""eqmail.queue.tcpto: qmail's back-off rules on eqmail's IPv4+IPv6 record file."""

from __future__ import annotations

import os
from pathlib import Path

from eqmail.queue import tcpto


def test_rules_are_qmails() -> None:
    t0 = 1_000_000.0
    pid = 0x1234  # (60 + (pid & 31)) << 6 = (60 + 20) * 64 = 5120 s
    recs = tcpto._decode(b"")
    recs = tcpto.updated(recs, "192.0.2.1", True, t0)
    assert recs is not None and not tcpto.should_skip(recs, "192.0.2.1", t0 + 1, pid)
    assert tcpto.updated(recs, "192.0.2.1", True, t0 + 119) is None  # within 120 s: not counted
    recs = tcpto.updated(recs, "192.0.2.1", True, t0 + 121)
    assert recs is not None
    assert tcpto.should_skip(recs, "192.0.2.1", t0 + 121 + 5119, pid)
    assert not tcpto.should_skip(recs, "192.0.2.1", t0 + 121 + 5120, pid)
    assert not tcpto.should_skip(recs, "192.0.2.2", t0 + 122, pid)
    recs = tcpto.updated(recs, "192.0.2.1", False, t0 + 200)  # success resets
    assert recs is not None and not tcpto.should_skip(recs, "192.0.2.1", t0 + 201, pid)
    assert tcpto.updated(recs, "192.0.2.9", False, t0) is None  # success for unknown: nothing


def test_count_is_capped_and_full_table_replaces_cheapest() -> None:
    recs = tcpto._decode(b"")
    for i in range(20):
        recs = tcpto.updated(recs, "2001:db8::1", True, 1000.0 + i * 200)  # type: ignore[arg-type]
    assert recs is not None and max(r[1] for r in recs) == tcpto.MAX_COUNT
    for i in range(tcpto.RECORDS - 1):
        recs = tcpto.updated(recs, f"10.0.{i // 250}.{i % 250}", True, 5000.0 + i)  # type: ignore[arg-type]
    assert recs is not None and all(r[0] for r in recs)
    recs = tcpto.updated(recs, "10.9.9.9", True, 9000.0)
    assert recs is not None
    entries = {r[3] for r in recs}
    assert bytes([10, 0, 0, 0]) + bytes(12) not in entries  # the oldest single failure went
    assert bytes.fromhex("20010db8000000000000000000000001") in entries  # count 10 kept


def test_file_roundtrip_ipv4_and_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "tcpto"
    path.write_bytes(bytes(1024))  # qmail's old size reads as empty
    t = tcpto.Tcpto(path)
    for ip in ("192.0.2.7", "2001:db8::7"):
        t.record(ip, failed=True)
    assert os.path.getsize(path) == tcpto.SIZE
    assert {(ip, n) for ip, n, _ in t.entries()} == {("192.0.2.7", 1), ("2001:db8::7", 1)}
    assert not t.blocked("2001:db8::7")  # one failure is not enough
    raw = bytearray(path.read_bytes())  # age the entries and count another failure each
    for i in range(tcpto.RECORDS):
        off = i * tcpto.RECORD.size
        fam, count, when, addr = tcpto.RECORD.unpack_from(raw, off)
        if fam:
            tcpto.RECORD.pack_into(raw, off, fam, count, when - 300, addr)
    path.write_bytes(bytes(raw))
    t.record("2001:db8::7", failed=True)
    t.record("::ffff:192.0.2.7", failed=True)  # a mapped address is the IPv4 host
    assert t.blocked("2001:db8::7") and t.blocked("192.0.2.7")
    t.record("192.0.2.7", failed=False)
    assert not t.blocked("192.0.2.7")
    tcpto.clear(path)
    assert path.read_bytes() == bytes(tcpto.SIZE) and t.entries() == []


def test_missing_or_unwritable_file_never_blocks(tmp_path: Path) -> None:
    t = tcpto.Tcpto(tmp_path / "nodir" / "tcpto")
    t.record("192.0.2.1", failed=True)
    assert not t.blocked("192.0.2.1")
    tcpto.clear(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
