"""REQUIRETLS (RFC 8689, issue 17) on the receiving and queue side: the SMTP session's
EHLO keyword and MAIL parameter, the envelope's and the queue files' ``Xrequiretls=1``
record from the writer through preprocessing to the remote delivery option, what
``eqmailctl queue show`` prints, and the bounce of a REQUIRETLS message (header only,
itself a REQUIRETLS message: RFC 8689 §5)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.ipc.delivery import Channel
from eqmail.ipc.queue import QQExit, QueueEnvelope
from eqmail.queue.bounce import BounceTarget, compose_bounce, header_copy
from eqmail.queue.envelope import (
    Envelope,
    info_bytes,
    parse_records,
    requiretls_of,
    todo_bytes,
)
from eqmail.queue.manager import Delivery
from eqmail.smtp import actions as a
from eqmail.smtp import replies
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import Session, SessionConfig
from eqmail.workers.scanner import delivery_options

CRLF = b"\r\n"


# ---- the session ----------------------------------------------------------------------

def _session(tls: bool = False, smtps: bool = False) -> tuple[Session, list[a.Action]]:
    cfg = SessionConfig(greeting="mx.example.org", local_host="mx.example.org", databytes=0,
                        rcpthosts=RcptHosts.from_lines(["example.org"]), tls_available=tls,
                        utcoffset=0)
    s = Session(cfg, {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALPORT": "25"}, lambda: 1.7e9)
    out: list[a.Action] = []
    if smtps:
        out += s.tls_started("TLS_AES_256_GCM_SHA384")
    out += s.start()
    return s, out


def _sent(actions: list[a.Action]) -> bytes:
    return b"".join(x.data for x in actions if isinstance(x, a.Send))


def _starttls(s: Session) -> None:
    assert _sent(s.feed(b"STARTTLS\r\n")) == b"220 ready for tls\r\n"
    s.tls_started("TLS_AES_256_GCM_SHA384")


def test_ehlo_offers_requiretls_only_under_tls() -> None:
    s, _ = _session(tls=True)
    clear = _sent(s.feed(b"EHLO client.example\r\n"))
    assert clear == (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                     b"250-8BITMIME\r\n250-CHUNKING\r\n250 SIZE 0\r\n")  # qmail's bytes, no REQUIRETLS
    _starttls(s)
    assert _sent(s.feed(b"EHLO client.example\r\n")) == (
        b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-SIZE 0\r\n"
        b"250 REQUIRETLS\r\n")
    # HELO has no keywords, inside TLS or not
    assert _sent(s.feed(b"HELO client.example\r\n")) == b"250 mx.example.org\r\n"


def test_smtps_session_offers_it_from_the_first_ehlo() -> None:
    s, _ = _session(tls=True, smtps=True)
    assert _sent(s.feed(b"EHLO client.example\r\n")).endswith(b"250-SIZE 0\r\n250 REQUIRETLS\r\n")


def _transaction(s: Session, mail: bytes) -> tuple[bytes, list[a.BeginMessage]]:
    """MAIL (as given), RCPT, DATA, a body, QUIT; the replies and the messages begun."""
    actions = s.feed(mail + CRLF + b"RCPT TO:<joe@example.org>\r\nDATA\r\n")
    sent = _sent(actions)
    begun = [x for x in actions if isinstance(x, a.BeginMessage)]
    if begun:
        actions = s.feed(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        assert any(isinstance(x, a.EndMessage) for x in actions)
        sent += _sent(actions) + _sent(s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=7)))
    return sent, begun


def test_mail_requiretls_in_clear_text_is_refused() -> None:
    s, _ = _session(tls=True)
    s.feed(b"EHLO client.example\r\n")
    sent, begun = _transaction(s, b"MAIL FROM:<a@sender.example> REQUIRETLS")
    assert sent.startswith(b"530 REQUIRETLS needs a TLS session, use STARTTLS first (#5.7.10)\r\n"
                           b"503 MAIL first (#5.5.1)\r\n")
    assert begun == []
    assert replies.REQUIRETLS_NEEDS_TLS.wire() == (
        b"530 REQUIRETLS needs a TLS session, use STARTTLS first (#5.7.10)\r\n")


@pytest.mark.parametrize("param", [b"REQUIRETLS", b"requiretls", b"RequireTLS"])
def test_mail_requiretls_under_tls_tags_the_message(param: bytes) -> None:
    s, _ = _session(tls=True)
    _starttls(s)
    s.feed(b"EHLO client.example\r\n")
    sent, begun = _transaction(s, b"MAIL FROM:<a@sender.example> SIZE=10 " + param)
    assert sent == b"250 ok\r\n250 ok\r\n354 go ahead\r\n250 ok 1700000000 qp 7\r\n"
    assert [(m.sender, m.recipients, m.requiretls) for m in begun] == [
        ("a@sender.example", ("joe@example.org",), True)]
    # the tag is the transaction's: the next message without the parameter has none
    sent, begun = _transaction(s, b"MAIL FROM:<a@sender.example>")
    assert [m.requiretls for m in begun] == [False]


def test_rset_and_a_new_mail_forget_the_tag() -> None:
    s, _ = _session(tls=True, smtps=True)
    s.feed(b"EHLO c.example\r\nMAIL FROM:<a@b.example> REQUIRETLS\r\nRSET\r\n")
    _sent_, begun = _transaction(s, b"MAIL FROM:<a@b.example>")
    assert [m.requiretls for m in begun] == [False]
    s.feed(b"MAIL FROM:<a@b.example> REQUIRETLS\r\n")
    _sent_, begun = _transaction(s, b"MAIL FROM:<c@b.example>")  # a second MAIL: new transaction
    assert [(m.sender, m.requiretls) for m in begun] == [("c@b.example", False)]


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("param", [b"REQUIRETLS=YES", b"requiretls=", b"REQUIRETLS=1"])
def test_a_value_is_a_syntax_error(tls: bool, param: bytes) -> None:
    s, _ = _session(tls=True, smtps=tls)
    s.feed(b"EHLO client.example\r\n")
    sent, begun = _transaction(s, b"MAIL FROM:<a@sender.example> " + param)
    assert sent.startswith(b"501 syntax error, REQUIRETLS takes no value (#5.5.4)\r\n")
    assert begun == []


def test_other_unknown_parameters_are_still_ignored() -> None:
    """qmail-smtpd ignores what it does not know; so does eqmail, REQUIRETLS aside."""
    s, _ = _session()
    sent, begun = _transaction(s, b"MAIL FROM:<a@sender.example> BODY=8BITMIME REQUIRETLSX FOO=1")
    assert sent.startswith(b"250 ok\r\n")
    assert [m.requiretls for m in begun] == [False]


_REPLY = re.compile(rb"^\d{3}[ -][^\r\n]*\r\n$")


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.binary(max_size=80),
       st.lists(st.sampled_from([b"REQUIRETLS", b"requiretls=", b"REQUIRETLS=x", b"SIZE=9",
                                 b"AUTH=<>", b"=", b" ", b"\t", b"REQUIRETLS\0"]), max_size=4))
def test_random_mail_parameters_never_break_the_session(tls: bool, noise: bytes,
                                                        params: list[bytes]) -> None:
    s, _ = _session(tls=True, smtps=tls)
    s.feed(b"EHLO client.example\r\n")
    tail = b" ".join(params) + b" " + noise.replace(b"\n", b"")
    actions = s.feed(b"MAIL FROM:<a@b.example> " + tail + b"\r\nRCPT TO:<joe@example.org>\r\n"
                     b"DATA\r\n")
    sent = _sent(actions)
    lines = sent.split(b"\r\n")[:-1]
    assert lines and all(_REPLY.match(ln + b"\r\n") for ln in lines)
    first = lines[0][:3]
    assert first in (b"250", b"501", b"530", b"555")
    if first == b"530":
        assert not tls
    for m in (x for x in actions if isinstance(x, a.BeginMessage)):
        assert m.requiretls == (tls and first == b"250" and b"REQUIRETLS" in
                                [t.upper() for t in tail.split(b" ")])
    assert not s.closed


# ---- the envelope and the queue files ---------------------------------------------------

def test_envelope_carries_the_record_after_qmail_queues_bytes() -> None:
    env = QueueEnvelope("a@x.org", ("b@y.org",), None, True)
    data = env.encode()
    assert data == b"Fa@x.org\0Tb@y.org\0\0Xrequiretls=1\0"
    assert QueueEnvelope.decode(data) == env
    assert QueueEnvelope("a@x.org", ("b@y.org",)).encode() == b"Fa@x.org\0Tb@y.org\0\0"
    assert not QueueEnvelope.decode(b"Fa\0Tb\0\0").requiretls
    from eqmail.ipc.queue import Origin
    both = QueueEnvelope("a", ("b",), Origin.AUTH, True)
    assert both.encode() == b"Fa\0Tb\0\0Xorigin=auth\0Xrequiretls=1\0"
    assert QueueEnvelope.decode(both.encode()) == both


@pytest.mark.parametrize("tail", [b"Xrequiretls=0\0", b"Xrequiretls=\0", b"Xrequiretls\0",
                                  b"Xrequiretls=yes\0", b"Xrequiretls=1", b"XREQUIRETLS=1\0"])
def test_unknown_forms_are_ignored_never_refused(tail: bytes) -> None:
    env = QueueEnvelope.decode(b"Fa\0Tb\0\0" + tail)
    assert (env.sender, env.recipients, env.requiretls) == ("a", ("b",), False)
    assert not requiretls_of(parse_records(b"Fa\0" + tail))


def test_a_truncated_envelope_is_still_qmail_queues_read_error() -> None:
    from eqmail.ipc.queue import EnvelopeRefused
    with pytest.raises(EnvelopeRefused) as e:
        QueueEnvelope.decode(b"Fa\0Tb\0")
    assert e.value.code is QQExit.READ_ERROR


def test_todo_and_info_bytes() -> None:
    env = Envelope("a@x.org", ("b@y.org",), None, True)
    assert todo_bytes(7, 42, env) == b"u7\0p42\0Fa@x.org\0Tb@y.org\0Xrequiretls=1\0"
    assert info_bytes("a@x.org", None, True) == b"Fa@x.org\0Xrequiretls=1\0"
    # without REQUIRETLS the files are exactly what they were
    assert todo_bytes(7, 42, Envelope("a@x.org", ("b@y.org",))) == b"u7\0p42\0Fa@x.org\0Tb@y.org\0"
    assert info_bytes("a@x.org", None) == b"Fa@x.org\0"
    assert requiretls_of(parse_records(todo_bytes(7, 42, env)))


def test_scanner_gives_remote_delivery_the_option() -> None:
    from eqmail.ipc.queue import Origin
    rt = Delivery(1, Channel.REMOTE, 0, "s@x", "r@y", None, True)
    assert delivery_options(rt) == (("requiretls", "1"),)
    both = Delivery(1, Channel.REMOTE, 0, "s@x", "r@y", Origin.AUTH, True)
    assert delivery_options(both) == (("origin", "auth"), ("requiretls", "1"))
    # local delivery passes it on to what a .qmail forwards (RFC 8689 §4.1)
    assert delivery_options(Delivery(1, Channel.LOCAL, 0, "s@x", "r@y", Origin.AUTH, True)) == (
        ("requiretls", "1"),)
    assert delivery_options(Delivery(1, Channel.LOCAL, 0, "s@x", "r@y", Origin.AUTH)) == ()
    assert delivery_options(Delivery(1, Channel.REMOTE, 0, "s@x", "r@y")) == ()


def _preprocess(tmp_path: Path, env: Envelope) -> tuple[object, int, object]:
    from eqmail.queue.layout import QueuePaths, create_queue
    from eqmail.queue.preprocess import Preprocessor
    from eqmail.queue.recycle import InodePool
    from eqmail.queue.schedule import Channel as Ch
    from eqmail.queue.writer import QueueStore

    create_queue(tmp_path / "queue")
    store = QueueStore(tmp_path / "queue")
    msg = store.start(9, 0, b"Received: x\n")
    store.write(msg, b"From: a@x.org\n\nhi\n")
    msg.envelope = env
    store.commit([msg])
    paths = QueuePaths(tmp_path / "queue")
    todo = paths.todo(msg.msgid).read_bytes()
    root_fd = os.open(tmp_path / "queue", os.O_RDONLY)
    try:
        pre = Preprocessor(paths, lambda reqs: [store.clean(r) for r in reqs],
                           InodePool(paths.dir("spare-send")), root_fd,
                           lambda r: (Ch.REMOTE if "remote" in r else Ch.LOCAL, r),
                           lambda m, chans, now: None)
        assert pre.preprocess(msg.msgid)
    finally:
        os.close(root_fd)
        os.close(store.root_fd)
    return pre, msg.msgid, (paths, todo)


def test_writer_to_todo_to_info_to_delivery_options(tmp_path: Path) -> None:
    """The queue store writes the record after the T records; preprocessing copies it
    into info/ and remembers it for the first pass; the manager's deliveries carry it,
    and the scanner turns it into the remote worker's option."""
    from eqmail.control import load_controls
    from eqmail.ipc.queue import CleanAnswer, Origin
    from eqmail.queue.manager import QueueManager
    from eqmail.queue.schedule import Channel as Ch

    pre, msgid, (paths, todo) = _preprocess(
        tmp_path, Envelope("a@x.org", ("r@remote.example", "l@local"), Origin.AUTH, True))
    assert isinstance(todo, bytes)
    assert todo.endswith(b"Tr@remote.example\0Tl@local\0Xorigin=auth\0Xrequiretls=1\0")
    assert paths.info(msgid).read_bytes() == b"Fa@x.org\0Xorigin=auth\0Xrequiretls=1\0"
    assert paths.remote(msgid).read_bytes() == b"Tr@remote.example\0"
    fresh = pre.take_fresh(Ch.REMOTE, msgid)  # type: ignore[attr-defined]
    assert fresh is not None and fresh[3] is Origin.AUTH and fresh[4] is True
    # after a restart: read back from info/
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    mgr = QueueManager(load_controls(tmp_path), paths, lambda reqs: [CleanAnswer.DONE] * len(reqs),
                       lambda *_a: (True, "1"))
    mgr.recover()
    got = [(d.recipient, d.requiretls, delivery_options(d))
           for d in mgr.next_requests(Channel.REMOTE)]
    assert got == [("r@remote.example", True, (("origin", "auth"), ("requiretls", "1")))]
    local = [(d.recipient, delivery_options(d)) for d in mgr.next_requests(Channel.LOCAL)]
    assert local == [("l@local", (("requiretls", "1"),))]


def test_queue_show_names_it(tmp_path: Path) -> None:
    from eqmail.queue.inspect import show, show_json

    _pre, msgid, _ = _preprocess(tmp_path, Envelope("a@x.org", ("r@remote.example",), None, True))
    text = show(tmp_path, msgid)
    assert "\norigin: network\nrequiretls: yes\n\n" in text
    assert show_json(tmp_path, msgid)["requiretls"] is True


def test_queue_show_says_nothing_for_other_mail(tmp_path: Path) -> None:
    from eqmail.queue.inspect import show, show_json

    _pre, msgid, _ = _preprocess(tmp_path, Envelope("a@x.org", ("r@remote.example",)))
    assert "requiretls" not in show(tmp_path, msgid)
    assert show_json(tmp_path, msgid)["requiretls"] is False


def test_qmail_qread_still_reads_info(tmp_path: Path) -> None:
    """qmail-qread reads only info/'s first record; eqmail's qread listing (its port)
    shows the REQUIRETLS message like any other."""
    from eqmail.queue.inspect import qread

    _pre, msgid, _ = _preprocess(tmp_path, Envelope("a@x.org", ("r@remote.example",), None, True))
    listing = qread(tmp_path)
    assert f" #{msgid} " in listing and "<a@x.org>" in listing
    assert "\tremote\tr@remote.example\n" in listing and "requiretls" not in listing


# ---- the bounce -------------------------------------------------------------------------

MESSAGE = b"Received: x\nFrom: a@x.org\nSubject: secret plans\n\nthe body is secret\n\nmore\n"


def test_header_copy_stops_before_the_body() -> None:
    assert b"".join(header_copy(io.BytesIO(MESSAGE), 0)) == (
        b"Received: x\nFrom: a@x.org\nSubject: secret plans\n")
    assert b"".join(header_copy(io.BytesIO(b"no body at all\n"), 0)) == b"no body at all\n"
    assert b"".join(header_copy(io.BytesIO(b"\nbody only\n"), 0)) == b""


@given(st.lists(st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"") or b"h"),
                max_size=20),
       st.binary(max_size=200), st.integers(1, 64), st.sampled_from([0, 50, 1000]))
def test_header_copy_property(head_lines: list[bytes], body: bytes, chunk: int, limit: int) -> None:
    header = b"".join(ln + b"\n" for ln in head_lines)
    data = header + b"\n" + body
    got = b"".join(header_copy(io.BytesIO(data), limit, chunk))
    if limit == 0 or len(header) <= limit:
        assert got == header  # never a byte of the body
    else:
        assert header.startswith(got) or (got.endswith(b"\n") and header.startswith(got[:-1]))
        assert len(got) <= limit + 1 and got.endswith(b"\n")


def test_compose_bounce_says_the_body_is_left_out() -> None:
    head = compose_bounce(target=BounceTarget("", "a@x.org", False), original_sender="a@x.org",
                          notes=b"<r@y.example>:\nREQUIRETLS: no. (#5.7.10)\n\n",
                          bouncefrom="MAILER-DAEMON", bouncehost="mx.example.org", now=0.0,
                          header_only=True)
    assert head.endswith(
        b"<r@y.example>:\nREQUIRETLS: no. (#5.7.10)\n\n"
        b"--- Below this line is the header of the message, without its body:\n"
        b"--- it was sent with REQUIRETLS, whose bounces carry no content (RFC 8689).\n\n"
        b"Return-Path: <a@x.org>\n")


def test_manager_bounces_a_requiretls_message_header_only_as_requiretls(tmp_path: Path) -> None:
    from eqmail.control import load_controls
    from eqmail.ipc.queue import CleanAnswer
    from eqmail.queue.layout import create_queue
    from eqmail.queue.manager import QueueManager

    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    paths = create_queue(tmp_path / "queue")
    calls: list[tuple[object, ...]] = []

    def injector(*args: object) -> tuple[bool, str]:
        calls.append(args)
        return True, "1"

    m = QueueManager(load_controls(tmp_path), paths, lambda r: [CleanAnswer.DONE] * len(r), injector)
    for msgid, info in ((301, b"Fa@x.org\0Xrequiretls=1\0"), (302, b"Fa@x.org\0"),
                        (303, b"F\0Xrequiretls=1\0")):
        paths.mess(msgid).write_bytes(MESSAGE)
        paths.info(msgid).write_bytes(info)
        paths.bounce(msgid).write_bytes(b"<r@y.example>:\nnope (#5.7.10)\n\n")
        assert m.message_done(msgid)
    (rt_sender, rt_rcpts, rt_head, rt_id, _limit, rt_flag), plain, double = calls
    assert (rt_sender, rt_rcpts, rt_id, rt_flag) == ("", ["a@x.org"], 301, True)
    assert isinstance(rt_head, bytes) and b"without its body" in rt_head
    assert len(plain) == 5 and b"--- Below this line is a copy of the message.\n" in plain[2]
    # the double bounce of a REQUIRETLS message (null sender) keeps both rules
    assert double[0] == "#@[]" and double[5] is True and b"header of the original bounce" in double[2]


def test_requiretls_is_seen_without_angle_brackets_too() -> None:
    """qmail takes ``MAIL FROM:a@b`` without brackets and then reads no parameters; a
    REQUIRETLS demand there is still honoured, never dropped silently."""
    from eqmail.smtp.address import parse_mail_params

    assert parse_mail_params(b"FROM:a@b.example REQUIRETLS").requiretls
    assert parse_mail_params(b"FROM:a@b.example REQUIRETLS=1").requiretls_value
    assert not parse_mail_params(b"FROM:REQUIRETLS").requiretls  # that is the address
    assert parse_mail_params(b"FROM:a@b.example SIZE=5").size is None  # eQmail's rule stays
    s, _ = _session()
    sent, begun = _transaction(s, b"MAIL FROM:a@sender.example REQUIRETLS")
    assert sent.startswith(b"530 ")
    s, _ = _session(tls=True, smtps=True)
    sent, begun = _transaction(s, b"MAIL FROM:a@sender.example REQUIRETLS")
    assert sent.startswith(b"250 ok\r\n") and [m.requiretls for m in begun] == [True]


def test_the_local_child_job_carries_it() -> None:
    """The local worker tells its per-user child; the job of any other message keeps
    qmail-local's nine arguments exactly."""
    from eqmail.ipc.delivery import LocalChildJob
    from eqmail.ipc.framing import ProtocolError

    args = ("u", "/home/u", "u-fwd", "-", "fwd", "y.test", "s@x.test", "./Maildir/", "me")
    plain = LocalChildJob(*args)
    assert plain.encode() == b"".join(a.encode() + b"\0" for a in args)
    rt = LocalChildJob(*args, requiretls=True)
    assert rt.encode() == plain.encode() + b"R\0"
    assert LocalChildJob.decode(rt.encode()) == rt
    assert LocalChildJob.decode(plain.encode()) == plain
    for bad in (plain.encode() + b"X\0", plain.encode() + b"R\0R\0", plain.encode() + b"R"):
        with pytest.raises(ProtocolError):
            LocalChildJob.decode(bad)


def test_queue_show_before_preprocessing(tmp_path: Path) -> None:
    """queue show reads the record from todo/ too (after the T and Xorigin= records)."""
    from eqmail.queue.inspect import show, show_json
    from eqmail.queue.layout import create_queue

    q = create_queue(tmp_path / "queue")
    q.mess(30).write_bytes(b"Subject: s\n\nbody\n")
    q.todo(30).write_bytes(b"u1000\0p77\0Fs@x.org\0Ta@b.org\0Xorigin=auth\0Xrequiretls=1\0")
    assert show(tmp_path, 30).split("\n")[2:4] == ["origin: auth", "requiretls: yes"]
    assert show_json(tmp_path, 30)["requiretls"] is True
    q.todo(30).write_bytes(b"u1000\0p77\0Fs@x.org\0Ta@b.org\0Xrequiretls=1")  # still being written
    assert show_json(tmp_path, 30)["requiretls"] is False
