"""The framing of every stream socket between eqmail's processes (eqmail.ipc.framing):
frames round-trip, any bytes are taken apart into frames or refused with ProtocolError
and nothing else, and an incomplete frame waits for the rest."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.framing import (
    HEADER,
    MAX_FRAME,
    ProtocolError,
    check_header,
    expect,
    frame,
    next_frame,
    read_frame_async,
    recv_frame,
    take_frames,
)

kinds = st.sampled_from(sorted(MAX_FRAME))


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, bytes]:
    kind = draw(kinds)
    return kind, draw(st.binary(max_size=min(MAX_FRAME[kind], 300)))


@given(st.lists(frames(), max_size=6), st.integers(0, 2000))
def test_frames_round_trip_whatever_the_cut(sent: list[tuple[bytes, bytes]], cut: int) -> None:
    wire = b"".join(frame(k, p) for k, p in sent)
    cut = min(cut, len(wire))
    buf = bytearray(wire[:cut])
    got = take_frames(buf)
    buf += wire[cut:]
    got += take_frames(buf)
    assert got == sent and buf == b""


@given(st.binary(max_size=300))
def test_any_bytes_are_frames_or_a_protocol_error(data: bytes) -> None:
    buf = bytearray(data)
    try:
        got = take_frames(buf)
    except ProtocolError:
        return
    assert b"".join(frame(k, p) for k, p in got) + bytes(buf) == data


def test_unknown_and_over_long_frames_are_refused() -> None:
    with pytest.raises(ProtocolError):
        check_header(HEADER.pack(b"Z", 0))
    with pytest.raises(ProtocolError):
        check_header(HEADER.pack(b"K", 2))
    with pytest.raises(ProtocolError):
        check_header(b"K\0")
    with pytest.raises(ProtocolError):
        frame(b"K", b"++")
    with pytest.raises(ProtocolError):
        frame(b"Z")
    assert next_frame(b"K\0\0\0\x01") is None  # incomplete: wait for the rest
    with pytest.raises(ProtocolError):
        expect(b"R", b"K")


def test_blocking_and_asyncio_reads() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame(b"R", b"0 1 2") + frame(b"A"))
        assert recv_frame(b) == (b"R", b"0 1 2")
        assert recv_frame(b) == (b"A", b"")
        a.sendall(b"R\0\0")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError):
            recv_frame(b)

    async def read() -> list[tuple[bytes, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(frame(b"K", b"+") + frame(b"e"))
        reader.feed_eof()
        return [await read_frame_async(reader), await read_frame_async(reader)]

    assert asyncio.run(read()) == [(b"K", b"+"), (b"e", b"")]
