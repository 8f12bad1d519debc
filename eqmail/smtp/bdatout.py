"""The BDAT stream the SMTP client sends (CHUNKING, RFC 3030, issue 18).

Owns: a stored message as one ``BDAT <size> LAST`` chunk's octets.  The line-end rule is
DATA's (eqmail.smtp.dataout: every LF, CRLF or bare CR becomes CRLF, an unterminated
last line is ended with CRLF, so no bare CR or LF reaches the next hop), but nothing
is dot-stuffed and no terminating dot is sent: BDAT counts octets.  So the chunk's
size is exactly dataout.wire_size, the size announced with ``SIZE=``, and the client
can announce the whole message as one chunk before streaming it.  Pure.
"""

from __future__ import annotations

from eqmail.smtp.dataout import LINE_END, DataEncoder


class BdatEncoder(DataEncoder):
    """Stored message -> BDAT chunk octets, chunk by chunk (any cut, same result)."""

    def end(self) -> bytes:
        """The rest: a final bare CR is a line end; an open last line gets CRLF."""
        out = self._encode(b"\r") if self.held_cr else b""
        self.held_cr = False
        if not self.at_line_start:
            out += b"\r\n"
            self.at_line_start = True
        return out

    def _encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        text = LINE_END.sub(b"\r\n", chunk)
        self.at_line_start = text.endswith(b"\r\n")
        return text
