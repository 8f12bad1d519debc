"""The Authentication-Results header field (RFC 8601): writing ours, removing forgeries.

Owns: how a result is written (:class:`ResInfo` -> one ``method=result (comment)
ptype.property=value`` clause; :func:`format_field` -> the folded field) and
:class:`ForgedResultsFilter`, which removes fields that claim our authserv-id from a
message's header section as it streams by (RFC 8601 §5).  Pure: no I/O.

Everything that came from the message or the peer (identities, reasons) is written as
an RFC 8601 ``value`` — a token when it is one, else a quoted-string — or inside a
comment, after every byte outside printable US-ASCII was replaced by ``?``: a CR, LF
or NUL in a HELO name or a DKIM d= can never end our field or start another one.
Lines are folded before clauses, and inside a clause before a property or comment,
so that they stay within 78 characters wherever a single item allows it.

ARC-Authentication-Results fields are not removed: they belong to ARC sets that other
hosts sealed (RFC 8617 §4.1.1); deleting one would break the chain, and what they claim
is judged by arc_verify, not trusted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

FIELD = b"Authentication-Results"
LINE = 78
_TSPECIALS = set('()<>@,;:\\"/[]?=')
_MAX_HOLD = 8192     # bytes of one A-R field held back before its authserv-id is known
_MAX_HOLD_LINES = 32  # ... and lines (each line re-reads the held text: keep that bounded)


# value() and comment() are pure and see the same few texts message after message (the
# authserv-id, domains, selectors, reasons): their results are kept, bounded
FORMAT_CACHE = 1024
_UNPRINTABLE = re.compile(r"[^ -~]")
_TOKEN = re.compile("[" + "".join(re.escape(chr(c)) for c in range(0x21, 0x7F)
                                  if chr(c) not in _TSPECIALS) + "]+")


def printable(text: str, limit: int = 200) -> str:
    """``text`` with everything outside printable US-ASCII (CR, LF, NUL, 8-bit, ...)
    replaced by ``?``, at most ``limit`` characters (``...`` marks a cut)."""
    out = _UNPRINTABLE.sub("?", text)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def _is_token(text: str) -> bool:
    """Printable US-ASCII without tspecials (one regex: this runs for every value)."""
    return _TOKEN.fullmatch(text) is not None


@functools.lru_cache(maxsize=FORMAT_CACHE)
def value(text: str) -> str:
    """An RFC 8601 pvalue: a token, ``local-part@domain`` when both halves are
    dot-atoms, else a quoted-string (RFC 5322 §3.2.4)."""
    text = printable(text, 256)
    if _is_token(text):
        return text
    local, at, domain = text.rpartition("@")
    if at and re.fullmatch(r"[A-Za-z0-9.-]+", domain) and (
            local == "" or re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", local)):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=FORMAT_CACHE)
def comment(text: str) -> str:
    """A comment: ``(text)`` with parentheses and backslashes quoted (RFC 5322 ctext)."""
    text = printable(text, 160)
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


@dataclass(frozen=True)
class ResInfo:
    """One method's result: ``method=result``, a reason (written as a comment after
    the result) and properties in order, e.g. ``(("header", "d", "example.com"),)``."""

    method: str
    result: str
    reason: str = ""
    props: tuple[tuple[str, str, str], ...] = field(default=())
    extra_comment: str = ""

    def items(self) -> list[str]:
        """The clause as words that may be folded between."""
        words = [f"{self.method}={self.result}"]
        if self.reason:
            words.append(comment(self.reason))
        if self.extra_comment:
            words.append(comment(self.extra_comment))
        words += [f"{ptype}.{prop}={value(val)}" for ptype, prop, val in self.props]
        return words


def format_field(authserv_id: str, results: list[ResInfo]) -> bytes:
    """The complete field, LF line ends: ``Authentication-Results: ID;`` then one
    folded line per method (``; none`` when there are no results)."""
    head = f"{FIELD.decode()}: {value(authserv_id)}"
    if not results:
        return (head + "; none\n").encode("ascii")
    lines = [head + ";"]
    for n, res in enumerate(results):
        end = ";" if n + 1 < len(results) else ""
        words = res.items()
        words[-1] += end
        line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > LINE:
                lines.append(line)
                line = "\t" + word
            else:
                line += " " + word
        lines.append(line)
    return ("\n".join(lines) + "\n").encode("ascii")


# ------------------------------------------------------------------ the filter

_NAME = re.compile(rb"(?i)authentication-results[ \t]*:")


def _skip_cfws(text: bytes, pos: int) -> int | None:
    """Past folding white space and comments (nested, with quoted-pairs) from ``pos``;
    None when the text ends inside a comment (more may follow)."""
    depth = 0
    while pos < len(text):
        c = text[pos:pos + 1]
        if depth:
            if c == b"\\":
                pos += 1
            elif c == b"(":
                depth += 1
            elif c == b")":
                depth -= 1
        elif c == b"(":
            depth = 1
        elif c not in (b" ", b"\t", b"\r", b"\n"):
            return pos
        pos += 1
    return None


def authserv_id(field_bytes: bytes, complete: bool) -> bytes | None:
    """The authserv-id of an Authentication-Results field (name and colon included),
    unquoted; None while it cannot be known yet (``complete`` False: more lines may
    follow).  A field whose id is missing yields ``b""``."""
    m = _NAME.match(field_bytes)
    if m is None:
        return b""
    pos = _skip_cfws(field_bytes, m.end())
    if pos is None:
        return b"" if complete else None
    if field_bytes[pos:pos + 1] == b'"':
        out = bytearray()
        i = pos + 1
        while i < len(field_bytes):
            c = field_bytes[i:i + 1]
            if c == b"\\" and i + 1 < len(field_bytes):
                out += field_bytes[i + 1:i + 2]
                i += 2
                continue
            if c == b'"':
                return bytes(out)
            if c not in (b"\r", b"\n"):
                out += c
            i += 1
        return bytes(out) if complete else None
    end = re.compile(rb"[ \t\r\n;(]").search(field_bytes, pos)
    if end is None:
        return field_bytes[pos:] if complete else None
    return field_bytes[pos:end.start()]


class ForgedResultsFilter:
    """Removes, from a header section fed line by line, every Authentication-Results
    field whose authserv-id equals ``ours`` (ASCII case-insensitive, RFC 8601 §5: a
    receiver must delete or obscure fields claiming its own id).  Every other byte is
    returned unchanged, in order.

    :meth:`feed` takes one line with its line end (LF or CRLF; the last line may lack
    it) and returns the bytes to keep now — an Authentication-Results field is held
    back until its authserv-id is known (see :meth:`_decide` for the bound), so a
    field's lines may come out together with a later call.  The empty line ending the header section ends the filtering: it and all
    lines after it pass through.  :meth:`finish` returns what is still held (a message
    that ended inside its header section)."""

    def __init__(self, ours: str) -> None:
        self.ours = ours.encode("ascii", "replace").lower()
        self.held = b""
        self.dropping = False
        self.in_body = False

    def _decide(self, complete: bool) -> bytes:
        """Release or drop the held field once its id is known.  A field whose id is
        still unknown after :data:`_MAX_HOLD` bytes or :data:`_MAX_HOLD_LINES` lines
        (an endless comment before it) is dropped: it might name us further on, and no
        honest host writes one."""
        head = self.held[:_MAX_HOLD]
        ident = authserv_id(head, complete and len(self.held) <= _MAX_HOLD)
        if ident is None:
            if len(self.held) <= _MAX_HOLD and self.held.count(b"\n") <= _MAX_HOLD_LINES:
                return b""
            m = _NAME.match(head)
            start = _skip_cfws(head, m.end()) if m else None
            # an id that began early enough to have ended by now if it were ours (even
            # written as a quoted-string of quoted-pairs) is not ours
            long_id = start is not None and start + 2 * len(self.ours) + 4 < len(head)
            ident = b"" if long_id else self.ours
        held, self.held = self.held, b""
        if ident.lower() == self.ours:
            self.dropping = True
            return b""
        return held

    def feed(self, line: bytes) -> bytes:
        if self.in_body or not line:
            return line
        if line[:1] in (b" ", b"\t"):        # a continuation of the current field
            if self.dropping:
                return b""
            if self.held:
                self.held += line
                return self._decide(False)
            return line
        out = self._decide(True) if self.held else b""
        self.dropping = False
        if line in (b"\n", b"\r\n"):
            self.in_body = True
            return out + line
        if _NAME.match(line):
            self.held = line
            return out + self._decide(False)
        return out + line

    def finish(self) -> bytes:
        return self._decide(True) if self.held else b""
