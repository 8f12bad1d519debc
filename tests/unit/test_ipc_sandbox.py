"""The plugin sandbox's messages (eqmail.ipc.sandbox): every request and answer
round-trips through encode -> decode, and any bytes decode or raise ProtocolError —
never anything else, whatever the peer process has become.  (An outcome from any
plugin output round-trips too: tests/unit/test_spp_protocol.py.)"""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.authlimit import AuthLimit
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.sandbox import (
    BFRMT,
    MAX_REPORT,
    BfrmtAnswer,
    BfrmtRequest,
    CheckAnswer,
    CheckRequest,
    CheckResult,
    Request,
    decode_outcome,
    encode_outcome,
    recv_frame_fds,
    send_frame_fds,
)
from eqmail.smtp.actions import HookOutcome, HookStage, HookVerdict
from eqmail.textio import decode

text = st.binary(max_size=40).filter(lambda b: b"\0" not in b).map(decode)
name = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=12)
env = st.dictionaries(name, text, max_size=5)
seconds = st.floats(0.001, 86400.0)


@given(st.sampled_from(HookStage), st.lists(text.filter(bool), max_size=5), env)
def test_request_round_trip(stage: HookStage, plugins: list[str], env_: dict[str, str]) -> None:
    r = Request(stage, tuple(plugins), env_)
    assert Request.decode(r.encode()) == r


header = st.tuples(st.text(alphabet="abcXYZ-", min_size=1, max_size=10),
                   st.text(alphabet="abc \t=;", max_size=30)).map(lambda t: f"{t[0]}: {t[1]}")


@given(st.lists(st.tuples(name, st.none() | text), max_size=4), st.lists(header, max_size=3),
       st.lists(st.sampled_from(HookStage), max_size=3, unique=True), st.booleans(),
       st.none() | text)
def test_outcome_round_trip(env_: list[tuple[str, str | None]], headers: list[str],
                            later: list[HookStage], disable: bool, address: str | None) -> None:
    o = HookOutcome(HookVerdict.NORMAL, b"", tuple(env_), tuple(headers),
                    tuple((s, b"550 not now (#5.7.1)\r\n") for s in later), disable, address)
    assert decode_outcome(encode_outcome(o)) == o
    rejected = HookOutcome(HookVerdict.REJECT, b"554 go away\r\n")
    assert decode_outcome(encode_outcome(rejected)) == rejected


@given(st.lists(text.filter(bool), min_size=1, max_size=5), env, st.binary(max_size=200), seconds,
       st.text(alphabet="0123456789.:abcdef", max_size=40),
       st.none() | st.builds(AuthLimit, st.integers(0, 1000), seconds, seconds))
def test_checkpassword_request_round_trip(argv: list[str], env_: dict[str, str], data: bytes,
                                          timeout: float, client: str, limit: AuthLimit | None) -> None:
    r = CheckRequest(tuple(argv), env_, data, timeout, client, limit)
    assert CheckRequest.decode(r.encode()) == r


@given(st.sampled_from(CheckResult), st.integers(-64, 255), st.floats(0, 86400.0), st.booleans())
def test_checkpassword_answer_round_trip(result: CheckResult, status: int, delay: float,
                                         locked: bool) -> None:
    a = CheckAnswer(result, status, delay, locked)
    assert CheckAnswer.decode(a.encode()) == a


@given(st.lists(text.filter(bool), min_size=1, max_size=5), st.tuples(text, text, text), seconds)
def test_before_remote_request_round_trip(commands: list[str], args: tuple[str, str, str],
                                          timeout: float) -> None:
    r = BfrmtRequest(tuple(commands), args, timeout)
    assert BfrmtRequest.decode(r.encode()) == r


report_text = st.lists(text.map(lambda t: t.replace("\n", " ") + "\n"), min_size=1,
                      max_size=3).map("".join)
bfrmt_failure = st.builds(Outcome, st.sampled_from([Verdict.DEFERRAL, Verdict.FAILURE]), report_text)


@given(st.none() | bfrmt_failure)
def test_before_remote_answer_round_trip(failure: Outcome | None) -> None:
    a = BfrmtAnswer(failure)
    assert BfrmtAnswer.decode(a.encode()) == a


@given(bfrmt_failure)
def test_before_remote_answer_is_a_verdict_and_a_text(failure: Outcome) -> None:
    assert json.loads(BfrmtAnswer(failure).encode()) == {"verdict": failure.verdict.value,
                                                         "text": failure.text}
    assert json.loads(BfrmtAnswer(None).encode()) == {"verdict": "success", "text": ""}


@pytest.mark.parametrize("obj", [
    {"verdict": "success", "text": "x\n"},            # success carries the fd, no text
    {"verdict": "deferral", "text": ""},               # a failure says why
    {"verdict": "failure", "text": "no newline"},
    {"verdict": "deferral", "text": "nul\0\n"},
    {"verdict": "deferral", "text": "x" * MAX_REPORT + "\n"},
    {"verdict": "K", "text": "x\n"},                  # a letter is no verdict
    {"verdict": "Zdeferral", "text": "x\n"},
    {"verdict": None, "text": ""},
    {"verdict": "deferral", "text": ["x\n"]},
    {"verdict": "deferral"},
    {"text": "x\n"},
    {"verdict": "deferral", "text": "x\n", "report": "Zx\n"},  # nothing else
    {"report": ""},                                    # the older shape
    {"report": "Zbefore-remote hook failed\n"},
    ["deferral", "x\n"],
])
def test_before_remote_answer_decode_is_strict(obj: object) -> None:
    with pytest.raises(ProtocolError):
        BfrmtAnswer.decode(json.dumps(obj).encode())


@pytest.mark.parametrize("failure", [
    Outcome(Verdict.SUCCESS, ""), Outcome(Verdict.DEFERRAL, ""), Outcome(Verdict.FAILURE, "x"),
    Outcome(Verdict.DEFERRAL, "x" * MAX_REPORT + "\n"), Outcome(Verdict.DEFERRAL, "\0\n")])
def test_before_remote_answer_encode_checks_the_outcome(failure: Outcome) -> None:
    with pytest.raises(ProtocolError):
        BfrmtAnswer(failure).encode()


def test_an_over_long_message_is_not_encoded() -> None:
    with pytest.raises(ProtocolError):
        BfrmtRequest(("x" * (256 << 10),), ("h", "s", "r"), 1.0).encode()


_DECODERS = [Request.decode, decode_outcome, CheckRequest.decode, CheckAnswer.decode,
             BfrmtRequest.decode, BfrmtAnswer.decode]


@given(st.sampled_from(_DECODERS), st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(decoder: object, data: bytes) -> None:
    try:
        decoder(data)  # type: ignore[operator]
    except ProtocolError:
        return


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
keys = st.sampled_from(["stage", "plugins", "env", "verdict", "output", "headers", "later",
                        "disable", "address", "argv", "input", "timeout", "client", "limit",
                        "result", "status", "delay", "locked", "commands", "args", "report",
                        "text"])


@given(st.sampled_from(_DECODERS), st.dictionaries(keys, json_value, max_size=8) | json_value)
def test_any_json_decodes_or_raises_protocol_error(decoder: object, obj: object) -> None:
    try:
        decoder(json.dumps(obj).encode())  # type: ignore[operator]
    except ProtocolError:
        return


@pytest.mark.parametrize("number", [10**400, float("inf"), float("nan"), -1, True, "1"])
def test_numbers_out_of_range_are_protocol_errors(number: object) -> None:
    fields = {"argv": ["a"], "env": {}, "input": "", "result": "ok", "status": 0,
              "commands": ["a"], "args": ["a", "b", "c"]}
    for decoder, key in ((CheckRequest.decode, "timeout"), (CheckAnswer.decode, "delay"),
                         (BfrmtRequest.decode, "timeout")):
        with pytest.raises(ProtocolError):
            decoder(json.dumps(fields | {key: number}).encode())
    with pytest.raises(ProtocolError):
        CheckRequest.decode(json.dumps(fields | {"timeout": 1, "limit": [1, number, 1]}).encode())


def test_frames_with_fds() -> None:
    a, b = socket.socketpair()
    r, w = socket.socketpair()
    with a, b, r, w:
        send_frame_fds(a, BFRMT, b"{}", [r.fileno()])
        got = recv_frame_fds(b, BFRMT, 1)
        assert got is not None and got[0] == b"{}" and len(got[1]) == 1
        with socket.socket(fileno=got[1][0]) as dup:
            w.sendall(b"x")
            assert dup.recv(1) == b"x"
        a.close()
        assert recv_frame_fds(b, BFRMT, 1) is None
