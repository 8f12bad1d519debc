"""CHUNKING (RFC 3030): one BDAT transaction's chunk bytes -> stored message bytes.

Owns: the conversion of BDAT chunks, which are counted octets and never scanned for an
end-of-data mark (so no SMTP smuggling is possible: the client says how many bytes the
chunk has, and exactly those are message data).  The bytes are stored as qmail stores
DATA lines (eqmail.smtp.data): CRLF becomes LF — also when a chunk ends with the CR and
the next begins with the LF —, a bare CR is data, a bare LF anywhere is an error (the
session answers as DATA does, ``451 See http://pobox.com/~djb/docs/smtplf.html.``, and
closes); there is no dot-unstuffing.  The hop count (header lines beginning with
``received`` or ``delivered``, any case, before the first empty line) is counted as
DATA's, however the lines are split across chunks.

Inputs: pieces of chunk data in arrival order.  Outputs: stored bytes.  Pure, bounded
state (one held-back CR, at most 9 bytes of a line's beginning); never raises.
"""

from __future__ import annotations

from eqmail.smtp.data import MAXHOPS

# The longest hop-count word ("delivered"): a line's first bytes kept until decided.
_HEAD = 9


class ChunkReader:
    """State of one BDAT transaction's data; feed it every chunk's bytes in order."""

    def __init__(self) -> None:
        self.hops = 0
        self._cr = False                 # the last piece ended in CR: maybe half a CRLF
        self._in_header = True
        self._head: bytes | None = b""   # current line's first bytes, None once decided

    @property
    def looping(self) -> bool:
        return self.hops >= MAXHOPS

    def feed(self, piece: bytes) -> bytes | None:
        """Stored bytes for ``piece``; None when it holds a bare LF (the message is
        refused)."""
        if self._cr:
            piece = b"\r" + piece
            self._cr = False
        if piece.endswith(b"\r"):
            piece = piece[:-1]
            self._cr = True
        if piece.count(b"\n") != piece.count(b"\r\n"):
            return None
        stored = piece.replace(b"\r\n", b"\n")
        self._count(stored)
        return stored

    def end(self) -> bytes:
        """The message is complete: a CR still held back is data (a bare CR)."""
        tail = b"\r" if self._cr else b""
        self._cr = False
        self._count(tail)
        self._decide()
        return tail

    def _count(self, text: bytes) -> None:
        pos = 0
        while self._in_header and pos < len(text):
            lf = text.find(b"\n", pos)
            stop = len(text) if lf < 0 else lf
            if self._head is not None:
                if lf >= 0 and not self._head and stop == pos:
                    self._in_header = False  # the empty line ends the header
                    return
                self._head += text[pos:min(stop, pos + _HEAD - len(self._head))]
                if len(self._head) >= _HEAD or lf >= 0:
                    self._decide()
            if lf < 0:
                return
            pos = lf + 1
            self._head = b""

    def _decide(self) -> None:
        head, self._head = self._head, None
        if head and self.hops < MAXHOPS and head.lower().startswith((b"received",
                                                                     b"delivered")):
            self.hops += 1
