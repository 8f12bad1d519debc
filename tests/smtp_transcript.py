"""SMTP transcripts (tests/cases/smtp/*.txt): the parser, and a driver for the pure Session.

The file format is described in tests/cases/smtp/README.md.  :func:`parse` /
:func:`load` only turn a file into a :class:`Transcript` (header settings + ordered
steps) so the same transcripts can be replayed against a live listener over TCP; the
pure-session driver is :func:`run_pure`, which raises AssertionError with the file name,
line number and what differed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

CASES = Path(__file__).parent / "cases" / "smtp"

_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
_SIMPLE = {"r": "\r", "n": "\n", "t": "\t", "\\": "\\", "0": "\0", "s": " "}


def unescape(text: str) -> bytes:
    r"""``\r \n \t \0 \\ \s`` (space, for trailing spaces) and ``\xNN``; UTF-8 otherwise."""
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] == "x" and len(code) == 3:
            return chr(int(code[1:], 16))
        if code in _SIMPLE:
            return _SIMPLE[code]
        raise ValueError(f"unknown escape \\{code}")
    # Escapes map to code points < 256; latin-1 turns them into those exact bytes.  Text
    # outside escapes is encoded as UTF-8 first, so keep the two apart.
    parts = []
    pos = 0
    for match in _ESCAPE.finditer(text):
        parts.append(text[pos:match.start()].encode("utf-8"))
        parts.append(one(match).encode("latin-1"))
        pos = match.end()
    parts.append(text[pos:].encode("utf-8"))
    return b"".join(parts)


@dataclass(frozen=True)
class Step:
    """kind: send (bytes to the server), expect (one reply line, text without CRLF),
    eof (client closes its side), closed (server must have closed), message /
    header (expected stored body / header_prefix lines, bytes with LF), log (next log
    line), auth (expected checkpassword call "method user password")."""

    kind: str
    data: bytes
    line: int


@dataclass
class Transcript:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    auth: list[str] = field(default_factory=list)     # ok | fail | crash, in order
    queue: list[str] = field(default_factory=list)    # ok QP | reject TEXT | defer TEXT
    hooks: list[tuple[str, str, bytes]] = field(default_factory=list)  # stage verdict output
    certs: list[str] = field(default_factory=list)    # EMAIL | none [REASON]
    steps: list[Step] = field(default_factory=list)


_PREFIX_KINDS = {"C:": "send", "R:": "send", "S:": "expect", "M:": "message",
                 "H:": "header", "L:": "log", "A:": "auth", "E:": "envelope"}


def parse(text: str, name: str) -> Transcript:
    t = Transcript(name)
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if raw.startswith("#"):
            _header(t, raw[1:].strip())
            continue
        if raw in ("!eof", "!closed"):
            t.steps.append(Step(raw[1:], b"", number))
            continue
        tag, body = raw[:2], raw[3:] if raw[2:3] == " " else raw[2:]
        kind = _PREFIX_KINDS.get(tag)
        if kind is None:
            raise ValueError(f"{name}:{number}: unknown line {raw!r}")
        if tag == "C:":
            data = body.encode("utf-8") + b"\r\n"
        elif tag in ("R:", "M:", "H:", "S:"):
            data = unescape(body) + (b"\n" if tag in ("M:", "H:") else b"")
        else:
            data = body.encode("utf-8")
        t.steps.append(Step(kind, data, number))
    return t


def _header(t: Transcript, text: str) -> None:
    key, sep, value = text.partition(":")
    if not sep or " " in key:
        return  # a comment
    value = value.strip()
    if key == "env":
        name, _, val = value.partition("=")
        t.env[name] = val
    elif key == "config":
        name, _, val = value.partition("=")
        t.config[name.strip()] = val.strip()
    elif key == "auth":
        t.auth.append(value)
    elif key == "queue":
        t.queue.append(value)
    elif key == "cert":
        t.certs.append(value)
    elif key == "hook":
        stage, verdict, *rest = value.split(" ", 2)
        t.hooks.append((stage, verdict, unescape(rest[0]) if rest else b""))


def load(path: Path) -> Transcript:
    return parse(path.read_text(encoding="utf-8"), path.name)


def all_cases() -> list[Path]:
    return sorted(CASES.glob("*.txt"))


# ---- driving the pure Session -----------------------------------------------------------

DEFAULT_CONFIG = {
    "greeting": "mx.example.org",
    "local_host": "mx.example.org",
    "databytes": "0",
    "rcpthosts": "example.org .example.net",
    "badmailfrom": "",
    "local_ips": "127.0.0.1 192.0.2.25",
    "localiphost": "",
    "tls": "0",
    "auth": "0",
    "tls_client_relay": "0",
    "plugins": "0",
    "max_line": "12288",
    "pid": "4711",
    "clock": "1700000000",
    "utcoffset": "3600",
    "cipher": "TLS_AES_256_GCM_SHA384",
    # what one client may take; the product's defaults except the error delay (a
    # transcript has no clock: the delay is tested in tests/unit/test_session_limits.py)
    "maxrcpt": "1000",
    "smtperrorsoftlimit": "10",
    "smtperrorhardlimit": "20",
    "smtperrorsleep": "0",
    "smtpjunklimit": "100",
}
DEFAULT_ENV = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "192.0.2.25", "TCPLOCALPORT": "25"}


def build_session(t: Transcript):  # -> (Session, config dict); imports kept local
    from eqmail.smtp.policy import BadMailFrom, RcptHosts
    from eqmail.smtp.session import Session, SessionConfig

    c = {**DEFAULT_CONFIG, **t.config}
    numbers, turn = (int(c["pid"]), int(c["clock"])), itertools.count()
    rcpthosts = None if c["rcpthosts"] == "NONE" else RcptHosts.from_lines(c["rcpthosts"].split())
    cfg = SessionConfig(
        greeting=c["greeting"], local_host=c["local_host"], databytes=int(c["databytes"]),
        rcpthosts=rcpthosts, badmailfrom=BadMailFrom.from_lines(c["badmailfrom"].split()),
        local_ips=frozenset(c["local_ips"].split()), localiphost=c["localiphost"] or None,
        tls_available=c["tls"] == "1", auth_available=c["auth"] == "1",
        tls_client_relay=c["tls_client_relay"] == "1", plugins_enabled=c["plugins"] == "1",
        max_line=int(c["max_line"]), utcoffset=int(c["utcoffset"]),
        # the challenge's two "random" numbers: eQmail's <pid.time@local>, for the texts
        randbits=lambda _bits: numbers[next(turn) % 2],
        max_rcpt=int(c["maxrcpt"]), error_soft_limit=int(c["smtperrorsoftlimit"]),
        error_hard_limit=int(c["smtperrorhardlimit"]), error_sleep=float(c["smtperrorsleep"]),
        junk_limit=int(c["smtpjunklimit"]),
    )
    clock = float(c["clock"])
    return Session(cfg, {**DEFAULT_ENV, **t.env}, lambda: clock), c


class PureDriver:
    """Runs the asynchronous parts the way the transcript header says."""

    def __init__(self, t: Transcript) -> None:
        from eqmail.smtp import actions as a
        self.a = a
        self.t = t
        self.session, self.config = build_session(t)
        self.output = bytearray()
        self.logs: list[str] = []
        self.checks: list[str] = []
        self.messages: list[tuple[bytes, bytes]] = []   # (header_prefix, body) ended
        self.envelopes: list[str] = []                   # "sender rcpt rcpt..." ended
        self._current: list[bytes] | None = None
        self._envelope = ""
        self._header = b""
        self.closed = False
        self._auth = list(t.auth)
        self._queue = list(t.queue)
        self._hooks = list(t.hooks)
        self._certs = list(t.certs)

    def run(self, actions: list) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            pending[:0] = self._perform(action)

    def _perform(self, action) -> list:  # noqa: C901 - one branch per action type
        a, s = self.a, self.session
        if self.closed:
            raise AssertionError(f"{self.t.name}: action {action!r} after Close")
        if isinstance(action, a.Send):
            self.output += action.data
        elif isinstance(action, a.Close):
            self.closed = True
        elif isinstance(action, a.Log):
            self.logs.append(action.line)
        elif isinstance(action, a.BeginMessage):
            self._current, self._header = [], action.header_prefix
            self._envelope = " ".join([action.sender, *action.recipients])
        elif isinstance(action, a.MessageData):
            assert self._current is not None, "MessageData outside a message"
            self._current.append(action.data)
        elif isinstance(action, a.AbortMessage):
            assert self._current is not None, "AbortMessage outside a message"
            self._current = None
        elif isinstance(action, a.EndMessage):
            assert self._current is not None, "EndMessage outside a message"
            self.messages.append((self._header, b"".join(self._current)))
            self.envelopes.append(self._envelope)
            self._current = None
            return s.queue_result(self._queue_outcome())
        elif isinstance(action, a.CheckPassword):
            self.checks.append(f"{action.method} {action.user.decode('utf-8', 'replace')} "
                               f"{action.password.decode('utf-8', 'replace')}")
            outcome = self._auth.pop(0) if self._auth else "ok"
            if outcome == "crash":
                from eqmail.smtp import replies
                return s.auth_result(False, replies.AUTH_CHILD_CRASHED.text)
            return s.auth_result(outcome == "ok")
        elif isinstance(action, a.StartTLS):
            return s.tls_started(self.config["cipher"])
        elif isinstance(action, a.RunHook):
            return s.hook_result(self._hook_outcome(action.stage.value))
        elif isinstance(action, a.CheckClientCert):
            spec = self._certs.pop(0) if self._certs else "none"
            email, _, reason = spec.partition(" ")
            return s.cert_result(None if email == "none" else email, reason or None)
        return []

    def _queue_outcome(self):
        a = self.a
        spec = self._queue.pop(0) if self._queue else "ok 4242"
        kind, _, rest = spec.partition(" ")
        if kind == "ok":
            return a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=int(rest or 4242))
        status = a.QueueStatus.REJECTED if kind == "reject" else a.QueueStatus.DEFERRED
        return a.QueueOutcome(status, text=rest)

    def _hook_outcome(self, stage: str):
        a = self.a
        for i, (hstage, verdict, output) in enumerate(self._hooks):
            if hstage == stage:
                del self._hooks[i]
                return a.HookOutcome(a.HookVerdict(verdict), output=output)
        return a.HookOutcome()


def run_pure(t: Transcript) -> PureDriver:
    """Replay ``t`` against a pure Session; AssertionError on the first difference."""
    d = PureDriver(t)
    d.run(d.session.start())
    lines: list[bytes] = []
    log_pos = 0
    for step in t.steps:
        where = f"{t.name}:{step.line}"
        if step.kind == "send":
            d.run(d.session.feed(step.data))
        elif step.kind == "eof":
            d.run(d.session.eof())
        elif step.kind == "expect":
            lines.extend(_take_lines(d.output))
            assert lines, f"{where}: expected {step.data!r}, server sent nothing more"
            got = lines.pop(0)
            assert got == step.data + b"\r\n", f"{where}: expected {step.data!r}, got {got!r}"
        elif step.kind == "closed":
            assert d.closed, f"{where}: server did not close"
        elif step.kind in ("message", "header"):
            _check_message(d, step, where)
        elif step.kind == "log":
            assert log_pos < len(d.logs), f"{where}: no log line {step.data!r}"
            got_log = d.logs[log_pos]
            log_pos += 1
            assert got_log == step.data.decode(), f"{where}: log {got_log!r}"
        elif step.kind == "envelope":
            assert d.envelopes, f"{where}: no message was queued"
            assert d.envelopes[-1] == step.data.decode(), f"{where}: envelope {d.envelopes[-1]!r}"
        elif step.kind == "auth":
            assert d.checks, f"{where}: no checkpassword call"
            got_check = d.checks.pop(0)
            assert got_check == step.data.decode(), f"{where}: checkpassword {got_check!r}"
    lines.extend(_take_lines(d.output))
    assert not lines and not d.output, f"{t.name}: unexpected output {lines!r} {bytes(d.output)!r}"
    for number, (header, body) in enumerate(d.messages, start=1):
        for kind, actual in (("header", header), ("message", body)):
            seen = getattr(d, f"_seen_{kind}_{number}", None)
            assert seen is None or seen == actual, (
                f"{t.name}: message {number} {kind} is {actual!r}, transcript says {seen!r}")
    return d


def _take_lines(buf: bytearray) -> list[bytes]:
    out = []
    while (lf := buf.find(b"\n")) >= 0:
        out.append(bytes(buf[:lf + 1]))
        del buf[:lf + 1]
    return out


def _check_message(d: PureDriver, step: Step, where: str) -> None:
    """M:/H: lines accumulate; each step checks the last ended message *so far*."""
    assert d.messages, f"{where}: no message was queued"
    header, body = d.messages[-1]
    index = 1 if step.kind == "message" else 0
    key = f"_seen_{step.kind}_{len(d.messages)}"
    seen = getattr(d, key, b"") + step.data
    setattr(d, key, seen)
    actual = (header, body)[index]
    assert actual.startswith(seen), f"{where}: stored {actual!r} does not start {seen!r}"
