"""qmail-spp's plugin output protocol: one plugin's stdout, and one section's result.

Owns: the meaning of every output command (eqmail-features.md §2, qmail-spp.c 0.42):

====  ==========================================================  =====================
cmd   effect                                                      ends the section?
====  ==========================================================  =====================
A     accept; qmail-spp off for the rest of the session           yes, NORMAL
N     accept; skip the remaining plugins                          yes, NORMAL
O     accept; qmail's own MAIL/RCPT checks skipped                yes, OK_SKIP
E     send text, reject the command                               yes, REJECT
R     send text, close the connection                             yes, TERMINATE
D     close the connection silently                               yes, TERMINATE
P     send text, go on                                            no
H     header line for the next message                            no
C     replace the MAIL/RCPT address (ignored at other hooks)      no
S/U   set / unset a variable (seen by later plugins and session)  no
LM LR LD  text shown at the next MAIL / RCPT / DATA, rejecting it no
====  ==========================================================  =====================

Line rules are getln's as qmail-spp uses it: a line ends at LF; a final line without
LF loses its last character; a line of one byte (a lone LF, or one unterminated
character) is ignored; the first character is the command, unknown ones are ignored;
texts are C strings (cut at a NUL byte).  After a terminal command the rest of the
output is not looked at.

eqmail is stricter (DESIGN.md, docs/compatibility.md): every text that reaches the
client must be a well-formed SMTP reply line (``ddd``, ``ddd text`` or ``ddd-text``, no
CR), continuation lines must keep their code and be finished by the end of the
plugin's reply (a ``P`` continuation may be left open only for the session's own success
reply of that hook, e.g. a ``220-`` banner line at [connection]); otherwise the plugin
counts as failed.  A failed plugin's own commands are discarded (qmail applied those it
had read); what earlier plugins of the section did stays.

Failure replies: ``451 qmail-spp failure: <plugin line>: <reason> (#4.3.0)``, the command
is rejected and the session goes on.  Pure code: no I/O, never raises on any input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from eqmail.smtp.actions import HookOutcome, HookStage, HookVerdict

MAX_OUTPUT = 64 * 1024  # bytes of stdout read from one plugin; more is a failure

# Failure reasons.  The first three are qmail-spp's texts; the rest are eqmail's.
CANT_EXECUTE = "can't execute"
CRASHED = "child crashed"
CANT_FORK = "vfork() failed"
TIMEOUT = "timeout"
TOO_LARGE = "output too large"
MALFORMED = "malformed output"
UNAVAILABLE = "sandbox unavailable"

# The reply the session itself sends when the section accepts: an open P continuation
# must carry this code (it is finished by the session's reply).
SUCCESS_CODE: dict[HookStage, bytes] = {
    HookStage.CONNECTION: b"220", HookStage.HELO: b"250", HookStage.MAIL: b"250",
    HookStage.RCPT: b"250", HookStage.DATA: b"354", HookStage.AUTH: b"235",
}
ADDRESS_VAR = {HookStage.MAIL: "SMTPMAILFROM", HookStage.RCPT: "SMTPRCPTTO"}
_LATER = {b"M": HookStage.MAIL, b"R": HookStage.RCPT, b"D": HookStage.DATA}
_TERMINAL = frozenset(b"ANOERD")


def failure_text(plugin_line: str, reason: str) -> bytes:
    text = f"451 qmail-spp failure: {plugin_line}: {reason} (#4.3.0)\r\n"
    return text.encode("utf-8", "surrogateescape")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@dataclass
class Commands:
    """What one plugin's output says (before validation)."""

    texts: list[bytes] = field(default_factory=list)      # P, E, R texts in order
    env: list[tuple[str, str | None]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    later: list[tuple[HookStage, bytes]] = field(default_factory=list)
    address: str | None = None
    terminal: str | None = None                            # "A" "N" "O" "E" "R" "D"


def output_lines(data: bytes) -> list[bytes]:
    """getln's lines as qmail-spp sees them: LF removed, or the last byte of an
    unterminated final line removed; lines of one byte dropped."""
    lines = []
    start = 0
    while start < len(data):
        lf = data.find(b"\n", start)
        end = len(data) if lf < 0 else lf + 1
        if end - start > 1:
            lines.append(data[start:end - 1])
        start = end
    return lines


def parse_output(data: bytes, stage: HookStage) -> Commands:
    cmds = Commands()
    for line in output_lines(data):
        line = line.split(b"\0", 1)[0]  # C strings
        if not line:
            continue
        cmd, text = line[:1], line[1:]
        if cmd in (b"P", b"E", b"R"):
            cmds.texts.append(text)
        elif cmd == b"H":
            if text:  # an empty header line would end the header block: dropped
                cmds.headers.append(_decode(text))
        elif cmd == b"C":
            if stage in ADDRESS_VAR:
                cmds.address = _decode(text)
        elif cmd == b"S":
            name, eq, value = _decode(text).partition("=")
            if name and eq:  # qmail's env_put of a text without "=" sets nothing usable
                cmds.env.append((name, value))
        elif cmd == b"U":
            if text and b"=" not in text:
                cmds.env.append((_decode(text), None))
        elif cmd == b"L":
            target = _LATER.get(text[:1])
            if target is not None:
                cmds.later.append((target, text[1:]))
        if cmd[0] in _TERMINAL:
            cmds.terminal = cmd.decode()
            break
    return cmds


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


def replies_state(lines: list[bytes], open_code: bytes | None) -> tuple[bool, bytes | None]:
    """Check ``lines`` as reply lines following an open continuation ``open_code``.
    Returns (well-formed, code of the continuation left open or None)."""
    for line in lines:
        parsed = _reply_code(line)
        if parsed is None:
            return False, None
        code, continued = parsed
        if open_code is not None and code != open_code:
            return False, None
        open_code = code if continued else None
    return True, open_code


class Section:
    """The run of one section's plugins, in order: feed each plugin's result to
    :meth:`add` (stop when it returns True), give later plugins :attr:`env`, and take
    :meth:`outcome` at the end."""

    def __init__(self, stage: HookStage, env: Mapping[str, str]) -> None:
        self.stage = stage
        self.env: dict[str, str] = dict(env)   # what the next plugin sees
        self._texts: list[bytes] = []          # reply lines for the client, no CRLF
        self._open: bytes | None = None        # code of an unfinished continuation
        self._complete = 0                     # len(_texts) at the last finished reply
        self._env: list[tuple[str, str | None]] = []
        self._headers: list[str] = []
        self._later: list[tuple[HookStage, bytes]] = []
        self._address: str | None = None
        self._disable = False
        self._verdict = HookVerdict.NORMAL
        self._failure: bytes | None = None

    def add(self, plugin_line: str, data: bytes, failure: str | None = None) -> bool:
        """One plugin's stdout (or why it failed).  True: the section is over."""
        if failure is not None:
            return self._fail(plugin_line, failure)
        cmds = parse_output(data, self.stage)
        ok, open_code = replies_state(cmds.texts, self._open)
        terminal = cmds.terminal
        if ok and terminal in ("E", "R", "D") and open_code is not None:
            ok = False  # a rejection or goodbye must be a finished reply
        if ok and terminal in (None, "A", "N", "O") and open_code is not None:
            ok = open_code == SUCCESS_CODE[self.stage]
        if ok and not self._later_ok(cmds.later):
            ok = False
        if not ok:
            return self._fail(plugin_line, MALFORMED)
        self._apply(cmds, open_code)
        return self._finish(terminal)

    def _later_ok(self, later: list[tuple[HookStage, bytes]]) -> bool:
        for stage in {s for s, _ in later}:
            ok, open_code = replies_state([t for s, t in later if s is stage], None)
            if not ok or open_code is not None:
                return False
        return True

    def _apply(self, cmds: Commands, open_code: bytes | None) -> None:
        self._texts.extend(cmds.texts)
        self._open = open_code
        if open_code is None:
            self._complete = len(self._texts)
        for name, value in cmds.env:
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self._env.extend(cmds.env)
        self._headers.extend(cmds.headers)
        self._later.extend(cmds.later)
        if cmds.address is not None:
            self._address = cmds.address
            var = ADDRESS_VAR[self.stage]
            self.env[var] = cmds.address
            self._env.append((var, cmds.address))

    def _finish(self, terminal: str | None) -> bool:
        if terminal is None:
            return False
        if terminal == "A":
            self._disable = True
        self._verdict = {"A": HookVerdict.NORMAL, "N": HookVerdict.NORMAL,
                         "O": HookVerdict.OK_SKIP, "E": HookVerdict.REJECT,
                         "R": HookVerdict.TERMINATE, "D": HookVerdict.TERMINATE}[terminal]
        return True

    def _fail(self, plugin_line: str, reason: str) -> bool:
        del self._texts[self._complete:]  # an unfinished reply cannot precede the 451
        self._open = None
        self._failure = failure_text(plugin_line, reason)
        self._verdict = HookVerdict.REJECT
        return True

    def outcome(self) -> HookOutcome:
        output = b"".join(t + b"\r\n" for t in self._texts) + (self._failure or b"")
        return HookOutcome(
            verdict=self._verdict, output=output, env=tuple(self._env),
            headers=tuple(self._headers),
            later=tuple((stage, text + b"\r\n") for stage, text in self._later),
            disable=self._disable, address=self._address)
