"""State-machine properties of the pure SMTP session against a model of qmail-smtpd.

test_session_fuzz.py shows that no byte sequence breaks the session; here Hypothesis
generates *meaningful* conversations (HELO/EHLO, MAIL with good and badmailfrom senders,
RCPT inside and outside rcpthosts, DATA with dot-stuffed bodies, RSET, NOOP, VRFY,
unknown verbs, pipelined in random chunks) and a small model of qmail-smtpd's
transaction rules predicts every reply code and every queued message:

- RCPT or DATA before MAIL: 503; DATA without a recipient: 503;
- HELO, EHLO, RSET and a finished DATA end the transaction;
- a badmailfrom sender gets 553 for every RCPT; a domain outside rcpthosts gets 553;
- a message is queued exactly when its end of DATA is answered 250, with the sender and
  recipients of its own transaction and the body unstuffed, with LF line ends.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.smtp import actions as a
from eqmail.smtp.policy import BadMailFrom, RcptHosts
from eqmail.smtp.session import Session, SessionConfig

CODE = re.compile(rb"^(\d{3}) ", re.M)


def session(auth: bool = False) -> Session:
    cfg = SessionConfig(greeting="mx.example", local_host="mx.example", databytes=0,
                        rcpthosts=RcptHosts.from_lines(["example.org"]),
                        badmailfrom=BadMailFrom.from_lines(["@bad.example"]),
                        auth_available=auth, utcoffset=0)
    return Session(cfg, {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALPORT": "25"}, lambda: 1e9)


@dataclass
class Model:
    sender: str | None = None
    barf: bool = False
    rcpts: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    queued: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)

    def reset(self) -> None:
        self.sender, self.rcpts, self.barf = None, [], False


senders = st.sampled_from(["a@b.example", "", "x@bad.example", "joe@example.org"])
rcpts = st.sampled_from(["c@example.org", "d@example.org", "e@elsewhere.example", "postmaster"])
body_lines = st.lists(st.sampled_from([b"hello", b".dot", b"..two", b"", b"x" * 100, b"."]),
                      max_size=6)


@st.composite
def commands(draw: st.DrawFn) -> tuple[bytes, Model]:
    """A conversation (bytes) and the model's prediction for it."""
    m = Model()
    out = bytearray()
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["helo", "ehlo", "mail", "rcpt", "rcpt", "data", "rset",
                                     "noop", "vrfy", "junk"]))
        if kind in ("helo", "ehlo"):
            out += kind.upper().encode() + b" client.example\r\n"
            m.reset()
            m.codes.append(250)
        elif kind == "mail":
            addr = draw(senders)
            out += f"MAIL FROM:<{addr}>\r\n".encode()
            m.sender, m.rcpts, m.barf = addr, [], addr.endswith("@bad.example")
            m.codes.append(250)
        elif kind == "rcpt":
            addr = draw(rcpts)
            out += f"RCPT TO:<{addr}>\r\n".encode()
            if m.sender is None:
                m.codes.append(503)
            elif m.barf or addr.endswith("elsewhere.example"):
                m.codes.append(553)
            else:  # no '@' passes rcpthosts, as in qmail
                m.rcpts.append(addr)
                m.codes.append(250)
        elif kind == "data":
            out += b"DATA\r\n"
            if m.sender is None or not m.rcpts:
                m.codes.append(503)
                continue
            lines = draw(body_lines)
            out += b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
            out += b".\r\n"
            m.codes += [354, 250]
            m.queued.append((m.sender, tuple(m.rcpts), b"".join(ln + b"\n" for ln in lines)))
            m.reset()
        elif kind == "rset":
            out += b"RSET\r\n"
            m.reset()
            m.codes.append(250)
        elif kind == "noop":
            out += b"NOOP\r\n"
            m.codes.append(250)
        elif kind == "vrfy":
            out += b"VRFY joe\r\n"
            m.codes.append(252)
        else:
            out += b"XYZZY\r\n"
            m.codes.append(500)
    out += b"QUIT\r\n"
    m.codes.append(221)
    return bytes(out), m


def run(data: bytes, cuts: list[int]) -> tuple[list[int], list[tuple[str, tuple[str, ...], bytes]]]:
    s = session()
    sent = bytearray()
    queued: list[tuple[str, tuple[str, ...], bytes]] = []
    current: list[bytes] = []
    begin: a.BeginMessage | None = None

    def perform(actions: list[a.Action]) -> None:
        nonlocal begin
        pending = list(actions)
        while pending:
            act = pending.pop(0)
            if isinstance(act, a.Send):
                sent.extend(act.data)
            elif isinstance(act, a.BeginMessage):
                begin, current[:] = act, []
            elif isinstance(act, a.MessageData):
                current.append(act.data)
            elif isinstance(act, a.EndMessage):
                assert begin is not None
                queued.append((begin.sender, begin.recipients, b"".join(current)))
                begin = None
                pending[:0] = s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=1))

    perform(s.start())
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:], strict=False):
        perform(s.feed(data[start:end]))
    perform(s.eof())
    assert s.closed
    codes = [int(c) for c in CODE.findall(bytes(sent))]
    assert codes[0] == 220
    return codes[1:], queued


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands(), st.lists(st.integers(0, 5000), max_size=8))
def test_replies_and_queued_messages_follow_the_model(conv: tuple[bytes, Model], cuts: list[int]) -> None:
    data, model = conv
    codes, queued = run(data, cuts)
    assert codes == model.codes
    assert queued == model.queued


# ------------------------------------------------------------------ AUTH user names


def auth_reply(user: bytes) -> bytes:
    s = session(auth=True)
    s.start()
    sent = bytearray()
    line = b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0secret") + b"\r\n"
    for act in s.feed(b"EHLO x\r\n" + line):
        if isinstance(act, a.CheckPassword):
            for done in s.auth_result(True):  # a checkpassword that accepted this name
                if isinstance(done, a.Send):
                    sent += done.data
    return bytes(sent)


def test_auth_ok_reply_for_a_plain_name() -> None:
    assert auth_reply(b"joe") == b"235 ok, joe, go ahead (#2.0.0)\r\n"


@given(st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b))
@settings(max_examples=200, deadline=None)
def test_auth_ok_reply_is_one_well_formed_line_whatever_the_name(user: bytes) -> None:
    reply = auth_reply(b"joe" + user)
    assert re.fullmatch(rb"235 [^\r\n]*\r\n", reply), reply
