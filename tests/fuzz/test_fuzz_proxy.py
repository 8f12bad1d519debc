"""Runs the atheris target tests/fuzz/fuzz_proxy.py (the PROXY protocol parser) for a
bounded time, seeded with valid v1 and v2 headers of every kind, each under a few
piece sizes, plus tests/fuzz/proxy.dict.  The run lasts EQMAIL_FUZZ_SECONDS (default
20) and fails on any crash (the reproducer is kept in the test's tmp directory and
named in the failure; replay it with ``python tests/fuzz/fuzz_proxy.py <file>``).  The
seeds are also run once in-process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

from eqmail.smtp.proxy import encode_v1, encode_v2  # noqa: E402

HERE = Path(__file__).parent
TARGET = HERE / "fuzz_proxy.py"
SECONDS = int(os.environ.get("EQMAIL_FUZZ_SECONDS", "20"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SECONDS + 120)]


def seeds() -> list[bytes]:
    v4, v6 = (("192.0.2.1", 4000), ("192.0.2.2", 25)), (("2001:db8::1", 4000), ("2001:db8::2", 25))
    headers = [encode_v1(*v4), encode_v1(*v6), encode_v1(None, None), encode_v2(*v4), encode_v2(*v6),
               encode_v2(None, None), encode_v2(*v4, ((0x04, b"pad"), (0x05, b"id")))]
    return [bytes([step]) + h + b"EHLO x\r\n" for h in headers for step in (0, 1, 7, 16)]


def test_seeds_pass_in_process() -> None:
    sys.path.insert(0, str(HERE))
    try:
        import fuzz_proxy
    finally:
        sys.path.remove(str(HERE))
    for seed in seeds():
        fuzz_proxy.run_one(seed)


def test_atheris_finds_no_crash_in_the_proxy_parser(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in seeds():
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [sys.executable, str(TARGET), f"-max_total_time={SECONDS}", "-timeout=10",
           "-rss_limit_mb=2048", "-max_len=1200", f"-dict={HERE / 'proxy.dict'}",
           f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 90,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(HERE.parent.parent)))
    found = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not found, (
        f"fuzzer exit {proc.returncode}, artifacts {found} in {artifacts}\n{proc.stderr[-6000:]}")
