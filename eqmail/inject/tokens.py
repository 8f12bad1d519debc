"""qmail-inject's RFC 822 tokens (token822.c), as pure functions on bytes (qmail-core §5.2).

Owns: the tokenizer (atoms, quoted strings, domain literals, comments and specials:
token822_parse), the unparser that writes tokens back as field text folded at 80
columns (token822_unparse), the envelope form of an address (token822_unquote), the
right-to-left address-list scan that hands each address of a field to a rewrite
function (token822_addrlist), and qmail's quoting of a local part (quote2).

Privilege: none; no I/O.
Inputs: field or address bytes; for :func:`address_list`, a rewrite callable.
Outputs: token lists (:data:`Token`) and bytes.
Failure modes: a syntax error is a ``None`` return (an unclosed comment, quote or
literal, a stray ``)``/``]``, an unbalanced group or ``>``), which
:mod:`eqmail.inject.headers` turns into qmail-inject's fatal error; nothing is raised
for any input bytes.

Why our own parser and not ``email``: qmail-inject's output is defined by its token822
rewriting (comments move after the address, lines folded at 80 columns after commas,
two adjacent words become two addresses); unknown fields pass through byte for byte.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

LINELEN = 80  # qmail-inject folds rewritten address fields at this width


# ---------------------------------------------------------------- RFC 822 tokens


class T(enum.Enum):
    ATOM = "atom"
    QUOTE = "quote"
    LITERAL = "literal"
    COMMENT = "comment"
    COMMA = ","
    AT = "@"
    DOT = "."
    LEFT = "<"
    RIGHT = ">"
    SEMI = ";"
    COLON = ":"


Token = tuple[T, bytes]
_SPECIAL = {ord(k.value): k for k in (T.COMMA, T.AT, T.DOT, T.LEFT, T.RIGHT, T.SEMI, T.COLON)}
_WORDS = (T.ATOM, T.QUOTE, T.LITERAL, T.COMMENT)
_ATOM_STOP = frozenset(b' \t\r\n(["<>;:@,.')
_CLOSER = {ord("("): (T.COMMENT, ord(")")), ord('"'): (T.QUOTE, ord('"')), ord("["): (T.LITERAL, ord("]"))}
_ESCAPED = frozenset(b'"[]()\\\r\n')


def _delimited(data: bytes, i: int) -> tuple[Token, int] | None:
    """A comment, quoted string or domain literal starting at data[i]; None if unclosed.
    Nested parentheses count but, as in qmail, are not kept in the comment text."""
    kind, closer = _CLOSER[data[i]]
    buf = bytearray()
    level = 1
    i += 1
    while i < len(data):
        c = data[i]
        i += 1
        if kind is T.COMMENT and c == ord("("):
            level += 1
        elif c == closer:
            level -= 1
            if not level:
                return (kind, bytes(buf)), i
        elif c == ord("\\"):
            if i >= len(data):
                return None
            buf.append(data[i])
            i += 1
        else:
            buf.append(c)
    return None


def tokenize(data: bytes) -> list[Token] | None:
    """token822_parse: None when a comment/quote/literal is unclosed or a ``)``/``]``
    stands alone."""
    out: list[Token] = []
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c in b" \t\r\n":
            i += 1
        elif c in _SPECIAL:
            out.append((_SPECIAL[c], b""))
            i += 1
        elif c in b")]":
            return None
        elif c in _CLOSER:
            got = _delimited(data, i)
            if got is None:
                return None
            out.append(got[0])
            i = got[1]
        else:
            buf = bytearray()
            while True:
                if data[i] == ord("\\"):
                    i += 1
                    if i >= n:
                        break
                buf.append(data[i])
                i += 1
                if i >= n or data[i] in _ATOM_STOP:
                    break
            # an "atom" holding controls, 8-bit or ")]\" can only be written quoted
            odd = any(b < 32 or b > 126 or b in b")]\\" for b in buf)
            out.append((T.QUOTE if odd else T.ATOM, bytes(buf)))
    return out


def _needspace(last: T | None, new: T) -> bool:
    if last is None:
        return False
    if last in (T.COLON, T.COMMA) or new is T.LEFT:
        return True
    return last in _WORDS and new in _WORDS


def unparse(tokens: list[Token], linelen: int = LINELEN) -> bytes:
    """token822_unparse: the field text ending in ``\\n``.  After each comma a line break
    is tentatively inserted; it is taken back while the line still fits ``linelen``."""
    out = bytearray()
    line_start = 0
    pending: int | None = None  # offset of the last tentative "\n " break

    def breakpoint() -> None:
        nonlocal line_start, pending
        if pending is not None and (not linelen or len(out) - line_start <= linelen):
            del out[pending : pending + 2]
        elif pending is not None:
            line_start = pending + 1
        pending = len(out)
        out.extend(b"\n ")

    last: T | None = None
    for kind, text in tokens:
        if _needspace(last, kind):
            out.append(32)
        last = kind
        if kind is T.COMMA:
            out.append(ord(","))
            breakpoint()
        elif kind in _WORDS:
            opener, closer = {T.QUOTE: (b'"', b'"'), T.LITERAL: (b"[", b"]"),
                              T.COMMENT: (b"(", b")")}.get(kind, (b"", b""))
            out += opener
            for b in text:
                if b in _ESCAPED:
                    out.append(ord("\\"))
                out.append(b)
            out += closer
        else:
            out += kind.value.encode()
    breakpoint()
    return bytes(out[:-1])


def unquote(tokens: list[Token]) -> bytes:
    """token822_unquote: the address as the envelope carries it (comments dropped)."""
    parts = []
    for kind, text in tokens:
        if kind is T.LITERAL:
            parts.append(b"[" + text + b"]")
        elif kind in (T.ATOM, T.QUOTE):
            parts.append(text)
        elif kind is not T.COMMENT:
            parts.append(kind.value.encode())
    return b"".join(parts)


_PHRASE = (T.COMMENT, T.ATOM, T.QUOTE, T.AT, T.DOT)


class _AddressScan:
    """token822_addrlist's right-to-left scan (RFC 822 address lists are easiest to
    parse that way).  ``out`` and ``addr`` are built reversed."""

    def __init__(self, tokens: list[Token], rewrite: Callable[[list[Token]], list[Token]]) -> None:
        self.toks, self.rewrite = tokens, rewrite
        self.out: list[Token] = []
        self.addr: list[Token] = []
        self.ingroup, self.wordok = False, True
        self.i = len(tokens) - 1

    def take(self, into: list[Token]) -> None:
        into.append(self.toks[self.i])
        self.i -= 1

    def got(self) -> None:
        self.out.extend(reversed(self.rewrite(self.addr[::-1])))
        self.addr.clear()

    def flush(self, comma: bool) -> None:
        if self.addr:
            self.got()
            if comma:
                self.out.append((T.COMMA, b""))

    def angle(self) -> bool:
        """``phrase <addr>``: the address even when empty (<>), then its phrase."""
        self.flush(True)
        self.take(self.out)
        while self.i >= 2 and self.toks[self.i][0] is not T.LEFT:
            self.take(self.addr)
        self.got()
        if self.i < 2:
            return False
        self.take(self.out)
        while self.i >= 2 and self.toks[self.i][0] in _PHRASE:
            self.take(self.out)
        self.wordok = False
        return True

    def group(self, kind: T) -> bool:
        """``;`` opens a group (seen from the right), ``name:`` closes it."""
        self.flush(kind is T.SEMI)
        if self.ingroup == (kind is T.SEMI):
            return False
        self.ingroup, self.wordok = kind is T.SEMI, True
        if kind is T.COLON:  # the group's name, and the comma before it
            while self.i >= 2 and self.toks[self.i][0] is not T.COMMA:
                self.take(self.out)
        if self.i >= 2:
            self.take(self.out)
        return True

    def other(self, kind: T) -> None:
        if kind in (T.ATOM, T.QUOTE, T.LITERAL):
            if not self.wordok:  # two words in a row: qmail starts a new address
                self.flush(True)
            self.wordok = False
            self.take(self.addr)
        elif kind is T.COMMA:
            self.flush(False)
            self.wordok = True
            self.take(self.out)
        elif kind is T.COMMENT:  # lexically a space; it ends up after its address
            self.take(self.out)
        else:  # @ . < belong to the address
            self.wordok = True
            self.take(self.addr)

    def run(self) -> list[Token] | None:
        while self.i >= 2:
            kind = self.toks[self.i][0]
            if kind is T.RIGHT:
                ok = self.angle()
            elif kind in (T.SEMI, T.COLON):
                ok = self.group(kind)
            else:
                self.other(kind)
                ok = True
            if not ok:
                return None
        self.flush(False)
        self.out.extend(reversed(self.toks[:2]))
        return self.out[::-1]


def address_list(tokens: list[Token], rewrite: Callable[[list[Token]], list[Token]]) -> list[Token] | None:
    """token822_addrlist: rewrite every address of a field (tokens[:2] are its name and
    colon), so ``rewrite`` sees a field's addresses last-first as in qmail; None on a
    syntax error (unbalanced group or ``>``)."""
    return _AddressScan(tokens, rewrite).run()


# ---------------------------------------------------------------- quoting

_QOK = frozenset(b"!#$%&'*+-/=?^_`{|}~." b"0123456789"
                 b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def quote_need(s: bytes) -> bool:
    if not s or any(b not in _QOK for b in s):
        return True
    return s.startswith(b".") or s.endswith(b".") or b".." in s


def quote2(addr: bytes) -> bytes:
    """qmail's quote2: quote the local part (up to the last @) only when needed."""
    if not addr:
        return addr
    at = addr.rfind(b"@")
    box, host = (addr, b"") if at < 0 else (addr[:at], addr[at:])
    if quote_need(box):
        esc = bytearray()
        for b in box:
            if b in b'\r\n"\\':
                esc.append(ord("\\"))
            esc.append(b)
        box = b'"' + bytes(esc) + b'"'
    return box + host
