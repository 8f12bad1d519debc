"""The messages of run/scanner.sock (eqmail.ipc.admin): requests and answers round-trip,
the bytes are the lines eqmailctl and the scanner exchanged before they were typed, and
bad bytes raise ProtocolError and nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.admin import (
    AdminAction,
    AdminRefusal,
    AdminRequest,
    DeadDestination,
    Delivery,
    QueueActivity,
    Removed,
    decode_answer,
    encode_answer,
)
from eqmail.ipc.framing import ProtocolError

msgid = st.integers(0, (1 << 64) - 1)
count = st.integers(0, 1 << 31)
requests = st.one_of(
    st.just(AdminRequest(AdminAction.STATUS)),
    st.builds(AdminRequest, st.sampled_from([AdminAction.DELETE, AdminAction.BOUNCE]), msgid))
deliveries = st.builds(Delivery, msgid, st.sampled_from(["local", "remote"]), count, count)
times = st.floats(0, 1e10, allow_nan=False)
dead = st.builds(DeadDestination, st.text(min_size=1, max_size=255), times, times,
                 st.booleans(), count)
activity = st.builds(
    QueueActivity, st.lists(deliveries, max_size=5).map(tuple),
    st.tuples(count, count, count, count).map(
        lambda c: tuple(zip(("local_pending", "remote_pending", "local_active", "remote_active"),
                            c, strict=True))),
    st.lists(dead, max_size=3).map(tuple))
answers = st.one_of(activity, st.builds(Removed, count),
                    st.builds(AdminRefusal, st.text(max_size=100)))


@given(requests)
def test_a_request_round_trips(request: AdminRequest) -> None:
    assert AdminRequest.decode(request.encode()) == request


@given(answers)
def test_an_answer_round_trips(answer: QueueActivity | Removed | AdminRefusal) -> None:
    assert decode_answer(encode_answer(answer)) == answer


def test_the_bytes_are_those_of_before() -> None:
    assert AdminRequest(AdminAction.STATUS).encode() == b"status\n"
    assert AdminRequest(AdminAction.BOUNCE, 4711).encode() == b"bounce 4711\n"
    assert json.loads(encode_answer(Removed(3))) == {"ok": True, "removed": 3}
    assert json.loads(encode_answer(AdminRefusal("no message 9 in the queue"))) == {
        "ok": False, "error": "no message 9 in the queue"}
    act = QueueActivity((Delivery(12, "remote", 2, 1),),
                        (("local_pending", 0), ("remote_pending", 1), ("local_active", 0),
                         ("remote_active", 2)))
    assert json.loads(encode_answer(act)) == {
        "deliveries": [{"msgid": 12, "channel": "remote", "running": 2, "waiting": 1}],
        "counts": {"local_pending": 0, "remote_pending": 1, "local_active": 0, "remote_active": 2}}


def test_dead_destinations_are_listed_and_checked() -> None:
    counts = (("local_pending", 0), ("remote_pending", 5), ("local_active", 0),
              ("remote_active", 0))
    act = QueueActivity((), counts, (DeadDestination("dead.test", 10.0, 310.0, False, 5),))
    obj = json.loads(encode_answer(act))
    assert obj["dead"] == [{"domain": "dead.test", "since": 10.0, "until": 310.0,
                            "probing": False, "held": 5}]
    assert decode_answer(encode_answer(act)) == act
    for bad in ({"domain": "", "since": 1, "until": 2, "probing": False, "held": 0},
                {"domain": "x", "since": True, "until": 2, "probing": False, "held": 0},
                {"domain": "x", "since": 1, "until": 2, "probing": 1, "held": 0}, "x"):
        obj["dead"] = [bad]
        with pytest.raises(ProtocolError):
            decode_answer(json.dumps(obj).encode())


@pytest.mark.parametrize("line", [b"", b"stat\n", b"status 1\n", b"delete\n", b"delete x\n",
                                  b"bounce -1\n", b"delete 1 2\n", b"delete \xd9\xa3\n",
                                  b"delete " + b"9" * 30 + b"\n", b"x" * 300])
def test_bad_requests_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        AdminRequest.decode(line)


def test_a_request_needs_an_id_exactly_for_delete_and_bounce() -> None:
    with pytest.raises(ProtocolError):
        AdminRequest(AdminAction.DELETE)
    with pytest.raises(ProtocolError):
        AdminRequest(AdminAction.STATUS, 5)


@given(st.binary(max_size=300))
def test_random_request_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        AdminRequest.decode(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_random_answers_raise_only_protocol_error(data: bytes) -> None:
    try:
        decode_answer(data)
    except ProtocolError:
        pass


def test_a_deeply_nested_answer_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_answer(b"[" * 100000 + b"]" * 100000)
