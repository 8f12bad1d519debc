"""Bounces in qmail's QSBMF format (qmail-core §2), pure.

Owns: the bounce note appended to ``bounce/<id>`` for every permanent failure, the
decision who gets the bounce (single, double, or triple = discard), and the exact bytes
of the bounce message.  The scanner does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.dates import date822

DOUBLE_BOUNCE_SENDER = "#@[]"


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


def compose_bounce(
    *,
    target: BounceTarget,
    original_sender: str,
    notes: bytes,
    bouncefrom: str,
    bouncehost: str,
    now: float | None = None,
) -> bytes:
    """The bounce message up to (and including) the Return-Path line; the caller appends
    the mess file's bytes after it."""
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
    rp = quote_address(original_sender) if original_sender else ""
    tail = f"{brk}\n\nReturn-Path: <{rp}>\n".encode("utf-8", "surrogateescape")
    return head + notes + tail
