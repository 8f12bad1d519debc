"""The DATA phase of qmail-smtpd: wire bytes -> stored message bytes, in large chunks.

Owns (reference/qmail-core.md §5.1, DESIGN.md "stricter"):
- CRLF becomes LF; a bare CR is message data; a bare LF anywhere is an error (the
  session answers ``451 See http://pobox.com/~djb/docs/smtplf.html.`` and closes);
- only CR LF ``.`` CR LF ends the message (or ``.`` CR LF right after ``354``).  None of
  ``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n``, ``\\n.\\r\\n`` ends it — that is what makes SMTP
  smuggling impossible: the bare-LF forms are refused, the bare-CR form is data;
- a line's leading dot is removed (``..`` -> ``.``);
- hop count: header lines (before the first empty line) beginning with ``received`` or
  ``delivered`` in any case; the session refuses the message when it reaches 100;
- databytes: stored bytes are counted; once over the limit nothing more is passed on
  (the session reads on to the end and answers 552).

Inputs: the session's unconsumed input buffer.  Outputs: stored bytes to pass on and how
many input bytes were consumed.  Never holds a whole message: complete lines are
converted with ``bytes.replace`` and the end is found with ``bytes.find``; a line without
LF is passed on in pieces once it exceeds ``PARTIAL_FLUSH`` bytes.  Pure, never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

MAXHOPS = 100
# An unfinished line longer than this is passed on in pieces (bounds the input buffer).
PARTIAL_FLUSH = 64 * 1024
_HOP = re.compile(rb"^(?:received|delivered)", re.IGNORECASE | re.MULTILINE)
_END = b"\r\n.\r\n"


class DataStatus(Enum):
    MORE = "more"        # everything usable was consumed; feed more input
    END = "end"          # the terminating line was consumed
    BARE_LF = "bare_lf"  # a bare LF: the message must be dropped and the session closed


@dataclass(frozen=True)
class DataStep:
    stored: bytes       # converted bytes for the queue (empty once over databytes)
    consumed: int       # input bytes used up
    status: DataStatus


class DataReader:
    """State of one message's DATA phase; feed it the input buffer repeatedly."""

    def __init__(self, databytes: int) -> None:
        self.databytes = databytes
        self.stored_bytes = 0
        self.hops = 0
        self.too_big = False
        self._line_start = True   # next input byte begins a line
        self._in_header = True

    @property
    def looping(self) -> bool:
        return self.hops >= MAXHOPS

    def step(self, buf: bytes) -> DataStep:
        """Consume what can be decided from ``buf`` (which starts where the last step
        stopped)."""
        if self._line_start and buf[:1] == b".":
            if buf[:3] == b".\r\n":
                return DataStep(b"", 3, DataStatus.END)
            if buf in (b".", b".\r"):
                return DataStep(b"", 0, DataStatus.MORE)  # could still be the end line
        end = buf.find(_END)
        if end >= 0:
            region, consumed = buf[:end + 2], end + 5
        else:
            last_lf = buf.rfind(b"\n")
            region, consumed = buf[:last_lf + 1], last_lf + 1
        if region.count(b"\n") != region.count(b"\r\n"):
            return DataStep(b"", consumed, DataStatus.BARE_LF)
        stored = self._convert(region) if region else b""
        if end >= 0:
            return DataStep(self._account(stored), consumed, DataStatus.END)
        tail = len(buf) - consumed
        if tail > PARTIAL_FLUSH:
            # A long line with no LF yet: pass it on, keeping a final CR back (it may be
            # the first half of CRLF).
            cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            stored += self._partial(buf[consumed:cut])
            consumed = cut
        return DataStep(self._account(stored), consumed, DataStatus.MORE)

    def _convert(self, region: bytes) -> bytes:
        """Complete lines (region ends in CRLF) -> stored form; counts hops."""
        text = region.replace(b"\r\n", b"\n")
        if self._line_start and text[:1] == b".":
            text = text[1:]
        text = text.replace(b"\n.", b"\n")
        if self._in_header:
            self._count_hops(text, self._line_start)
        self._line_start = True
        return text

    def _partial(self, piece: bytes) -> bytes:
        """Part of a line that has no LF yet (contains no LF at all)."""
        if self._line_start:
            if piece[:1] == b".":
                piece = piece[1:]
            if self._in_header and _HOP.match(piece):
                self.hops += 1
        self._line_start = False
        return piece

    def _count_hops(self, text: bytes, starts_line: bool) -> None:
        if starts_line and text[:1] == b"\n":
            self._in_header = False
            return
        blank = text.find(b"\n\n")
        header = text if blank < 0 else text[:blank + 1]
        if blank >= 0:
            self._in_header = False
        if self.hops >= MAXHOPS:
            return
        for match in _HOP.finditer(header):
            if match.start() == 0 and not starts_line:
                continue  # continuation of a line whose start was already counted
            self.hops += 1

    def _account(self, stored: bytes) -> bytes:
        """Count stored bytes against databytes; pass nothing on once over the limit."""
        if not stored or self.too_big:
            return b""
        self.stored_bytes += len(stored)
        if self.databytes and self.stored_bytes > self.databytes:
            self.too_big = True
            return b""
        return stored
