"""control/logformat: the stamps and JSON records the logger writes (eqmail.logformat),
checked against the tools that read them — daemontools' tai64nlocal, datetime's RFC
3339 parser, json.loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from eqmail.control import load_controls
from eqmail.errors import ControlErrors
from eqmail.logformat import JSON_FIELDS, LogFormat, format_lines, tai64n

T = 1765134440.123456  # 2025-12-07 19:07:20.123456 UTC
LINES = [b"new msg 42", b"delivery 7: success: did_1+0+0/"]


def test_tai64n_label_is_multilogs() -> None:
    assert tai64n(0) == b"@400000000000000a00000000"
    assert tai64n(1_000_000_000.25) == b"@400000003b9aca0a0ee6b280"  # 10 s TAI-UTC, 250 ms
    out = format_lines(LINES, LogFormat.TAI64N, T)
    assert re.fullmatch(rb"(@4000[0-9a-f]{20} (new msg 42|delivery 7: success: did_1\+0\+0/)\n){2}", out), out


@pytest.mark.skipif(shutil.which("tai64nlocal") is None, reason="daemontools' tai64nlocal not installed")
def test_tai64nlocal_reads_our_labels_back_to_the_same_time() -> None:
    out = format_lines(LINES, LogFormat.TAI64N, T)
    env = dict(os.environ, TZ="UTC")
    res = subprocess.run(["tai64nlocal"], input=out, capture_output=True, env=env, timeout=10, check=True)
    assert re.fullmatch(rb"2025-12-07 19:07:20\.123456\d{3} new msg 42\n"
                        rb"2025-12-07 19:07:20\.123456\d{3} delivery 7: success: did_1\+0\+0/\n", res.stdout), res.stdout


def test_rfc3339_has_offset_and_microseconds_and_parses_back() -> None:
    for tz in ("UTC", "Europe/Berlin", "America/St_Johns"):
        os.environ["TZ"] = tz
        time.tzset()
        try:
            out = format_lines([b"x"], LogFormat.RFC3339, T)
        finally:
            del os.environ["TZ"]
            time.tzset()
        m = re.fullmatch(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d) x\n", out)
        assert m, out
        assert datetime.fromisoformat(m.group(1).decode()).timestamp() == pytest.approx(T, abs=1e-6)
        if tz == "America/St_Johns":
            assert m.group(1).endswith(b"-03:30")


def test_local_default_format_unchanged() -> None:
    out = format_lines([b"x"], LogFormat.LOCAL, T)
    assert re.fullmatch(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.123456 x\n", out), out


def test_journal_gets_no_stamp_but_json_keeps_its_time() -> None:
    lines = [*LINES, b"alert: x", b"warning: y", b"<0>a program's line"]
    for fmt in (LogFormat.LOCAL, LogFormat.TAI64N, LogFormat.RFC3339):
        assert format_lines(lines, fmt, T, journal=True) == (
            b"<6>new msg 42\n<6>delivery 7: success: did_1+0+0/\n<4>alert: x\n<4>warning: y\n"
            b"<6><0>a program's line\n")
    rec = json.loads(format_lines([b"x"], LogFormat.JSON, T, journal=True))
    assert "time" in rec


QMAIL_LINES: dict[bytes, dict[str, object]] = {
    b"new msg 1234": {"event": "new msg", "msg": 1234},
    b"info msg 1234: bytes 567 from <a@b.example> qp 99 uid 0":
        {"event": "info msg", "msg": 1234, "bytes": 567, "from": "a@b.example", "qp": 99, "uid": 0},
    b"info msg 5: bytes 1 from <> qp 2 uid 3": {"event": "info msg", "msg": 5, "from": ""},
    b"starting delivery 7: msg 1234 to local testuser@mx.test.example":
        {"event": "starting delivery", "delivery": 7, "msg": 1234, "channel": "local",
         "to": "testuser@mx.test.example"},
    b"delivery 7: success: did_1+0+0/": {"event": "delivery", "delivery": 7, "status": "success",
                                         "reason": "did_1+0+0/"},
    b"delivery 8: deferral: Sorry,_no_mailbox_here_by_that_name._(#4.2.1)/":
        {"event": "delivery", "delivery": 8, "status": "deferral"},
    b"delivery 9: failure: 550_no/": {"event": "delivery", "status": "failure"},
    b"end msg 1234": {"event": "end msg", "msg": 1234},
    b"bounce msg 1234 qp 77": {"event": "bounce msg", "msg": 1234, "qp": 77},
    b"alert: scanner (pid 9) exited with 1; restarting in 1s": {"level": "alert"},
    b"qmail-smtpd: message accepted: a@b from 127.0.0.1": {"event": "smtpd", "level": "info"},
}


def test_json_lines_have_fixed_fields_and_parse_qmail_lines() -> None:
    out = format_lines(list(QMAIL_LINES), LogFormat.JSON, T)
    records = [json.loads(ln) for ln in out.split(b"\n")[:-1]]
    assert len(records) == len(QMAIL_LINES)
    for (line, want), rec in zip(QMAIL_LINES.items(), records, strict=True):
        assert set(rec) <= set(JSON_FIELDS), rec
        assert rec["text"] == line.decode()
        assert datetime.fromisoformat(rec["time"]).timestamp() == pytest.approx(T, abs=1e-6)
        assert rec.items() >= want.items(), (line, rec)
    assert records[0]["level"] == "info"


def test_json_is_valid_for_any_bytes() -> None:
    """Whatever a program wrote on stderr (invalid UTF-8, quotes, backslashes, every
    byte value the logger's scrub leaves), each line is one JSON object."""
    nasty = [bytes(range(0x20, 0x100)), b'"quoted" \\ back\\slash', b"\xff\xfe\xed", "ünï €".encode(),
             b"\xed\xa0\x80 surrogate", b"", b"{\"not\": \"nested\"}"]
    out = format_lines(nasty, LogFormat.JSON, T)
    lines = out.split(b"\n")[:-1]
    assert len(lines) == len(nasty)
    for raw, ln in zip(nasty, lines, strict=True):
        rec = json.loads(ln.decode("utf-8"))  # strict UTF-8, no lone surrogates
        assert isinstance(rec, dict)
        assert rec["text"].encode("utf-8", "surrogateescape") == raw or "\\x" in rec["text"]
    assert json.loads(lines[2])["text"] == "\\xff\\xfe\\xed"
    assert json.loads(lines[3])["text"] == "ünï €"


def _root(tmp_path: Path, value: str | None) -> Path:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example\n")
    if value is not None:
        (tmp_path / "control" / "logformat").write_text(value)
    return tmp_path


@pytest.mark.parametrize(("text", "want"), [(None, LogFormat.LOCAL), ("", LogFormat.LOCAL),
                                            ("tai64n\n", LogFormat.TAI64N), ("RFC3339 \n", LogFormat.RFC3339),
                                            ("json\n# comment\n", LogFormat.JSON)])
def test_control_logformat_values(tmp_path: Path, text: str | None, want: LogFormat) -> None:
    assert load_controls(_root(tmp_path, text)).logformat is want


def test_control_logformat_unknown_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ControlErrors) as e:
        load_controls(_root(tmp_path, "syslog-ng\n"))
    assert str(e.value) == ("control/logformat:1: unknown format 'syslog-ng' "
                            "(one of local, tai64n, rfc3339, json)")
