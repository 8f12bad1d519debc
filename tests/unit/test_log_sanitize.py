"""The one log-safety helper: no client string can start a line or carry a control."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from eqmail import log as eqlog
from eqmail.log import sanitize
from eqmail.workers.logger import scrub


def test_sanitize_table() -> None:
    assert sanitize("helo client.example") == "helo client.example"
    assert sanitize("a\nb") == "a/b"
    assert sanitize("a\r\nb") == "a_/b"
    assert sanitize("\x1b[2J\x07\x00\x7f") == "_[2J___"
    assert sanitize("x\x85y\u2028z\u202ew") == "x_y_z_w"  # NEL, LINE SEPARATOR, RLO
    assert sanitize("jörg@bücher.example") == "jörg@bücher.example"


@given(st.text())
def test_sanitize_is_one_printable_line(text: str) -> None:
    out = sanitize(text)
    assert out.isprintable()
    assert len(out) == len(text)


@given(st.binary(max_size=5000))
def test_scrub_leaves_no_control_byte(line: bytes) -> None:
    out = scrub(line.replace(b"\n", b""))
    assert not any(b < 0x20 or b == 0x7F for b in out)
    assert len(out) <= 4000


def test_log_writes_one_safe_line(tmp_path: object) -> None:
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        eqlog.log("qmail-smtpd: helo evil\r\nforged: line\x1b[0m")
        eqlog.log_lines(["one\nfake", "two\x00"])
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    data = os.read(r, 65536)
    os.close(r)
    assert data == b"qmail-smtpd: helo evil_/forged: line_[0m\none/fake\ntwo_\n"
