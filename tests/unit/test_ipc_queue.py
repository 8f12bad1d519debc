"""The messages of run/queue.sock (eqmail.ipc.queue): every one round-trips through
encode -> decode, decoding any bytes raises nothing but ProtocolError, and the exit
codes keep qmail_close()'s texts (qmail-core §1.2) — what eqmail-inject, sendmail and
the SMTP listener tell people."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import MAX_FRAME, ProtocolError
from eqmail.ipc.queue import (
    ANSWER,
    BODY,
    CLEAN,
    CLEAN_ANSWER,
    ENVELOPE,
    HELLO,
    TODO_SPLIT,
    BodyChunk,
    CleanAnswer,
    CleanKind,
    CleanRequest,
    EnvelopeRefused,
    QQExit,
    QueueAnswer,
    QueueEnvelope,
    QueueHello,
    QueueRole,
)
from eqmail.queue.layout import SPLIT
from eqmail.textio import decode

# qmail.c's qmail_close() texts, letter included, for every code qmail-queue has
QMAIL_CLOSE = {
    0: "",
    11: "Denvelope address too long for qq (#5.1.3)",
    31: "Dmail server permanently rejected message (#5.3.0)",
    51: "Zqq out of memory (#4.3.0)",
    52: "Zqq timeout (#4.3.0)",
    53: "Zqq write error or disk full (#4.3.0)",
    54: "Zqq read error (#4.3.0)",
    55: "Zqq unable to read configuration (#4.3.0)",
    56: "Zqq trouble making network connection (#4.3.0)",
    61: "Zqq trouble in home directory (#4.3.0)",
    62: "Zqq trouble creating files in queue (#4.3.0)",
    63: "Zqq trouble creating files in queue (#4.3.0)",
    64: "Zqq trouble creating files in queue (#4.3.0)",
    65: "Zqq trouble creating files in queue (#4.3.0)",
    66: "Zqq trouble creating files in queue (#4.3.0)",
    71: "Zmail server temporarily rejected message (#4.3.0)",
    72: "Zconnection to mail server timed out (#4.4.1)",
    73: "Zconnection to mail server rejected (#4.4.1)",
    74: "Zcommunication with mail server failed (#4.4.2)",
    81: "Zqq internal bug (#4.3.0)",
    91: "Zqq internal bug (#4.3.0)",
    120: "Zunable to exec qq (#4.3.0)",
}

addr = st.binary(max_size=80).filter(lambda b: b"\0" not in b).map(decode)
number = st.integers(0, (1 << 63) - 1)


def test_every_exit_code_has_qmail_close_text_and_permanence() -> None:
    assert {int(c) for c in QQExit} == set(QMAIL_CLOSE)
    for code in QQExit:
        text = QMAIL_CLOSE[code]
        assert code.text == text[1:]
        assert code.permanent == text.startswith("D")


def test_the_todo_split_is_the_queues() -> None:
    assert TODO_SPLIT == SPLIT


def test_the_wire_bytes_stay_as_they_were() -> None:
    assert QueueAnswer(QQExit.OK, 17, 4242).encode() == b"0 17 4242"
    assert QueueAnswer(QQExit.WRITE_ERROR, 17, 0).frame() == b"R\0\0\0\x0753 17 0"
    assert CleanRequest.foop(4242).encode() == b"foop/4242"
    assert CleanRequest.todo(77).encode() == b"todo/8/77"
    assert [a.encode() for a in CleanAnswer] == [b"+", b"!", b"x"]
    assert QueueHello(QueueRole.BOUNCE).encode() == b"bounce"
    assert QueueEnvelope("s@x", ("a@y", "b@z")).encode() == b"Fs@x\0Ta@y\0Tb@z\0\0"


@given(st.sampled_from(QQExit), number, number)
def test_queue_answer_round_trip(code: QQExit, qp: int, msgid: int) -> None:
    answer = QueueAnswer(code, qp, msgid)
    data = answer.encode()
    assert len(data) <= MAX_FRAME[ANSWER]
    back = QueueAnswer.decode(data)
    assert back == answer and back.code is code
    assert back.text == code.text and back.permanent == code.permanent


@given(st.sampled_from(CleanKind), number)
def test_clean_request_round_trip(kind: CleanKind, msgid: int) -> None:
    request = CleanRequest(kind, msgid)
    data = request.encode()
    assert len(data) <= MAX_FRAME[CLEAN]
    if len(data) >= 7:  # qmail-clean reads 7 to 100 bytes: "foop/1" is not a request
        assert CleanRequest.decode(data) == request
        assert str(request) == data.decode()


@given(st.sampled_from(CleanAnswer))
def test_clean_answer_round_trip(answer: CleanAnswer) -> None:
    assert len(answer.encode()) <= MAX_FRAME[CLEAN_ANSWER]
    assert CleanAnswer.decode(answer.encode()) is answer


@given(st.sampled_from(QueueRole))
def test_hello_round_trip(role: QueueRole) -> None:
    assert len(QueueHello(role).encode()) <= MAX_FRAME[HELLO]
    assert QueueHello.decode(QueueHello(role).encode()) == QueueHello(role)


@given(st.binary(max_size=4096))
def test_body_chunk_round_trip(data: bytes) -> None:
    assert BodyChunk.decode(BodyChunk(data).encode()) == BodyChunk(data)


@given(addr, st.lists(addr, max_size=8))
def test_envelope_round_trip(sender: str, rcpts: list[str]) -> None:
    env = QueueEnvelope(sender, tuple(rcpts))
    assert len(env.encode()) <= MAX_FRAME[ENVELOPE]
    assert QueueEnvelope.decode(env.encode()) == env


@pytest.mark.parametrize("env", [QueueEnvelope("a\0b", ()), QueueEnvelope("s", ("r", "x\0Tevil"))])
def test_an_address_with_a_nul_is_not_sent(env: QueueEnvelope) -> None:
    with pytest.raises(ProtocolError):
        env.encode()


def test_an_over_long_address_is_the_writers_to_refuse_with_exit_11() -> None:
    data = QueueEnvelope("s", ("a" * 1003,)).encode()
    with pytest.raises(EnvelopeRefused) as info:
        QueueEnvelope.decode(data)
    assert info.value.code is QQExit.ADDR_TOO_LONG


def test_out_of_range_values_are_not_encoded() -> None:
    for bad in (QueueAnswer(QQExit.OK, -1, 0), QueueAnswer(QQExit.OK, 0, 1 << 63),
                QueueAnswer(5, 0, 0)):  # type: ignore[arg-type]
        with pytest.raises(ProtocolError):
            bad.encode()
    with pytest.raises(ProtocolError):
        CleanRequest.foop(-1).encode()
    with pytest.raises(ProtocolError):
        BodyChunk(b"x" * (MAX_FRAME[BODY] + 1)).encode()


@pytest.mark.parametrize("payload", [b"", b"0 1", b"0 1 2 3", b"5 1 2", b"0 -1 2", b"0 +1 2",
                                     b"0  1 2", b"0 1 2\n", b"0 1 99999999999999999999", b"x 1 2"])
def test_malformed_queue_answers(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        QueueAnswer.decode(payload)


@pytest.mark.parametrize("payload", [b"local", b"", b"network\n", b"NETWORK", b"\xff"])
def test_unknown_roles(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        QueueHello.decode(payload)


_DECODERS = [QueueAnswer.decode, CleanRequest.decode, CleanAnswer.decode, QueueHello.decode,
             BodyChunk.decode, QueueEnvelope.decode]


@given(st.sampled_from(_DECODERS), st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(decoder: object, data: bytes) -> None:
    try:
        decoder(data)  # type: ignore[operator]
    except ProtocolError:
        return


@given(st.text(alphabet="fotdp/0123456789x", max_size=30))
def test_clean_request_text_decodes_or_raises_protocol_error(text: str) -> None:
    try:
        request = CleanRequest.decode(text.encode())
    except ProtocolError:
        return
    assert request.msgid == int(text.rsplit("/", 1)[1])


# ---------------------------------------------------------------- origin (issue 16)

from eqmail.ipc.queue import Origin  # noqa: E402


def test_envelope_without_origin_is_qmail_queue_bytes() -> None:
    assert QueueEnvelope("a@b", ("c@d",)).encode() == b"Fa@b\0Tc@d\0\0"


@pytest.mark.parametrize("origin", list(Origin))
def test_envelope_origin_round_trips_after_the_terminator(origin: Origin) -> None:
    env = QueueEnvelope("a@b", ("c@d",), origin)
    data = env.encode()
    assert data.startswith(b"Fa@b\0Tc@d\0\0X")
    assert QueueEnvelope.decode(data) == env


@pytest.mark.parametrize("tail", [b"Xorigin=bogus\0", b"Xcolour=red\0", b"Xorigin=auth",
                                  b"garbage", b"X" * 400 + b"\0"])
def test_unknown_or_broken_extension_records_are_ignored(tail: bytes) -> None:
    assert QueueEnvelope.decode(b"Fa@b\0Tc@d\0\0" + tail) == QueueEnvelope("a@b", ("c@d",))


def test_signed_origins() -> None:
    assert {o for o in Origin if o.signed} == {Origin.AUTH, Origin.RELAY, Origin.LOCAL, Origin.BOUNCE}
