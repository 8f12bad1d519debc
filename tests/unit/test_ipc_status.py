"""The messages of run/status.sock (eqmail.ipc.status): the request line and the
supervisor's JSON report round-trip; bad bytes raise ProtocolError and nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.status import MAX_STATUS_ANSWER, StatusAnswer, StatusRequest

small = st.integers(0, 1 << 31)
word = st.text(max_size=20)
worker = st.fixed_dictionaries({"kind": word, "name": word, "pid": small, "uid": small, "gid": small,
                                "state": word, "restarts": small, "generation": small, "title": word})
listener = st.fixed_dictionaries({"service": word, "address": word, "port": small,
                                  "concurrency": small, "sessions": small})
reload_ = st.none() | st.fixed_dictionaries({"seq": small, "ok": st.booleans(), "complete": st.booleans(),
                                             "time": st.floats(0, 2e9), "errors": st.lists(word)})
report = st.fixed_dictionaries(
    {"running": st.booleans(), "pid": small, "generation": small, "workers": st.lists(worker, max_size=4),
     "listeners": st.lists(listener, max_size=3),
     "queue": st.fixed_dictionaries({"messages": small, "todo": small},
                                    optional={"local": small, "remote": small, "bouncing": small})},
    optional={"uptime": st.floats(0, 1e9), "last_reload": reload_, "stopping": st.booleans(),
              "log": st.fixed_dictionaries({"sink": word, "format": word, "path": st.none() | word,
                                            "reopens": small, "error": st.none() | word})})


def test_the_design_cards_minimum_is_an_answer() -> None:
    assert StatusAnswer.decode(StatusAnswer(GOOD).encode()).as_dict() == GOOD


def test_the_request_line() -> None:
    assert StatusRequest().encode() == b"status\n"
    assert StatusRequest.decode(b"status\n") == StatusRequest() == StatusRequest.decode(b"status")
    for bad in (b"", b"stat", b"status\nmore", b"STATUS\n"):
        with pytest.raises(ProtocolError):
            StatusRequest.decode(bad)


@given(report)
def test_answer_round_trip(rep: dict[str, Any]) -> None:
    data = StatusAnswer(rep).encode()
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert data == json.dumps(rep).encode() + b"\n"  # the line eqmailctl --json always got
    back = StatusAnswer.decode(data)
    assert back.as_dict() == json.loads(json.dumps(rep)) and back.running == rep["running"]


GOOD: dict[str, Any] = {"running": True, "pid": 1, "generation": 0, "queue": {"messages": 0, "todo": 0},
                        "workers": [{"kind": "scanner", "pid": 9, "uid": 0, "state": "up", "title": "t"}],
                        "listeners": [{"service": "smtp", "address": "::1", "port": 25}]}


@pytest.mark.parametrize("rep", [
    [], {"running": True}, GOOD | {"running": 1}, GOOD | {"pid": True}, GOOD | {"workers": [1]},
    GOOD | {"queue": {"messages": 0, "todo": 0, "x": "1"}}, GOOD | {"queue": {"todo": 0}},
    GOOD | {"stopping": "no"}, GOOD | {"workers": [{"kind": "scanner", "pid": 9, "uid": 0, "state": "up"}]},
    GOOD | {"listeners": [{"service": "smtp", "address": "::1", "port": None}]}])
def test_answers_without_their_fields_are_refused(rep: Any) -> None:
    with pytest.raises(ProtocolError):
        StatusAnswer.decode(json.dumps(rep).encode())
    if isinstance(rep, dict):
        with pytest.raises(ProtocolError):
            StatusAnswer(rep).encode()


def test_an_over_long_answer_is_refused() -> None:
    with pytest.raises(ProtocolError):
        StatusAnswer.decode(b" " * (MAX_STATUS_ANSWER + 1))
    with pytest.raises(ProtocolError):
        StatusAnswer.decode(b"[" * 100_000 + b"]" * 100_000)  # too deep for the parser


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for decoder in (StatusRequest.decode, StatusAnswer.decode):
        try:
            decoder(data)
        except ProtocolError:
            continue
