"""Bounces in qmail's QSBMF format (qmail-core §2), pure.

Owns: the bounce note appended to ``bounce/<id>`` for every permanent failure, the
decision who gets the bounce (single, double, or triple = discard), and the exact bytes
of the bounce message.  The scanner does the I/O.

eqmail's backscatter limits (qmail has neither): a bounce carries at most
``control/bouncemaxbytes`` of the original message (:class:`Excerpt`,
:func:`bounded_copy`; the break paragraph says so), and :class:`BounceRate` lets at most
``control/bouncelimit`` bounces per hour go to one address.  BounceRate is the only
state here: a plain table in the scanner's memory, see its docstring for a restart.

REQUIRETLS (RFC 8689 §5, "Non-delivery Message Handling"): a bounce's copy of the
original message must be protected as the message was, so for a message sent with
REQUIRETLS eqmail does both things the RFC asks — the bounce carries the original's
header only, never its body (the RFC: behave as if DSN ``RET=HDRS`` had been asked,
whatever else was; :func:`header_copy`, and the break paragraph says so), and the
bounce itself is queued as a REQUIRETLS message (the scanner's injection sets the
envelope's ``requiretls``), so it too is relayed only over validated TLS to a server
that offers REQUIRETLS, or not at all (it then double-bounces to the postmaster, with
the same header-only rule; the RFC warns that such a sender may lose its bounces).
The same holds for any failure of such a message, not only REQUIRETLS ones.  A bounce
delivered locally (the sender is ours) is not affected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from eqmail.dates import date822

DOUBLE_BOUNCE_SENDER = "#@[]"
CHUNK = 65536


def bounce_note(recipient: str, text: str) -> str:
    r"""One paragraph for bounce/<id>: ``<addr>:`` + reason, blank lines inside made ``/``.

    Exactly qmail-send's addbounce: a newline is added only to a non-empty text that
    lacks one; then, walking backwards from the next-to-last character, every ``\n``
    preceded by ``\n`` becomes ``/`` (so ``\n\n\n`` -> ``\n//``, and an empty
    report leaves the paragraph ``<addr>:\n`` + the closing blank line).  A
    str.replace loop got both of those cases wrong.
    """
    note = f"<{recipient.replace(chr(10), '_')}>:\n{text}"
    if text and not text.endswith("\n"):
        note += "\n"
    chars = list(note)
    for pos in range(len(chars) - 2, 0, -1):
        if chars[pos] == "\n" and chars[pos - 1] == "\n":
            chars[pos] = "/"
    return "".join(chars) + "\n"


@dataclass(frozen=True)
class BounceTarget:
    envelope_sender: str
    recipient: str
    double: bool


def bounce_target(sender: str, doublebounceto: str, doublebouncehost: str) -> BounceTarget | None:
    """Where the bounce of a message from ``sender`` goes; None = triple bounce (discard)."""
    if sender.endswith("-@[]"):
        sender = sender[: -len("-@[]")]  # owner-@host-@[] -> owner-@host
    if sender == DOUBLE_BOUNCE_SENDER:
        return None
    if sender == "":
        return BounceTarget(DOUBLE_BOUNCE_SENDER, f"{doublebounceto}@{doublebouncehost}", True)
    return BounceTarget("", sender, False)


_ATOM_SPECIALS = set('()<>@,;:\\".[] \t\r\n')


def quote_address(addr: str) -> str:
    """qmail's quote2: quote the local part when it is not a plain dot-atom."""
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    needs = (
        local == ""
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or any(ch in _ATOM_SPECIALS and ch != "." for ch in local)
        or any(ord(ch) < 32 or ord(ch) > 126 for ch in local)
    )
    if needs and (local or at):
        # qmail's quote(): an empty local part of an address is quoted too (``""@host``),
        # and CR, LF, '"' and '\\' are backslash-escaped.
        local = '"' + "".join("\\" + ch if ch in '\r\n"\\' else ch for ch in local) + '"'
    return f"{local}@{domain}" if at else local


@dataclass(frozen=True)
class Excerpt:
    """How much of the original message (the mess file, ``size`` bytes) a bounce
    carries: everything when ``limit`` is 0 (qmail) or the message fits, else at most
    ``limit`` bytes, cut at a line end by :func:`bounded_copy`."""

    size: int
    limit: int

    @property
    def truncated(self) -> bool:
        return self.limit > 0 and self.size > self.limit


HEADER_MAX = 1 << 20  # header bytes a REQUIRETLS bounce carries when bouncemaxbytes is 0


def header_copy(message: BinaryIO, limit: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The header section of ``message`` (from its current position up to, not
    including, the empty line that ends it; all of it when there is none), for a
    REQUIRETLS message's bounce (RFC 8689 §5).  At most ``limit`` bytes (``HEADER_MAX``
    when ``limit`` is 0), cut at a line end as :func:`bounded_copy` cuts; reads are
    bounded by ``chunk``."""
    left = limit if limit > 0 else HEADER_MAX
    at_line_start = True  # the previous byte copied (if any) was an LF
    while left > 0:
        data = message.read(min(chunk, left))
        if not data:
            return
        if at_line_start and data[:1] == b"\n":
            return  # the empty line fell on a chunk boundary
        end = data.find(b"\n\n")
        if end >= 0:
            yield data[:end + 1]
            return
        left -= len(data)
        at_line_start = data.endswith(b"\n")
        if left == 0 and not at_line_start and message.read(1):
            cut = data.rfind(b"\n")
            yield data[:cut + 1] if cut >= 0 else data + b"\n"
            return
        yield data


def bounded_copy(message: BinaryIO, limit: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """At most ``limit`` bytes (> 0) of ``message`` from its current position.

    If the message is longer, the copy ends after the last LF of the final piece read
    (the last ``chunk`` bytes within the limit), or at the limit with an LF added when
    that piece has none, so the bounce never ends in the middle of a line.  Reads are
    bounded by ``chunk``; the whole copy is never held at once.
    """
    left = limit
    want = limit % chunk or chunk  # the first piece is short, so the last one is whole
    while left > 0:
        data = message.read(min(want, left))
        if not data:
            return  # shorter than the limit: all of it was copied
        left -= len(data)
        want = chunk
        if left == 0 and message.read(1):
            cut = data.rfind(b"\n")
            yield data[:cut + 1] if cut >= 0 else data + b"\n"
            return
        yield data


class BounceRate:
    """At most ``limit`` bounces per recipient address per ``window`` seconds
    (control/bouncelimit, per hour); ``limit`` 0 means no limit.

    A window starts at an address's first bounce; over the limit :meth:`allow` says
    False until the window has passed.  Addresses compare case-insensitively.  The
    table holds at most ``max_addresses`` entries: when full, expired windows go first,
    then the oldest.  Crash argument: the table lives only in the scanner's memory; a
    scanner restart (a crash, a reload that restarts it, eqmailctl stop/start) forgets
    it, so in the worst case each restart lets another ``limit`` bounces go to an
    address within the hour.  Nothing on disk depends on it, so nothing is lost or
    doubled; a dropped bounce is only logged.
    """

    def __init__(self, limit: int, window: float = 3600.0, max_addresses: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._seen: dict[str, tuple[float, int]] = {}  # address -> (window start, count)

    def allow(self, address: str, now: float) -> bool:
        if self.limit <= 0:
            return True
        key = address.lower()
        start, count = self._seen.get(key, (now, 0))
        if now - start >= self.window or now < start:
            start, count = now, 0
        if count >= self.limit:
            return False
        if key not in self._seen and len(self._seen) >= self.max_addresses:
            self._make_room(now)
        self._seen[key] = (start, count + 1)
        return True

    def _make_room(self, now: float) -> None:
        for key, (start, _count) in list(self._seen.items()):
            if now - start >= self.window:
                del self._seen[key]
        while len(self._seen) >= self.max_addresses:
            del self._seen[next(iter(self._seen))]


def compose_bounce(
    *,
    target: BounceTarget,
    original_sender: str,
    notes: bytes,
    bouncefrom: str,
    bouncehost: str,
    now: float | None = None,
    excerpt: Excerpt | None = None,
    header_only: bool = False,
) -> bytes:
    """The bounce message up to (and including) the Return-Path line; the caller appends
    the mess file's bytes after it -- all of them, or :func:`bounded_copy` when
    ``excerpt`` is truncated, which the break paragraph then says; with
    ``header_only`` (a REQUIRETLS message, RFC 8689 §5) :func:`header_copy`, and the
    break paragraph says that the body is left out and why."""
    lines = [
        f"Date: {date822(now)}",
        f"From: {quote_address(f'{bouncefrom}@{bouncehost}')}",
        f"To: {quote_address(target.recipient)}",
        "Subject: failure notice",
        "",
        f"Hi. This is the qmail-send program at {bouncehost}.",
    ]
    if target.double:
        lines += ["I tried to deliver a bounce message to this address, but the bounce bounced!", ""]
    else:
        lines += [
            "I'm afraid I wasn't able to deliver your message to the following addresses.",
            "This is a permanent error; I've given up. Sorry it didn't work out.",
            "",
        ]
    head = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    brk = "--- Below this line is the original bounce." if target.double else (
        "--- Below this line is a copy of the message."
    )
    if header_only:
        what = "the original bounce" if target.double else "the message"
        brk = (f"--- Below this line is the header of {what}, without its body:\n"
               "--- it was sent with REQUIRETLS, whose bounces carry no content (RFC 8689).")
    elif excerpt is not None and excerpt.truncated:
        what = "the original bounce" if target.double else "a copy of the message"
        # Still one break paragraph (QSBMF: it begins with '-'), now two lines.
        brk = (f"--- Below this line is the beginning of {what}, cut to at most "
               f"{excerpt.limit} of its {excerpt.size} bytes.\n"
               "--- The rest of the message is not included.")
    rp = quote_address(original_sender) if original_sender else ""
    tail = f"{brk}\n\nReturn-Path: <{rp}>\n".encode("utf-8", "surrogateescape")
    return head + notes + tail
