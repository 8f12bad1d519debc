"""Runs the atheris target tests/fuzz/fuzz_session.py for a bounded time (issue 8, part 3).

The corpus is seeded with the client side of every SMTP transcript in tests/cases/smtp
(under several option bytes and chunk sizes), plus tests/fuzz/smtp.dict.  The run lasts
EQMAIL_FUZZ_SECONDS (default 20) and fails on any crash: an exception escaping the
session, a broken invariant, or libFuzzer's own findings (the reproducer is kept in the
test's tmp directory and named in the failure; replay it with
``python tests/fuzz/fuzz_session.py <file>``).  The seeds are also run once in-process,
so a broken seed shows up with a normal traceback.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

HERE = Path(__file__).parent
TARGET = HERE / "fuzz_session.py"
SECONDS = int(os.environ.get("EQMAIL_FUZZ_SECONDS", "20"))

sys.path.insert(0, str(HERE.parent))
from smtp_transcript import all_cases, load  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SECONDS + 120)]


def seeds() -> list[bytes]:
    """Client bytes of every transcript, under a few option/chunk combinations."""
    out = []
    for path in all_cases():
        client = b"".join(s.data for s in load(path).steps if s.kind == "send")
        for options, chunk in ((0x00, 0), (0x07, 0), (0x2F, 3), (0x5E, 1), (0x9B, 17), (0xD6, 64)):
            out.append(bytes([options, chunk]) + client)
    return out


def test_seeds_pass_in_process() -> None:
    sys.path.insert(0, str(HERE))
    try:
        import fuzz_session
    finally:
        sys.path.remove(str(HERE))
    for seed in seeds():
        fuzz_session.run_one(seed)


def test_atheris_finds_no_crash_in_the_session(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in seeds():
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [sys.executable, str(TARGET), f"-max_total_time={SECONDS}", "-timeout=10",
           "-rss_limit_mb=2048", "-max_len=4096", f"-dict={HERE / 'smtp.dict'}",
           f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 90,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(HERE.parent.parent)))
    found = sorted(p.name for p in artifacts.iterdir())
    tail = proc.stderr[-6000:]
    assert proc.returncode == 0 and not found, (
        f"fuzzer exit {proc.returncode}, artifacts {found} in {artifacts}\n{tail}")
    runs = [ln for ln in proc.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    print(f"\n{runs[-1] if runs else 'no stats'} in {SECONDS}s")
