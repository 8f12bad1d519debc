"""The listener's side of the plugin sandbox: ``run_hook`` (and ``call``).

Owns: a per-process pool of connections to run/sandbox.sock.  Runs in the listener
(eqmaild), on its event loop.  Each call borrows a connection (or opens one), sends one
request (``Q`` for a plugin section; ``P`` for checkpassword, eqmail.smtp.checkpw),
waits for its answer and returns the connection to the pool, so concurrent sessions
use different connections and a slow plugin delays only its own session.

Inputs: the socket path, the hook stage, the section's plugins (eqmail.spp.config
Plugin or their lines), the session's environment.  Output: the HookOutcome for
``Session.hook_result``.  Failures never raise: when the sandbox cannot be reached, or
breaks the protocol, or does not answer within the section's worst case
(plugins × spptimeout + a margin), the command gets
``451 qmail-spp failure: <first plugin>: sandbox unavailable (#4.3.0)``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence

from eqmail.ipc.sandbox import (
    ANSWER,
    REQUEST,
    ProtocolError,
    Request,
    decode_outcome,
    read_frame,
    write_frame,
)
from eqmail.log import log
from eqmail.smtp.actions import HookOutcome, HookStage, HookVerdict
from eqmail.spp import protocol as P
from eqmail.spp.config import Plugin

CONNECT_TIMEOUT = 5.0

MAX_IDLE = 32  # pooled connections kept per socket path
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class SandboxClient:
    def __init__(self, path: str) -> None:
        self.path = path
        self._idle: list[_Conn] = []

    async def _request(self, conn: _Conn, kind: bytes, payload: bytes, answer_kind: bytes,
                       timeout: float) -> bytes:
        reader, writer = conn
        write_frame(writer, kind, payload)
        await writer.drain()
        return await asyncio.wait_for(read_frame(reader, answer_kind), timeout)

    async def call(self, kind: bytes, payload: bytes, answer_kind: bytes,
                   timeout: float) -> bytes:
        """One request of type ``kind``; the payload of its ``answer_kind`` answer."""
        # A pooled connection may have been closed by a restarted sandbox while it sat
        # idle: one retry on a fresh connection.
        for pooled in (True, False):
            conn = self._idle.pop() if pooled and self._idle else None
            if conn is None:
                pooled = False
                conn = await asyncio.wait_for(asyncio.open_unix_connection(self.path),
                                              CONNECT_TIMEOUT)
            try:
                answer = await self._request(conn, kind, payload, answer_kind, timeout)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                conn[1].close()
                if pooled:
                    continue
                raise ProtocolError(f"sandbox closed the connection: {e!r}") from None
            except BaseException:
                conn[1].close()  # timeout or cancel: the answer may still come; drop it
                raise
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
            else:
                conn[1].close()
            return answer
        raise ProtocolError("unreachable")

    async def run(self, req: Request, timeout: float) -> HookOutcome:
        return decode_outcome(await self.call(REQUEST, req.encode(), ANSWER, timeout))


# Pools per event loop: a connection belongs to the loop that opened it.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, SandboxClient]] = (
    weakref.WeakKeyDictionary())


def _client(sock_path: str) -> SandboxClient:
    pools = _clients.setdefault(asyncio.get_running_loop(), {})
    client = pools.get(sock_path)
    if client is None:
        client = pools[sock_path] = SandboxClient(sock_path)
    return client


async def call(sock_path: str, kind: bytes, payload: bytes, answer_kind: bytes,
               timeout: float) -> bytes:
    """One request on a pooled connection to ``sock_path``.  Raises OSError (timeouts
    included) or ProtocolError; the caller decides what a failure means."""
    return await _client(sock_path).call(kind, payload, answer_kind, timeout)


async def run_hook(sock_path: str, stage: HookStage, plugins: Sequence[Plugin | str],
                   env: Mapping[str, str], *, plugin_timeout: float = 30) -> HookOutcome:
    """Run the ``stage`` section of ``plugins`` in the sandbox with ``env``."""
    lines = tuple(p.line if isinstance(p, Plugin) else p for p in plugins)
    if not lines:
        return HookOutcome()
    req = Request(stage, lines, dict(env))
    try:
        return await _client(sock_path).run(req, len(lines) * (plugin_timeout + 5) + 5)
    except (OSError, ProtocolError, TimeoutError) as e:
        log(f"warning: qmail-spp: sandbox {sock_path}: {e!r}")
        return HookOutcome(HookVerdict.REJECT, P.failure_text(lines[0], P.UNAVAILABLE))
