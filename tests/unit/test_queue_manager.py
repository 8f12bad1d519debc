"""Pure helpers of the scanner's queue logic (eqmail.queue.manager)."""

from __future__ import annotations

from pathlib import Path

from eqmail.queue.manager import read_bounded


def test_read_bounded_reads_whole_small_files_and_stops_at_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "todo"
    f.write_bytes(b"")
    assert read_bounded(f, 100) == b""
    data = bytes(range(256)) * 1000  # 256 000 bytes: several 64 KiB reads
    f.write_bytes(data)
    assert read_bounded(f, 1 << 20) == data
    assert read_bounded(f, 70_000) == data[:70_000]
