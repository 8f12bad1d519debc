"""The listener's PROXY header reader (eqmail.workers.listener.read_proxy_header) on a real
socket pair, on asyncio's and uvloop's event loops: it takes the header and not a byte
more, however the header is split, and refuses hostile ones."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from eqmail.smtp.proxy import Command, ProxyError, ProxyHeader, Reason, encode_v1, encode_v2
from eqmail.workers.listener import read_proxy_header

V1 = encode_v1(("192.0.2.1", 4000), ("198.51.100.2", 25))
V2 = encode_v2(("2001:db8::1", 4000), ("2001:db8::2", 25), ((0x04, b"pad"),))
AFTER = b"\x16\x03\x01\x00\xa5EHLO x\r\n"  # a ClientHello's start, or early commands


def run(loop_kind: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop_kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


async def exchange(pieces: list[bytes], pause: float = 0.0, close: bool = False,
                   ) -> tuple[ProxyHeader | ProxyError, bytes]:
    """Send ``pieces`` (pausing between them) to a server socket; the reader's result and
    what is left in the server socket afterwards."""
    server, peer = socket.socketpair()
    server.setblocking(False)

    async def send() -> None:
        for piece in pieces:
            peer.sendall(piece)
            await asyncio.sleep(pause)
        if close:
            peer.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    try:
        result: ProxyHeader | ProxyError = await asyncio.wait_for(read_proxy_header(server), 5)
    except ProxyError as e:
        result = e
    await sender
    peer.shutdown(socket.SHUT_WR)
    rest = b""
    server.setblocking(True)
    while chunk := server.recv(4096):
        rest += chunk
    server.close()
    peer.close()
    return result, rest


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_header_taken_exactly_however_split(loop_kind: str, header: bytes) -> None:
    async def main() -> None:
        whole, rest = await exchange([header + AFTER])
        assert isinstance(whole, ProxyHeader) and whole.relayed and rest == AFTER
        for cut in (1, 5, 12, 13, 16, len(header) - 1, len(header)):
            got, rest = await exchange([header[:cut], header[cut:] + AFTER], pause=0.01)
            assert got == whole and rest == AFTER, cut
        got, rest = await exchange([bytes([b]) for b in header + AFTER], pause=0.001)
        assert got == whole and rest == AFTER

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_health_check_header(loop_kind: str) -> None:
    async def main() -> None:
        got, rest = await exchange([b"PROXY UNKNOWN\r\nHELO lb\r\n"])
        assert got == ProxyHeader(1, Command.LOCAL, length=15) and rest == b"HELO lb\r\n"
        got, rest = await exchange([encode_v2(None, None) + b"HELO lb\r\n"])
        assert isinstance(got, ProxyHeader) and not got.relayed and rest == b"HELO lb\r\n"

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize(("pieces", "close", "reason"), [
    ([V1[:20]], True, Reason.TRUNCATED),
    ([V2[:20]], True, Reason.TRUNCATED),
    ([], True, Reason.NOT_PROXY),
    ([b"EHLO client\r\n"], False, Reason.NOT_PROXY),
    ([b"PROXY TCP4 ", b"1" * 200], False, Reason.TOO_LONG),
    ([V2[:14] + b"\xff\xff"], False, Reason.TOO_LONG),
    ([b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"], False, Reason.MALFORMED),
])
def test_hostile_headers(loop_kind: str, pieces: list[bytes], close: bool, reason: Reason) -> None:
    async def main() -> None:
        got, _rest = await exchange(pieces, close=close)
        assert isinstance(got, ProxyError) and got.reason is reason

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_oversized_v1_line_is_refused_within_its_limit(loop_kind: str) -> None:
    async def main() -> None:
        line = b"PROXY UNKNOWN " + b"x" * 300
        got, rest = await exchange([line])
        assert isinstance(got, ProxyError) and got.reason is Reason.TOO_LONG
        assert rest == line  # refused on its first V1_MAX bytes, peeked: nothing was taken
        got, rest = await exchange([line[:50], line[50:]], pause=0.05)
        assert isinstance(got, ProxyError) and got.reason is Reason.TOO_LONG
        assert rest == line[50:]  # the first piece was taken; the rest refused on a peek

    run(loop_kind, main)
