"""The supervisor -> logger message (eqmail.ipc.logtarget): round-trips for every sink
and format, and any bytes decode or raise ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.logtarget import MAX_LOG_TARGET, LogSink, LogTarget
from eqmail.logformat import LogFormat


@given(st.sampled_from(LogSink), st.sampled_from(LogFormat))
def test_round_trip(sink: LogSink, fmt: LogFormat) -> None:
    target = LogTarget(sink, fmt)
    data = target.encode()
    assert len(data) <= MAX_LOG_TARGET and data == f"{sink.value} {fmt.value}".encode()
    assert LogTarget.decode(data) == target


@given(st.binary(max_size=100))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        LogTarget.decode(data)
    except ProtocolError:
        return


def test_a_target_of_no_sink_is_not_sent() -> None:
    with pytest.raises(ProtocolError):
        LogTarget("file", LogFormat.LOCAL).encode()  # type: ignore[arg-type]
