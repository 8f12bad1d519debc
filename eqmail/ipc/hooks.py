"""The plugin sandbox's answer to a hook run, as both ends see it.

Owns: the qmail-spp section names (``HookStage``), how a section's run ended
(``HookVerdict``) and everything it produced (``HookOutcome``), plus the shape rules a
hook's reply texts and header lines must satisfy to cross the process boundary
(``valid_header``, ``reply_shape``, ``wire_shape``).  The SMTP session consumes these
values (eqmail.smtp.actions re-exports them as part of its vocabulary), the plugin layer
produces them (eqmail.spp.protocol), and eqmail.ipc.sandbox checks them on the wire,
so they live below all three.  Pure values and functions; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MAX_HEADER = 998        # bytes of one H header field: RFC 5322's line length limit


class HookStage(Enum):
    """qmail-spp sections (control/smtpplugins ``[connection]`` ... ``[auth]``)."""

    CONNECTION = "connection"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    AUTH = "auth"


class HookVerdict(Enum):
    """How a plugin run ended (qmail-spp's result of the whole section)."""

    NORMAL = "normal"        # no terminal command, or A / N: qmail's checks apply
    OK_SKIP = "ok_skip"      # O: accept; qmail's MAIL/RCPT checks are skipped
    REJECT = "reject"        # E text, or a plugin failure (451 qmail-spp failure)
    TERMINATE = "terminate"  # R text or D: send output, close


@dataclass(frozen=True)
class HookOutcome:
    """Everything one section's plugins produced, for :meth:`Session.hook_result`.

    ``output`` is the command's reply when the verdict is REJECT or TERMINATE (the E/R
    text after its P lines, or a 451 failure text) and is sent first; with NORMAL or
    OK_SKIP it is only P continuation lines (``250-...``), which lead the session's own
    reply when that has their code and are dropped otherwise: one reply per command
    (the plugin layer makes sure of these shapes, eqmail.spp.protocol).  Then, in
    this order: ``env`` changes (S -> value, U -> None), ``headers`` (H, one header field
    each, appended to the next message after the Received line, LF added by the
    session), ``later`` texts (LM / LR / LD, one complete reply per stage, shown at the
    next MAIL / RCPT / DATA which they reject; the first one queued wins),
    ``disable`` (A: no more plugins this session), ``address`` (C: replaces the MAIL or
    RCPT address; ignored at other stages), then the verdict.
    """

    verdict: HookVerdict = HookVerdict.NORMAL
    output: bytes = b""
    env: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[str, ...] = ()
    later: tuple[tuple[HookStage, bytes], ...] = ()
    disable: bool = False
    address: str | None = None


def valid_header(field: bytes) -> bool:
    """One RFC 5322 header field on one line: ``name:value`` with a name of printable
    ASCII other than the colon, no CR, LF or other control character but TAB in the
    value, at most MAX_HEADER bytes.  (A folded continuation line has no name: refused.)"""
    if len(field) > MAX_HEADER:
        return False
    name, colon, value = field.partition(b":")
    if not colon or not name or any(not 33 <= b <= 126 for b in name):
        return False
    return not any((b < 32 and b != 9) or b == 127 for b in value)


def _reply_code(line: bytes) -> tuple[bytes, bool] | None:
    """(code, continued) for a well-formed reply line, else None."""
    if len(line) < 3 or not line[:3].isdigit() or b"\r" in line:
        return None
    if len(line) == 3:
        return line, False
    sep = line[3:4]
    if sep not in (b" ", b"-"):
        return None
    return line[:3], sep == b"-"


def reply_shape(lines: list[bytes]) -> tuple[int, bytes | None] | None:
    """Read ``lines`` (no CR LF) as SMTP reply lines: ``(complete replies, code of a
    continuation left open or None)``, or None when a line is no reply line or a
    continuation line is followed by a line of another code."""
    complete, open_code = 0, None
    for line in lines:
        parsed = _reply_code(line)
        if parsed is None:
            return None
        code, continued = parsed
        if open_code is not None and code != open_code:
            return None
        if continued:
            open_code = code
        else:
            complete, open_code = complete + 1, None
    return complete, open_code


def wire_shape(data: bytes) -> tuple[int, bytes | None] | None:
    """:func:`reply_shape` of CR LF-terminated reply bytes (what a HookOutcome carries);
    None also when they do not end in CR LF or hold a lone CR or LF."""
    if not data:
        return 0, None
    if not data.endswith(b"\r\n"):
        return None
    lines = data[:-2].split(b"\r\n")
    if any(b"\n" in line for line in lines):
        return None
    return reply_shape(lines)
