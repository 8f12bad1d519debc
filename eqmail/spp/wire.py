"""The listener <-> plugin sandbox protocol on run/sandbox.sock.

Framing is eqmail.ipc's (a type byte, a 4-byte big-endian length, the payload) with
this module's own bounded frame types, so ipc.MAX_FRAME needs no entry for them:

  listener -> sandbox  ``Q`` request: JSON ``{"stage": str, "plugins": [line, ...],
                       "env": {name: value}}`` — run that section once
  sandbox -> listener  ``A`` answer: JSON of a HookOutcome (bytes as latin-1 text)

One request at a time per connection; a client keeps a small pool of connections and
runs concurrent sessions on different ones.  Strings are the session's
surrogate-escaped str (JSON carries the lone surrogates); nothing here trusts its
input: unknown frame types, oversized frames and bad JSON raise :class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from eqmail.ipc import HEADER, ProtocolError
from eqmail.smtp.actions import HookOutcome, HookStage, HookVerdict

REQUEST = b"Q"
ANSWER = b"A"
MAX_FRAME = {REQUEST: 1 << 20, ANSWER: 1 << 20}
MAX_PLUGINS = 64

__all__ = ["ANSWER", "REQUEST", "ProtocolError", "Request", "decode_outcome",
           "encode_outcome", "read_frame", "write_frame"]


@dataclass(frozen=True)
class Request:
    stage: HookStage
    plugins: tuple[str, ...]
    env: dict[str, str]

    def encode(self) -> bytes:
        return json.dumps({"stage": self.stage.value, "plugins": list(self.plugins),
                           "env": self.env}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Request:
        try:
            obj = json.loads(payload)
            stage = HookStage(obj["stage"])
            plugins = tuple(obj["plugins"])
            env = obj["env"]
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"bad sandbox request: {e}") from None
        if (len(plugins) > MAX_PLUGINS or not all(isinstance(p, str) and p for p in plugins)
                or not isinstance(env, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ProtocolError("bad sandbox request")
        return cls(stage, plugins, env)


def _b(data: bytes) -> str:
    return data.decode("latin-1")


def encode_outcome(o: HookOutcome) -> bytes:
    return json.dumps({
        "verdict": o.verdict.value, "output": _b(o.output), "env": [list(e) for e in o.env],
        "headers": list(o.headers), "later": [[s.value, _b(t)] for s, t in o.later],
        "disable": o.disable, "address": o.address}).encode()


def decode_outcome(payload: bytes) -> HookOutcome:
    try:
        obj: dict[str, Any] = json.loads(payload)
        env = tuple((str(n), None if v is None else str(v)) for n, v in obj["env"])
        return HookOutcome(
            verdict=HookVerdict(obj["verdict"]), output=obj["output"].encode("latin-1"),
            env=env, headers=tuple(str(h) for h in obj["headers"]),
            later=tuple((HookStage(s), t.encode("latin-1")) for s, t in obj["later"]),
            disable=bool(obj["disable"]),
            address=None if obj["address"] is None else str(obj["address"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProtocolError(f"bad sandbox answer: {e}") from None


async def read_frame(reader: asyncio.StreamReader, expect: bytes) -> bytes:
    """The payload of the next frame, which must be of type ``expect``.
    Raises asyncio.IncompleteReadError at a clean end of stream."""
    kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    if kind != expect or length > MAX_FRAME[expect]:
        raise ProtocolError(f"unexpected frame {kind!r} of {length} bytes")
    return await reader.readexactly(length)


def write_frame(writer: asyncio.StreamWriter, kind: bytes, payload: bytes) -> None:
    if len(payload) > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes too large")
    writer.write(HEADER.pack(kind, len(payload)) + payload)
