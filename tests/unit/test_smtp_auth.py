"""The AUTH exchange (eqmail.smtp.auth) and the checkpassword frames that carry the
failure table's fields (eqmail.ipc.sandbox): strict base64, NUL inside a field, the
CRAM-MD5 challenge, the session's failure cap."""

from __future__ import annotations

import base64
import re

import pytest

from eqmail.authlimit import AuthLimit
from eqmail.ipc import ProtocolError
from eqmail.ipc.sandbox import CheckAnswer, CheckRequest, CheckResult
from eqmail.smtp import actions as A
from eqmail.smtp import replies
from eqmail.smtp.auth import AuthExchange, Credentials, Failed, Prompt, b64decode, cram_challenge
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import MAX_AUTH_FAILURES, Session, SessionConfig


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize("data, expect", [
    (b"YWxpY2U=", b"alice"), (b"YWxpY2Ux", b"alice1"), (b"YWxpY2UxMg==", b"alice12"),
    (b"=", b""), (b"", b""),
])
def test_b64decode_canonical(data: bytes, expect: bytes) -> None:
    assert b64decode(data) == expect


@pytest.mark.parametrize("data", [
    b"YWxpY2U", b"YWxpY2U==", b"YWxp Y2U=", b"YWxpY2U=YWxp", b"YWxp\tY2U=", b"YWxp!2U=",
    b"YWxpY2U-", b"YW=pY2U=", b"==", b"Y===", "YWxpY2Ué".encode(), b"YWxpY2U=\0",
])
def test_b64decode_refuses_junk_and_bad_padding(data: bytes) -> None:
    assert b64decode(data) is None


def finish(method: str, *lines: bytes, initial: bytes = b"") -> object:
    exchange = AuthExchange(method, b"<1.2@mx>" if method == "cram-md5" else b"")
    step = exchange.start(initial)
    for line in lines:
        assert isinstance(step, Prompt), step
        step = exchange.line(line)
    return step


MALFORMED = Failed(replies.AUTH_MALFORMED)


def test_plain_needs_exactly_three_fields_without_nul_inside() -> None:
    assert finish("plain", initial=b64(b"\0alice\0pw")) == Credentials("plain", b"alice", b"pw", b"")
    assert finish("plain", initial=b64(b"admin\0alice\0pw")) == Credentials(
        "plain", b"alice", b"pw", b"")
    for bad in (b"alice\0pw", b"\0alice\0pw\0", b"\0alice\0pw\0x", b"\0\0pw", b"\0alice\0"):
        assert finish("plain", initial=b64(bad)) == MALFORMED, bad
        assert finish("plain", b64(bad)) == MALFORMED, bad
    assert finish("plain", initial=b64(b"\0alice\0pw") + b"!") == MALFORMED


def test_login_refuses_nul_and_junk() -> None:
    assert finish("login", b64(b"alice"), b64(b"pw")) == Credentials("login", b"alice", b"pw", b"")
    assert finish("login", b64(b"ali\0ce")) == MALFORMED
    assert finish("login", b64(b"alice"), b64(b"p\0w")) == MALFORMED
    assert finish("login", b64(b"alice"), b64(b"pw\0")) == MALFORMED
    assert finish("login", b"YWxp*2U=") == MALFORMED
    assert finish("login", initial=b64(b"al\0ice")) == MALFORMED


def test_cram_refuses_nul_and_junk() -> None:
    ok = finish("cram-md5", b64(b"alice 0123abcd"))
    assert ok == Credentials("cram-md5", b"alice", b"0123abcd", b"<1.2@mx>")
    assert finish("cram-md5", b64(b"al\0ice 0123abcd")) == MALFORMED
    assert finish("cram-md5", b64(b"alice 0123\0abcd")) == MALFORMED
    assert finish("cram-md5", b64(b"alice 0123abcd")[:-1]) == MALFORMED


def test_challenges_are_random_in_qmails_shape() -> None:
    seen = {cram_challenge("mx.example") for _ in range(1000)}
    assert len(seen) == 1000
    assert all(re.fullmatch(rb"<\d+\.\d+@mx\.example>", c) for c in seen)
    assert cram_challenge("mx", lambda bits: bits) == b"<63.63@mx>"


def test_the_sessions_last_failure_is_a_421_and_close() -> None:
    cfg = SessionConfig(greeting="mx", local_host="mx", databytes=0,
                        rcpthosts=RcptHosts.from_lines(["mx"]), auth_available=True)
    session = Session(cfg, {"TCPREMOTEIP": "192.0.2.1"}, lambda: 0.0)
    session.start()
    sent = b""
    for n in range(MAX_AUTH_FAILURES):
        actions = session.feed(b"AUTH PLAIN " + b64(b"\0alice\0guess") + b"\r\n")
        assert any(isinstance(a, A.CheckPassword) for a in actions)
        actions = session.auth_result(False)
        sent = b"".join(a.data for a in actions if isinstance(a, A.Send))
        if n < MAX_AUTH_FAILURES - 1:
            assert sent == replies.AUTH_FAILED.wire()
            assert not session.closed
    assert sent == replies.AUTH_TOO_MANY.wire()
    assert session.closed and any(isinstance(a, A.Close) for a in actions)
    # temporary failures (the checker crashed, the address is locked) do not count
    session = Session(cfg, {"TCPREMOTEIP": "192.0.2.1"}, lambda: 0.0)
    session.start()
    for _ in range(MAX_AUTH_FAILURES + 2):
        session.feed(b"AUTH PLAIN " + b64(b"\0alice\0guess") + b"\r\n")
        session.auth_result(False, replies.AUTH_CHILD_CRASHED.text)
    assert not session.closed


def test_check_frames_carry_the_table_fields() -> None:
    req = CheckRequest(("/bin/false",), {"A": "b"}, b"u\0p\0\0", 5.0, "192.0.2.1",
                       AuthLimit(3, 60.0, 0.5))
    assert CheckRequest.decode(req.encode()) == req
    plain = CheckRequest(("/bin/false",), {}, b"u\0p\0\0", 5.0)
    assert CheckRequest.decode(plain.encode()) == plain
    answer = CheckAnswer(CheckResult.FAILED, 1, 1.5, True)
    assert CheckAnswer.decode(answer.encode()) == answer
    assert CheckAnswer.decode(CheckAnswer(CheckResult.LOCKED).encode()).result is CheckResult.LOCKED
    good = req.encode().decode()
    for bad in (good.replace('"192.0.2.1"', '"' + "1" * 65 + '"'),
                good.replace("[3, 60.0, 0.5]", "[3, 60.0]"),
                good.replace("[3, 60.0, 0.5]", "[-1, 60.0, 0.5]"),
                good.replace("[3, 60.0, 0.5]", "[3, 1e9, 0.5]"),
                good.replace("[3, 60.0, 0.5]", "[true, 60.0, 0.5]"),
                good.replace("[3, 60.0, 0.5]", '[3, "60", 0.5]')):
        with pytest.raises(ProtocolError):
            CheckRequest.decode(bad.encode())
    for bad_answer in (b'{"result": "failed", "status": 1, "delay": -1, "locked": false}',
                       b'{"result": "failed", "status": 1, "delay": 1, "locked": 1}',
                       b'{"result": "failed", "status": 1, "delay": NaN, "locked": false}'):
        with pytest.raises(ProtocolError):
            CheckAnswer.decode(bad_answer)
