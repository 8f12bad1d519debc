"""One log stream.

Every worker writes its log lines to fd 2, which the supervisor points at the logger
worker's pipe; lines up to PIPE_BUF (4096) bytes are written atomically, so lines from
different workers never interleave.  The logger adds the timestamp.  Lines follow
qmail's wording (``new msg N``, ``delivery N: success: ...``, ``qmail-smtpd: ...``).
"""

from __future__ import annotations

import os

MAX_LINE = 4000


def sanitize(text: str) -> str:
    """qmail-send's log safety: unprintables become ``_``, newlines ``/``."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("/")
        elif ch < " " or ch == "\x7f":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


_held: list[str] | None = None  # lines held by hold_log() until flush_log()


def log(line: str) -> None:
    if _held is not None:
        _held.append(line)
        return
    data = (line[:MAX_LINE] + "\n").encode("utf-8", "backslashreplace")
    try:
        os.write(2, data)
    except OSError:
        pass


def hold_log() -> None:
    """From now on keep lines until flush_log() (a busy loop logs several lines per
    message; one write per loop turn instead of one per line)."""
    global _held
    if _held is None:
        _held = []


def flush_log() -> None:
    global _held
    if _held:
        lines, _held = _held, []
        _write_lines(lines)


def log_lines(lines: list[str]) -> None:
    """Several lines in as few writes as possible, each write at most PIPE_BUF bytes so
    that it stays atomic (lines from other workers never land inside it)."""
    if _held is not None:
        _held.extend(lines)
        return
    _write_lines(lines)


def _write_lines(lines: list[str]) -> None:
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        data = (line[:MAX_LINE] + "\n").encode("utf-8", "backslashreplace")
        if size + len(data) > 4096 and chunk:
            _write(b"".join(chunk))
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        _write(b"".join(chunk))


def _write(data: bytes) -> None:
    try:
        os.write(2, data)
    except OSError:
        pass
