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


def log(line: str) -> None:
    data = (line[:MAX_LINE] + "\n").encode("utf-8", "backslashreplace")
    try:
        os.write(2, data)
    except OSError:
        pass


def log_lines(lines: list[str]) -> None:
    """Several lines in as few writes as possible, each write at most PIPE_BUF bytes so
    that it stays atomic (lines from other workers never land inside it)."""
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
