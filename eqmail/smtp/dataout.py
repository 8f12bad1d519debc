"""The DATA stream the SMTP client sends: a stored message made safe for the next hop.

Owns: the one rule for what a queued message looks like on the wire (qmail-remote's
blast(), made stricter) and its RFC 1870 size.  Every line end of the stored message —
LF (qmail's own), CRLF (a message that arrived with them, or a before-remote hook's
output) or a bare CR — becomes CRLF, so no bare CR or LF ever reaches the next hop
(an MTA that takes a bare CR or LF as a line end could otherwise see a "." line, an end
of data, that we never meant: SMTP smuggling).  notqmail's qmail-remote turns a bare CR
into CRLF too, but passes the second CR of "\\r\\r" raw and does not dot-stuff the line
a converted CR starts; here every wire line, however it began, gets its leading dot
doubled.  Pure; no I/O besides reading the given file.

Inputs: the message as chunks (any cut), or as a readable, seekable file.  Outputs: the
bytes to send, ending with the terminating ``.\\r\\n``; the size to announce with
``SIZE=``.  No failure modes (a message without a final line end is refused before
connecting, eqmail.workers.remote; here it would be ended with CRLF).
"""

from __future__ import annotations

import re
from typing import BinaryIO

CHUNK = 65536
LINE_END = re.compile(rb"\r\n|\r|\n")


class DataEncoder:
    """Stored message -> DATA stream, chunk by chunk; the result does not depend on
    where the chunks were cut (a CR at the end of one chunk waits for the next)."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self.held_cr:
            chunk, self.held_cr = b"\r" + chunk, False
        if chunk.endswith(b"\r"):  # CRLF or a bare CR: the next byte says which
            chunk, self.held_cr = chunk[:-1], True
        return self._encode(chunk)

    def end(self) -> bytes:
        """The rest (a final bare CR is a line end) and the terminating dot."""
        out = self._encode(b"\r") if self.held_cr else b""
        self.held_cr = False
        if not self.at_line_start:
            out += b"\r\n"  # never glue the dot to an unterminated line
            self.at_line_start = True
        return out + b".\r\n"

    def _encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        text = LINE_END.sub(b"\r\n", chunk)
        out = text.replace(b"\r\n.", b"\r\n..")
        if self.at_line_start and text.startswith(b"."):
            out = b"." + out
        self.at_line_start = text.endswith(b"\r\n")
        return out


def wire_size(body: BinaryIO) -> int:
    """RFC 1870's size of the message: the octets :class:`DataEncoder` sends for it,
    without the doubled dots and the terminating dot.  Leaves ``body`` at offset 0."""
    body.seek(0)
    size = 0
    held_cr = False
    open_line = False  # the message so far ends inside a line
    while chunk := body.read(CHUNK):
        if held_cr:
            chunk = b"\r" + chunk
        held_cr = chunk.endswith(b"\r")
        if held_cr:
            chunk = chunk[:-1]
        # each LF, CRLF or bare CR becomes two octets
        size += len(chunk) + chunk.count(b"\n") + chunk.count(b"\r") - 2 * chunk.count(b"\r\n")
        if chunk:
            open_line = not chunk.endswith(b"\n")
    body.seek(0)
    return size + (2 if held_cr or open_line else 0)
