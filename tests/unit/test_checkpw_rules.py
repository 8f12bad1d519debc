"""eqmail.smtp.checkpw: the checkpassword request and what each sandbox answer means
for the session (the I/O around them is eqmail.spp.checkpwclient, tested live in
tests/integration/test_sandbox_jobs.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.authlimit import LOCKED_TEXT
from eqmail.ipc.sandbox import CheckAnswer, CheckRequest, CheckResult
from eqmail.smtp import replies
from eqmail.smtp.checkpw import (
    DEFAULT_PATH,
    MAX_INPUT,
    NO_CHILD,
    AuthCheck,
    check_request,
    check_result,
    check_warning,
)

ARGV = ("/bin/checkpassword", "/bin/true")


def test_request_carries_the_fd3_bytes_and_a_path() -> None:
    req = check_request(ARGV, {"TCPREMOTEIP": "192.0.2.1"}, b"alice", b"pw", b"<c@x>", 7,
                        "192.0.2.1")
    assert isinstance(req, CheckRequest)
    assert req.argv == ARGV and req.input == b"alice\0pw\0<c@x>\0" and req.timeout == 7.0
    assert req.env == {"TCPREMOTEIP": "192.0.2.1", "PATH": DEFAULT_PATH}
    assert req.client == "192.0.2.1" and req.limit is None
    kept = check_request(ARGV, {"PATH": "/opt/bin"}, b"a", b"b", b"", 1)
    assert isinstance(kept, CheckRequest) and kept.env["PATH"] == "/opt/bin"


def test_nothing_to_run_and_oversized_input_are_answered_without_the_sandbox() -> None:
    assert check_request((), {}, b"a", b"b", b"", 1) == NO_CHILD
    assert NO_CHILD == AuthCheck(False, replies.AUTH_NO_CHILD.text)
    big = b"x" * MAX_INPUT
    assert check_request(ARGV, {}, big, b"", b"", 1) == AuthCheck(False)


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64))
def test_request_round_trips_through_the_wire(user: bytes, pw: bytes, chal: bytes) -> None:
    req = check_request(ARGV, {"A": "b"}, user, pw, chal, 3.5, "::1")
    assert isinstance(req, CheckRequest)
    assert CheckRequest.decode(req.encode()) == req


@pytest.mark.parametrize("answer, check, warning", [
    (CheckAnswer(CheckResult.OK), AuthCheck(True), None),
    (CheckAnswer(CheckResult.FAILED, 1, 2.5, True), AuthCheck(False, None, 2.5, True), None),
    (CheckAnswer(CheckResult.LOCKED), AuthCheck(False, LOCKED_TEXT, refused=True), None),
    (CheckAnswer(CheckResult.CRASHED, -9), AuthCheck(False, replies.AUTH_CHILD_CRASHED.text),
     "warning: checkpassword /bin/checkpassword: crashed (-9)"),
    (CheckAnswer(CheckResult.TIMEOUT, -9), AuthCheck(False, replies.AUTH_CHILD_CRASHED.text),
     "warning: checkpassword /bin/checkpassword: timed out after 7s"),
    (CheckAnswer(CheckResult.NO_CHILD), AuthCheck(False, replies.AUTH_NO_CHILD.text),
     "warning: checkpassword /bin/checkpassword: no child (0)"),
    (CheckAnswer(CheckResult.NO_PIPE), AuthCheck(False, replies.AUTH_NO_PIPE.text),
     "warning: checkpassword /bin/checkpassword: no pipe (0)"),
])
def test_every_answer_maps_to_one_check(answer: CheckAnswer, check: AuthCheck,
                                        warning: str | None) -> None:
    assert check_result(answer) == check
    assert check_warning(answer, ARGV, 7) == warning
