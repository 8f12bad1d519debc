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

eqmail is stricter (DESIGN.md, docs/compatibility.md): one command gets exactly one
reply, whatever the plugins print.  Every text that reaches the client must be a
well-formed SMTP reply line (``ddd``, ``ddd text`` or ``ddd-text``, no CR), and the
section's texts together are one reply with one code: ``P`` lines are continuation
lines (``ddd-``) that either an ``E``/``R`` text finishes, or that are left open for the
session's own success reply of that hook (e.g. a ``220-`` banner line at [connection]);
a ``P`` text that is itself a complete reply, a second reply, or a change of code is
malformed.  ``D`` may follow one complete reply or none.  The ``LM``/``LR``/``LD`` texts
queued for one command are one complete reply too.  An ``H`` text must be one header
field (:func:`valid_header`: a name of printable ASCII, a colon, a value without control
characters other than TAB, at most MAX_HEADER bytes); anything else could split into a
second header or end the header block, so the plugin counts as failed.  A failed
plugin's own commands are discarded (qmail applied those it had read); what earlier
plugins of the section did stays, but never a reply text: the failure reply is then the
command's only reply.

Failure replies: ``451 qmail-spp failure: <plugin line>: <reason> (#4.3.0)``, the command
is rejected and the session goes on.  Pure code: no I/O, never raises on any input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from eqmail.ipc.hooks import MAX_HEADER as MAX_HEADER
from eqmail.ipc.hooks import HookOutcome, HookStage, HookVerdict, reply_shape, valid_header
from eqmail.ipc.hooks import wire_shape as wire_shape

MAX_OUTPUT = 64 * 1024  # bytes of stdout read from one plugin; more is a failure

# Failure reasons.  The first three are qmail-spp's texts; the rest are eqmail's.
CANT_EXECUTE = "can't execute"
CRASHED = "child crashed"
CANT_FORK = "vfork() failed"
TIMEOUT = "timeout"
TOO_LARGE = "output too large"
MALFORMED = "malformed output"
BAD_HEADER = "malformed header"
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
    bad_header: bool = False                               # an H text is no header field


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
            if not text:  # an empty header line would end the header block: dropped
                pass
            elif valid_header(text):
                cmds.headers.append(_decode(text))
            else:
                cmds.bad_header = True
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


def texts_ok(shape: tuple[int, bytes | None] | None, terminal: str | None,
             stage: HookStage) -> bool:
    """Whether a section's reply texts so far, ending with ``terminal``, make exactly
    one reply for the command together with what the session itself will send."""
    if shape is None:
        return False
    complete, open_code = shape
    if terminal in ("E", "R"):  # the plugin's text is the reply, finished by this line
        return complete == 1 and open_code is None
    if terminal == "D":         # silent close: after one finished reply, or none
        return complete <= 1 and open_code is None
    # the session's own reply follows (or a later plugin's E/R): nothing finished yet,
    # and an open continuation must carry the code of the session's success reply
    return complete == 0 and open_code in (None, SUCCESS_CODE[stage])


class Section:
    """The run of one section's plugins, in order: feed each plugin's result to
    :meth:`add` (stop when it returns True), give later plugins :attr:`env`, and take
    :meth:`outcome` at the end."""

    def __init__(self, stage: HookStage, env: Mapping[str, str]) -> None:
        self.stage = stage
        self.env: dict[str, str] = dict(env)   # what the next plugin sees
        self._texts: list[bytes] = []          # reply lines for the client, no CRLF
        self._env: list[tuple[str, str | None]] = []
        self._headers: list[str] = []
        self._later: list[tuple[HookStage, bytes]] = []
        self._address: str | None = None
        self._disable = False
        self._verdict = HookVerdict.NORMAL
        self._failure: bytes | None = None
        self.failure: str | None = None        # why the section failed, for the log

    def add(self, plugin_line: str, data: bytes, failure: str | None = None) -> bool:
        """One plugin's stdout (or why it failed).  True: the section is over."""
        if failure is not None:
            return self._fail(plugin_line, failure)
        cmds = parse_output(data, self.stage)
        if cmds.bad_header:
            return self._fail(plugin_line, BAD_HEADER)
        shape = reply_shape(self._texts + cmds.texts)
        if not texts_ok(shape, cmds.terminal, self.stage) or not self._later_ok(cmds.later):
            return self._fail(plugin_line, MALFORMED)
        self._apply(cmds)
        return self._finish(cmds.terminal)

    def _later_ok(self, later: list[tuple[HookStage, bytes]]) -> bool:
        """Each command's queued texts (this section's so far included) stay one
        finished reply: a second one would be a second reply to that command."""
        for stage in {s for s, _ in later}:
            lines = [t for s, t in self._later + later if s is stage]
            if reply_shape(lines) != (1, None):
                return False
        return True

    def _apply(self, cmds: Commands) -> None:
        self._texts.extend(cmds.texts)
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
        self._texts.clear()  # never finished before a terminal: the 451 is the reply
        self.failure = reason
        self._failure = failure_text(plugin_line, reason)
        self._verdict = HookVerdict.REJECT
        return True

    def outcome(self) -> HookOutcome:
        output = b"".join(t + b"\r\n" for t in self._texts) + (self._failure or b"")
        later: dict[HookStage, bytes] = {}  # one reply per command, in order of appearance
        for stage, text in self._later:
            later[stage] = later.get(stage, b"") + text + b"\r\n"
        return HookOutcome(
            verdict=self._verdict, output=output, env=tuple(self._env),
            headers=tuple(self._headers), later=tuple(later.items()),
            disable=self._disable, address=self._address)
