"""qmail-inject's header work, as pure functions on bytes (qmail-core §5.2).

Owns: splitting a message's header block into fields (RFC 822 continuation lines,
``From `` mbox lines, the first non-header line), rewriting address fields with the
token822 code in :mod:`eqmail.inject.tokens`, address completion (``@defaulthost``,
``.defaultdomain``, ``+`` -> ``.plusdomain``), header-recipient collection, removal of
Return-Path/Content-Length/Bcc/Resent-Bcc and the fields qmail-inject adds (Date,
Message-ID, From, ``Cc: recipient list not shown: ;``, Mail-Followup-To), plus the
envelope sender rules (-f, Return-Path, QMAILSUSER/QMAILUSER/...; QMAILINJECT ``m``/``r``).

Privilege: none; no I/O except reading the header from a stream in :func:`read_header`.
Inputs: header bytes, control values (:class:`Defaults`), the environment (a mapping).
Outputs: the new header bytes, the envelope sender and header recipients as bytes.
Failure modes: :class:`HeaderError` (qmail-inject's exit 100) with the exact text that
follows ``qmail-inject: fatal: ``; nothing else is raised for any input bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from eqmail.dates import date822
from eqmail.inject.tokens import (
    T,
    Token,
    address_list,
    quote2,
    quote_need,
    tokenize,
    unparse,
    unquote,
)

HEADER_MAX = 8 * 1024 * 1024  # qmail holds the header in memory without limit; we bound it


class HeaderError(Exception):
    """A header/address qmail-inject refuses (exit 100).  ``text`` is what follows
    ``qmail-inject: fatal: `` on stderr, newline included."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text.decode("utf-8", "replace").rstrip("\n"))
        self.text = text if text.endswith(b"\n") else text + b"\n"


def _unparsable(line: bytes) -> HeaderError:
    return HeaderError(b"unable to parse this line:\n" + line)


# ---------------------------------------------------------------- completion


@dataclass(frozen=True)
class Defaults:
    """Control values qmail-inject reads (env QMAIL* overrides already applied)."""

    defaultdomain: bytes
    defaulthost: bytes
    plusdomain: bytes
    idhost: bytes


class Completion:
    """rwgeneric: qmail-inject's address completion on a forward-order token list."""

    def __init__(self, d: Defaults) -> None:
        self.idhost = d.idhost
        self.at_host = self._parse(b"@" + d.defaulthost)
        self.dot_domain = self._parse(b"." + d.defaultdomain)
        self.dot_plus = self._parse(b"." + d.plusdomain)

    @staticmethod
    def _parse(text: bytes) -> list[Token]:
        toks = tokenize(text)
        if toks is None:
            raise _unparsable(text)
        return toks

    def __call__(self, addr: list[Token]) -> list[Token]:
        if not addr:
            return addr  # <> stays <>
        if len(addr) >= 2 and addr[-2][0] is T.AT and addr[-1] == (T.LITERAL, b""):
            return addr  # box@[] is a VERP template; leave it alone
        if addr[0][0] is T.AT:  # source route @a,@b:box@host -> box@host
            colon = next((k for k, t in enumerate(addr) if t[0] is T.COLON), len(addr))
            addr = addr[colon + 1 :]
        for extra in (T.DOT, T.AT):  # trailing dot, then a trailing @
            if addr and addr[-1][0] is extra:
                addr = addr[:-1]
        if not addr:
            return addr
        if not any(t[0] is T.AT for t in addr):
            addr = addr + self.at_host
        kind, text = addr[-1]
        if kind is T.ATOM and text.endswith(b"+"):
            addr = addr[:-1] + [(T.ATOM, text[:-1])] + self.dot_plus
        at = max(k for k, t in enumerate(addr) if t[0] is T.AT)
        if not any(t[0] in (T.DOT, T.LITERAL) for t in addr[at + 1 :]):
            addr = addr + self.dot_domain
        return addr


def envelope_arg(arg: bytes, complete: Completion, *, sender: bool) -> bytes:
    """An address given on the command line (-f sender, or a recipient), completed."""
    quoted = quote2(arg)
    toks = tokenize(quoted)
    if toks is None:
        if sender:
            raise _unparsable(quoted)
        raise HeaderError(b"unable to parse address: " + arg)
    return unquote(complete(toks))


# ---------------------------------------------------------------- the header block

KNOWN = frozenset(
    b"sender from reply-to to cc bcc date message-id subject resent-sender resent-from "
    b"resent-reply-to resent-to resent-cc resent-bcc resent-date resent-message-id "
    b"return-receipt-to errors-to apparently-to received return-path delivered-to "
    b"content-length content-type content-transfer-encoding "
    b"notice-requested-upon-delivery-to mail-followup-to".split()
)
RESENT = frozenset(
    b"resent-sender resent-from resent-reply-to resent-to resent-cc resent-bcc "
    b"resent-date resent-message-id".split()
)


def field_name(fld: bytes) -> bytes | None:
    """The lower-case name of a field qmail knows (hfield_known), else None."""
    colon = fld.find(b":")
    if colon < 0:
        return None
    name = fld[:colon].rstrip(b" \t").lower()
    return name if name in KNOWN else None


def field_valid(line: bytes) -> bool:
    """hfield_valid: a colon, and a non-empty name of printable non-space bytes."""
    colon = line.find(b":")
    if colon < 0:
        return False
    name = line[:colon].rstrip(b" \t")
    return bool(name) and all(32 < b < 127 for b in name)


@dataclass
class HeaderBlock:
    fields: list[bytes]  # each ends with "\n", continuation lines included
    body_prefix: bytes  # b"" (EOF inside the header), b"\n", or b"\n" + first body line


def read_header(stream: BinaryIO, limit: int = HEADER_MAX) -> HeaderBlock:
    """qmail's headerbody(): read fields until a blank line or a line that cannot
    start a field (then a blank line is inserted before it).  ``From `` lines become
    ``MBOX-Line: From ...``.  A last line without newline gets one.  At most ``limit``
    header bytes: a longer header raises HeaderError; the stream is left at the body."""
    fields: list[bytes] = []
    current: bytearray | None = None
    used = 0
    while True:
        line = stream.readline(limit - used + 1)
        used += len(line)
        over = used > limit
        if not line:
            if current is not None:
                fields.append(bytes(current))
            return HeaderBlock(fields, b"")
        if not over and not line.endswith(b"\n"):
            line += b"\n"  # EOF without newline; headerbody adds one
        if current is not None and line[:1] in (b" ", b"\t"):
            if over:
                raise HeaderError(b"header too long")
            current += line
            continue
        if current is not None:
            fields.append(bytes(current))
            current = None
        if line == b"\n":
            return HeaderBlock(fields, b"\n")
        if line.startswith(b"From "):
            current = bytearray(b"MBOX-Line: " + line)
        elif field_valid(line):
            current = bytearray(line)
        else:
            return HeaderBlock(fields, b"\n" + line)
        if over:
            raise HeaderError(b"header too long")


# ---------------------------------------------------------------- identity and flags


@dataclass(frozen=True)
class Identity:
    """Who the message is from, per qmail-inject's environment rules."""

    user: bytes  # QMAILUSER, MAILUSER, USER, LOGNAME, else "anonymous"
    host: bytes | None  # QMAILHOST, MAILHOST
    suser: bytes  # QMAILSUSER, else user (envelope sender's box)
    shost: bytes | None  # QMAILSHOST, else host
    fullname: bytes | None  # QMAILNAME, MAILNAME, NAME
    name_comment: bool = False  # QMAILINJECT c
    delete_sender: bool = False  # s: ignore (and drop) Return-Path
    delete_from: bool = False  # f
    delete_messid: bool = False  # i
    verp_message: bool = False  # m
    verp_recipient: bool = False  # r
    mft: frozenset[bytes] = field(default_factory=frozenset)  # QMAILMFTFILE, lower-cased


def _first(env: Mapping[str, bytes], *names: str) -> bytes | None:
    for n in names:
        if n in env:  # set but empty still counts, as with env_get
            return env[n]
    return None


def identity_from_env(env: Mapping[str, bytes], mft: frozenset[bytes] = frozenset()) -> Identity:
    flags = env.get("QMAILINJECT", b"")
    user = _first(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME") or b"anonymous"
    host = _first(env, "QMAILHOST", "MAILHOST")
    return Identity(
        user=user,
        host=host,
        suser=_first(env, "QMAILSUSER") or user,
        shost=_first(env, "QMAILSHOST") or host,
        fullname=_first(env, "QMAILNAME", "MAILNAME", "NAME"),
        name_comment=b"c" in flags,
        delete_sender=b"s" in flags,
        delete_from=b"f" in flags,
        delete_messid=b"i" in flags,
        verp_message=b"m" in flags,
        verp_recipient=b"r" in flags,
        mft=frozenset(a.lower() for a in mft),
    )


# ---------------------------------------------------------------- the header work

_RECIPIENT_FIELDS = {b"to": "tocc", b"cc": "tocc", b"bcc": "hr", b"apparently-to": "hr",
                     b"resent-to": "hrr", b"resent-cc": "hrr", b"resent-bcc": "hrr",
                     b"return-path": "return"}
_SENDER_FIELDS = frozenset(b"sender from reply-to return-receipt-to errors-to resent-sender "
                           b"resent-from resent-reply-to".split())
_DROPPED = frozenset((b"bcc", b"resent-bcc", b"return-path", b"content-length"))


def message_id(now: int, pid: int, idhost: bytes) -> bytes:
    """``<YYYYMMDDHHMMSS.pid.qmail@idhost>``; the stamp is UTC even in eQmail."""
    return b"<%s.%d.qmail@%s>" % (time.strftime("%Y%m%d%H%M%S", time.gmtime(now)).encode(), pid, idhost)


class HeaderWork:
    """One message's header pass: feed each field to :meth:`field`, then :meth:`finish`."""

    def __init__(self, complete: Completion, ident: Identity, sender: bytes | None = None) -> None:
        self.complete = complete
        self.ident = ident
        self.sender = sender  # from -f; else the first Return-Path; else the default
        self.seen: set[bytes] = set()
        self.saved: list[bytes] = []
        self.lists: dict[str, list[bytes]] = {"hr": [], "hrr": [], "tocc": []}

    @property
    def resent(self) -> bool:
        return bool(self.seen & RESENT)

    def header_recipients(self) -> list[bytes]:
        """Recipients from Resent-To/Cc/Bcc if the message is resent, else from
        To/Cc/Bcc/Apparently-To — in qmail's order (each field's addresses last-first)."""
        return list(self.lists["hrr" if self.resent else "hr"])

    def _rewriter(self, kind: str | None) -> Callable[[list[Token]], list[Token]]:
        def rewrite(addr: list[Token]) -> list[Token]:
            addr = self.complete(addr)
            if kind == "return":
                if self.sender is None:
                    self.sender = unquote(addr) + (b"-@[]" if self.ident.verp_recipient else b"")
            elif kind is not None:
                box = unquote(addr)
                self.lists["hr" if kind == "tocc" else kind].append(box)
                if kind == "tocc":
                    self.lists["tocc"].append(box)
            return addr
        return rewrite

    def rewrite_field(self, fld: bytes, kind: str | None) -> bytes:
        toks = tokenize(fld)
        out = None if toks is None else address_list(toks, self._rewriter(kind))
        if out is None:
            raise _unparsable(fld)
        return unparse(out)

    def field(self, fld: bytes) -> None:
        name = field_name(fld)
        i = self.ident
        if (name == b"from" and i.delete_from or name == b"message-id" and i.delete_messid
                or name == b"return-path" and i.delete_sender):
            return
        if name is not None:
            self.seen.add(name)
        elif not field_valid(fld):
            raise HeaderError(b"invalid header field: " + fld)
        if name in _RECIPIENT_FIELDS or name in _SENDER_FIELDS:
            fld = self.rewrite_field(fld, _RECIPIENT_FIELDS.get(name or b""))
        if name not in _DROPPED:
            self.saved.append(fld)

    def _default_from(self) -> bytes:
        i = self.ident
        toks: list[Token] = [(T.ATOM, b"From"), (T.COLON, b"")]
        angle = i.fullname is not None and not i.name_comment
        if angle:
            toks += [(T.QUOTE, i.fullname or b""), (T.LEFT, b"")]
        toks.append((T.QUOTE if quote_need(i.user) else T.ATOM, i.user))
        if i.host is not None:
            toks += [(T.AT, b""), (T.ATOM, i.host)]
        if angle:
            toks.append((T.RIGHT, b""))
        elif i.fullname is not None:
            toks.append((T.COMMENT, i.fullname))
        return self.rewrite_field(unparse(toks), None)

    def _default_sender(self, now: int, pid: int) -> None:
        i = self.ident
        box = i.suser
        if i.verp_message:
            box += b"-%d.%d" % (now, pid)
        if i.verp_recipient:
            box += b"-"
        toks: list[Token] = [(T.ATOM, b"Return-Path"), (T.COLON, b""), (T.QUOTE, box)]
        if i.shost is not None:
            toks += [(T.AT, b""), (T.ATOM, i.shost)]
        self.rewrite_field(unparse(toks), "return")

    def _mail_followup_to(self) -> bytes:
        tocc = self.lists["tocc"]
        if not self.ident.mft or b"mail-followup-to" in self.seen:
            return b""
        if not any(a.lower() in self.ident.mft for a in tocc):
            return b""
        return b"Mail-Followup-To: " + b",\n  ".join(quote2(a) for a in reversed(tocc)) + b"\n"

    def finish(self, now: float, pid: int, *, show_return_path: bool = False) -> bytes:
        """The header qmail-inject writes: [Return-Path for -n], the added fields, then
        the kept fields in their order.  Also settles :attr:`sender`."""
        start = int(now)
        if self.sender is None:
            self._default_sender(start, pid)
        out = [b"Return-Path: <" + quote2(self.sender or b"") + b">\n"] if show_return_path else []
        pre, lpre = (b"Resent-", b"resent-") if self.resent else (b"", b"")
        if lpre + b"date" not in self.seen:
            out.append(pre + b"Date: " + date822(start).encode() + b"\n")
        if lpre + b"message-id" not in self.seen:
            out.append(pre + b"Message-ID: " + message_id(start, pid, self.complete.idhost) + b"\n")
        if lpre + b"from" not in self.seen:
            out.append(pre + self._default_from())
        if lpre + b"to" not in self.seen and lpre + b"cc" not in self.seen:
            out.append(pre + b"Cc: recipient list not shown: ;\n")
        if not self.resent:
            out.append(self._mail_followup_to())
        return b"".join(out + self.saved)
