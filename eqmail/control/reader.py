"""Reading files under an instance's control/ (and users/) the way qmail does.

Owns: the bounded read of one file, qmail's line rules and the file:line errors of the
one-line kinds in :mod:`eqmail.control.files` (numbers and texts).  Every file read is
remembered with its path (``eqmailctl check`` shows where a value came from); every
problem is collected, never raised, so that one load reports all of them.

qmail's reading rules: single-line files use the first line with trailing spaces and
tabs removed; list files drop empty lines and lines starting with ``#``.

Failure modes: an OSError other than "file absent" is recorded as
``control/<name>:0: unreadable: ...``, a file over MAX_CONTROL_BYTES as ``file too large``.
"""

from __future__ import annotations

import re
from pathlib import Path

from eqmail.control.files import NUMBERS, TEXTS
from eqmail.errors import ControlFileError

MAX_CONTROL_BYTES = 4 * 1024 * 1024  # bounded read of any one control file
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)


class Reader:
    """Reads files under control/, remembering where each value came from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.errors: list[ControlFileError] = []
        self.sources: dict[str, str] = {}
        self.numbers: dict[str, int] = {}  # the numbers read so far (a default may follow one)

    def error(self, fn: str, line: int, reason: str) -> None:
        self.errors.append(ControlFileError(f"control/{fn}", line, reason))

    def raw(self, fn: str, base: str = "control") -> str | None:
        path = self.root / base / fn
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONTROL_BYTES + 1)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        except OSError as e:
            self.errors.append(ControlFileError(f"{base}/{fn}", 0, f"unreadable: {e.strerror}"))
            return None
        if len(data) > MAX_CONTROL_BYTES:
            self.errors.append(ControlFileError(f"{base}/{fn}", 0, "file too large"))
            return None
        self.sources[fn] = str(path)
        return data.decode("utf-8", "surrogateescape")

    def line(self, fn: str) -> str | None:
        text = self.raw(fn)
        if text is None:
            return None
        first = text.split("\n", 1)[0]
        return first.rstrip(" \t\r")

    def lines(self, fn: str) -> list[tuple[int, str]] | None:
        text = self.raw(fn)
        if text is None:
            return None
        out: list[tuple[int, str]] = []
        for n, ln in enumerate(text.split("\n"), 1):
            ln = ln.rstrip(" \t\r")
            if not ln or ln.startswith("#"):
                continue
            out.append((n, ln))
        return out

    def text(self, fn: str, me: str = "") -> str:
        """A one-line text file of the table (:data:`TEXTS`): its first line, else its
        default — for the files whose default is control/me, ``me`` when set."""
        spec = TEXTS[fn]
        value = self.line(fn)
        if value:
            return value
        return (me or spec.default) if spec.from_me else spec.default

    def number(self, fn: str) -> int:
        """A one-line number file of the table (:data:`NUMBERS`), within its bounds; its
        default when absent or empty, and after an error."""
        spec = NUMBERS[fn]
        default = spec.default if isinstance(spec.default, int) else self.numbers[spec.default]
        self.numbers[fn] = n = self._number(fn, default, spec.lo, spec.hi)
        return n

    def _number(self, fn: str, default: int, lo: int, hi: int) -> int:
        value = self.line(fn)
        if value is None or value == "":
            return default
        text = value.strip()
        # ASCII digits with an optional sign only: Python's int() would also take
        # "1_000" and non-ASCII digits, which no qmail tool reads as that number.
        if not _INTEGER.fullmatch(text):
            self.error(fn, 1, f"not a number: {value!r}")
            return default
        n = int(text)
        if not lo <= n <= hi:
            self.error(fn, 1, f"{n} out of range {lo}..{hi}")
            return default
        return n

    def hostlist(self, fn: str) -> tuple[str, ...] | None:
        """A list of host names, lower-cased; None when the file is absent."""
        lines = self.lines(fn)
        if lines is None:
            return None
        return tuple(ln.strip().lower() for _, ln in lines)

    def stripped(self, fn: str) -> tuple[str, ...]:
        """A list file's lines with surrounding blanks removed; () when absent."""
        return tuple(ln.strip() for _, ln in (self.lines(fn) or []))
