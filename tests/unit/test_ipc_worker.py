"""What workers tell the supervisor over their spawn pipes (eqmail.ipc.worker): the
bytes are those the supervisor read before they were typed, a listener's report lines
survive any cut between reads, and bad bytes raise ProtocolError and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.worker import (
    MAX_SESSIONS,
    Closed,
    ControlChanged,
    ListenerReport,
    ListenerReportReader,
    Ready,
    SessionCount,
)

reports = st.one_of(st.builds(SessionCount, st.integers(0, MAX_SESSIONS)), st.just(Closed()))


def test_the_bytes_are_those_of_before() -> None:
    assert Ready().encode() == b"R" and Ready.decode(b"R") == Ready()
    assert ControlChanged().encode() == b"C"
    assert SessionCount(12).encode() == b"12\n"
    assert Closed().encode() == b"closed\n"


@given(st.lists(reports, max_size=30), st.lists(st.integers(1, 40), max_size=10))
def test_reports_arrive_whatever_the_cut(sent: list[ListenerReport], cuts: list[int]) -> None:
    data = b"".join(r.encode() for r in sent)
    reader, got, pos = ListenerReportReader(), [], 0
    for cut in cuts + [len(data)]:
        got += reader.feed(data[pos:pos + cut])
        pos += cut
    got += reader.feed(data[pos:])
    assert got == sent


@pytest.mark.parametrize("data", [b"x\n", b"-1\n", b"\n", b"closed \n", b"1" * 11 + b"\n",
                                  b"9" * 20, b"12 13\n"])
def test_bad_reports_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ListenerReportReader().feed(data)


def test_out_of_range_counts_are_refused_on_both_ends() -> None:
    with pytest.raises(ProtocolError):
        SessionCount(-1)
    with pytest.raises(ProtocolError):
        ListenerReportReader().feed(b"%d\n" % (MAX_SESSIONS + 1))
    with pytest.raises(ProtocolError):
        Ready.decode(b"X")


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        ListenerReportReader().feed(data)
    except ProtocolError:
        pass
