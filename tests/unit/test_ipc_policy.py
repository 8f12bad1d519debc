"""The messages of run/policy.sock (eqmail.ipc.policy): the request and the answer
round-trip, their bytes are written down, and bad bytes raise ProtocolError and
nothing else."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.policy import (
    ANSWER,
    MAX_DETAIL,
    MAX_FRAME,
    MAX_POLICY_TEXT,
    REQUEST,
    LookupAnswer,
    LookupRequest,
    PolicyText,
    read_frame,
    write_frame,
)

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=2, max_size=5).map(".".join)
policy_id = st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True)
policy = st.builds(PolicyText, policy_id, st.floats(0, 4e9), st.text(max_size=300))
answer = st.builds(LookupAnswer, st.none() | policy,
                   st.none() | st.sampled_from(["sts-policy-fetch-error", "sts-policy-invalid",
                                                "sts-webpki-invalid"]),
                   st.text(max_size=MAX_DETAIL))


def test_the_bytes_are_these() -> None:
    assert LookupRequest("example.test").encode() == b"example.test"
    p = PolicyText("20260101", 1700000000.5, "version: STSv1\nmode: enforce\n")
    assert LookupAnswer(p, None, "").encode() == (
        b'{"policy":{"id":"20260101","fetched":1700000000.5,'
        b'"text":"version: STSv1\\nmode: enforce\\n"},"failure":null,"detail":""}')
    assert LookupAnswer(None, "sts-policy-fetch-error", "timed out").encode() == (
        b'{"policy":null,"failure":"sts-policy-fetch-error","detail":"timed out"}')


@given(domain)
def test_request_round_trip(d: str) -> None:
    assert LookupRequest.decode(LookupRequest(d).encode()) == LookupRequest(d)


@given(answer)
def test_answer_round_trip(a: LookupAnswer) -> None:
    assert LookupAnswer.decode(a.encode()) == a


@pytest.mark.parametrize("bad", [b"", b"Example.test", b"a/b.test", b"-a.test", b"a.test.",
                                 b"x" * 254, b"\xff.test", b"a b.test"])
def test_a_bad_domain_is_refused(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        LookupRequest.decode(bad)


def test_the_largest_policy_fits_its_frame() -> None:
    a = LookupAnswer(PolicyText("x", 1.0, "\x01" * MAX_POLICY_TEXT), None, "d" * MAX_DETAIL)
    assert len(a.encode()) <= MAX_FRAME[ANSWER]
    with pytest.raises(ProtocolError):
        LookupAnswer(PolicyText("x", 1.0, "a" * (MAX_POLICY_TEXT + 1))).encode()
    with pytest.raises(ProtocolError):
        LookupAnswer(None, None, "d" * (MAX_DETAIL + 1)).encode()


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for decode in (LookupRequest.decode, LookupAnswer.decode):
        try:
            decode(data)
        except ProtocolError:
            pass


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=12)


@given(st.fixed_dictionaries({"policy": json_value | st.fixed_dictionaries(
    {"id": json_value, "fetched": json_value, "text": json_value}),
    "failure": json_value, "detail": json_value}) | json_value)
def test_any_json_decodes_or_raises_protocol_error(obj: object) -> None:
    try:
        got = LookupAnswer.decode(json.dumps(obj).encode())
    except ProtocolError:
        return
    assert LookupAnswer.decode(got.encode()) == got


@pytest.mark.parametrize("fetched", ["1", True, -1, float("inf"), float("nan"), None])
def test_bad_fetch_times_are_protocol_errors(fetched: object) -> None:
    obj = {"policy": {"id": "a", "fetched": fetched, "text": ""}, "failure": None, "detail": ""}
    with pytest.raises(ProtocolError):
        LookupAnswer.decode(json.dumps(obj).encode())


def test_frames_on_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        write_frame(a, REQUEST, b"example.test")
        assert read_frame(b, REQUEST) == b"example.test"
        write_frame(a, ANSWER, b"{}")
        with pytest.raises(ProtocolError, match="unexpected frame"):
            read_frame(b, REQUEST)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"t\xff\xff\xff\xff")
        with pytest.raises(ProtocolError, match="too long"):
            read_frame(b, ANSWER)
        a.close()
        with pytest.raises(ProtocolError):
            read_frame(b, ANSWER)
