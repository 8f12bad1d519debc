"""One log stream.

Every worker writes its log lines to fd 2, which the supervisor points at the logger
worker's pipe; lines up to PIPE_BUF (4096) bytes are written atomically, so lines from
different workers never interleave.  The logger adds the timestamp.  Lines follow
qmail's wording (``new msg N``, ``delivery N: success: ...``, ``qmail-smtpd: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

MAX_LINE = 4000


def sanitize(text: str) -> str:
    """The one log-safety rule, applied to every line by log()/log_lines().

    qmail-send's: a newline becomes ``/`` and every other unprintable character ``_`` --
    here "unprintable" is Python's: C0 and C1 controls (CR, ESC, NUL, DEL, NEL), line and
    paragraph separators, and format characters such as U+202E (right-to-left override).
    So no client-supplied string (HELO, envelope address, AUTH user, a remote server's
    text) can start a forged log line or send a terminal escape sequence.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "/" if ch == "\n" else "_" for ch in text)


def _encode(line: str) -> bytes:
    return (sanitize(line[:MAX_LINE]) + "\n").encode("utf-8", "backslashreplace")


_held: list[str] | None = None  # lines held by hold_log() until flush_log()


def log(line: str) -> None:
    if _held is not None:
        _held.append(line)
        return
    _write(_encode(line))


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
        data = _encode(line)
        if size + len(data) > 4096 and chunk:
            _write(b"".join(chunk))
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        _write(b"".join(chunk))


_direct: Callable[[list[bytes]], bytes] | None = None  # see write_directly()


def write_directly(fmt: Callable[[list[bytes]], bytes]) -> None:
    """From now on this process's lines are shaped by ``fmt`` (a batch of lines without
    newlines -> the bytes to write) before they reach fd 2: the supervisor's last lines,
    written after the logger has stopped, keep the log's format (eqmail.logformat)."""
    global _direct
    _direct = fmt


def _write(data: bytes) -> None:
    if _direct is not None:
        data = _direct(data.split(b"\n")[:-1])
    try:
        os.write(2, data)
    except OSError:
        pass
