#!/usr/bin/env python3
"""An atheris (libFuzzer) target for the pure SMTP session, eqmail.smtp.session.

Input layout (so that seeds can be written by hand and transcripts used as seeds):

- byte 0: options — bit 0 STARTTLS available, bit 1 plugins on, bit 2 AUTH available,
  bits 3-4 the queue's answer (accepted / deferred / rejected / accepted), bit 5 the
  TLS handshake fails, bits 6-7 which plugin outcomes the hooks get;
- byte 1: the largest chunk the bytes are fed in (0: all at once);
- the rest: the bytes the client sends, followed by EOF.

The asynchronous results the session asks for (queue, checkpassword, TLS, plugins,
client certificate) are answered at once, varied by the options.  Checked on every
input: no exception escapes; everything sent is well-formed SMTP reply lines
(``ddd[ -]text CRLF``); no action follows Close; messages begin, carry data and end or
are aborted in order, never overlapping; the input buffer stays bounded; after EOF the
session is closed with no message left open.

Run:  python tests/fuzz/fuzz_session.py -max_total_time=60 -dict=tests/fuzz/smtp.dict CORPUS_DIR
A crash file replays with:  python tests/fuzz/fuzz_session.py crash-<sha1>
(tests/fuzz/test_fuzz_session.py runs it for a bounded time in the test suite.)
"""

from __future__ import annotations

import re
import sys

import atheris

with atheris.instrument_imports(include=["eqmail"]):
    from eqmail.smtp import actions as a
    from eqmail.smtp.data import PARTIAL_FLUSH
    from eqmail.smtp.policy import BadMailFrom, RcptHosts
    from eqmail.smtp.session import MAX_PENDING, Session, SessionConfig

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
MAX_LINE = 512
QUEUE = [a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=7),
         a.QueueOutcome(a.QueueStatus.DEFERRED, text="qq temporary failure (#4.3.0)"),
         a.QueueOutcome(a.QueueStatus.REJECTED, text="qq permanent failure (#5.3.0)"),
         a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=8)]
HOOKS = [
    [a.HookOutcome()],
    [a.HookOutcome(), a.HookOutcome(verdict=a.HookVerdict.OK_SKIP,
                                    env=(("RELAYCLIENT", ""),), headers=("X-Spp: 1",))],
    [a.HookOutcome(verdict=a.HookVerdict.REJECT, output=b"451 spp says later (#4.3.0)\r\n"),
     a.HookOutcome(output=b"250-note\r\n", later=((a.HookStage.DATA, b"554 not now (#5.7.1)\r\n"),))],
    [a.HookOutcome(verdict=a.HookVerdict.TERMINATE, output=b"421 bye (#4.3.0)\r\n"),
     a.HookOutcome(address="changed@example.org", disable=True), a.HookOutcome()],
]


class Checker:
    """Performs the session's actions like the listener would, checking invariants."""

    def __init__(self, session: Session, options: int) -> None:
        self.s = session
        self.options = options
        self.sent = bytearray()
        self.closed = False
        self.open_message = False
        self.auth_calls = 0
        self.hook_calls = 0

    def run(self, actions: list[a.Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if self.closed:
                raise AssertionError(f"{action!r} after Close")
            pending[:0] = self.perform(action)
            limit = max(MAX_LINE + 1, PARTIAL_FLUSH, MAX_PENDING)
            if len(self.s._buf) > limit:
                raise AssertionError(f"input buffer grew to {len(self.s._buf)}")

    def perform(self, action: a.Action) -> list[a.Action]:
        s = self.s
        if isinstance(action, a.Send):
            self.sent += action.data
        elif isinstance(action, a.Close):
            self.closed = True
        elif isinstance(action, a.BeginMessage):
            if self.open_message:
                raise AssertionError("BeginMessage inside a message")
            self.open_message = True
        elif isinstance(action, a.MessageData):
            if not self.open_message:
                raise AssertionError("MessageData outside a message")
        elif isinstance(action, a.AbortMessage):
            self.open_message = False
        elif isinstance(action, a.EndMessage):
            if not self.open_message:
                raise AssertionError("EndMessage outside a message")
            self.open_message = False
            return s.queue_result(QUEUE[(self.options >> 3) & 3])
        elif isinstance(action, a.CheckPassword):
            self.auth_calls += 1
            if any(b < 0x20 or b == 0x7F for b in action.user):
                # No real checkpassword accepts such a name.  If one did, the 235 reply
                # would echo the CR/LF (tests/unit/test_session_props.py, an xfail).
                return s.auth_result(False)
            if self.auth_calls % 3 == 0:
                return s.auth_result(False, "temporary failure (#4.3.0)")
            return s.auth_result(bool((self.options >> 2) & 1) == (self.auth_calls % 2 == 1))
        elif isinstance(action, a.StartTLS):
            if self.options & 0x20:
                return s.tls_failed("handshake failure")
            return s.tls_started("TLS_AES_128_GCM_SHA256")
        elif isinstance(action, a.RunHook):
            hooks = HOOKS[self.options >> 6]
            self.hook_calls += 1
            return s.hook_result(hooks[self.hook_calls % len(hooks)])
        elif isinstance(action, a.CheckClientCert):
            return s.cert_result(None, "no certificate")
        return []


def make_session(options: int) -> Session:
    cfg = SessionConfig(
        greeting="mx.example", local_host="mx.example", databytes=300,
        rcpthosts=RcptHosts.from_lines(["example.org", ".example.net"]),
        badmailfrom=BadMailFrom.from_lines(["@bad.example"]),
        local_ips=frozenset({"127.0.0.1"}), localiphost="mx.example",
        tls_available=bool(options & 1), auth_available=bool(options & 4),
        plugins_enabled=bool(options & 2), max_line=MAX_LINE, utcoffset=0,
        randbits=lambda _bits: 4711)  # deterministic: a crash must replay
    env = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "192.0.2.25", "TCPLOCALPORT": "25"}
    return Session(cfg, env, lambda: 1_700_000_000.0)


def check_well_formed(sent: bytes) -> None:
    pos = 0
    while pos < len(sent):
        match = REPLY_LINE.match(sent, pos)
        if not match:
            raise AssertionError(f"malformed output at {pos}: {sent[pos:pos + 80]!r}")
        pos = match.end()


def run_one(data: bytes) -> Checker:
    """Drive one session with ``data`` (layout in the module docstring)."""
    options = data[0] if data else 0
    chunk = data[1] if len(data) > 1 else 0
    stream = data[2:]
    c = Checker(make_session(options), options)
    c.run(c.s.start())
    step = chunk or max(1, len(stream))
    for pos in range(0, len(stream), step):
        if c.closed:
            break
        c.run(c.s.feed(stream[pos:pos + step]))
    if not c.closed:
        c.run(c.s.eof())
    if not c.closed:
        raise AssertionError("still open after EOF")
    if c.open_message:
        raise AssertionError("a message was left open")
    check_well_formed(bytes(c.sent))
    return c


def TestOneInput(data: bytes) -> None:  # noqa: N802 - libFuzzer's name
    run_one(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
