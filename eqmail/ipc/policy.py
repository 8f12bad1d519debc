"""The protocol of run/policy.sock: the remote delivery worker asks the MTA-STS policy
worker for a domain's policy (issue 17).

Framing is eqmail.ipc.framing's header (a type byte, a 4-byte big-endian length, the
payload) with this module's own bounded frame types:

  remote -> policy  ``T`` request: the domain, ASCII, lower case (letters, digits, ``-``
                    and ``.``), at most 253 bytes
  policy -> remote  ``t`` answer: JSON ``{"policy": null or {"id": str, "fetched": float,
                    "text": str}, "failure": null or an RFC 8460 result type, "detail":
                    str}`` — what eqmail.delivery.stsclient makes a
                    :class:`~eqmail.delivery.tlspolicy.StsLookup` of

The policy travels as its text, the bytes the domain published (at most
MAX_POLICY_TEXT characters), with the TXT id it was fetched under and when: the client
parses it again (eqmail.delivery.mtasts), so what is enforced is always what was
published and no second form of a policy can disagree with the first.  A ``policy`` with
mode ``none`` is never sent (the worker answers ``null``).

One request and one answer per connection.  The socket is mode 0600, owned by the
remote worker's user (eqmailr), and the worker checks the peer's uid (SO_PEERCRED) as
well.  Nothing here trusts its input: bad JSON, missing or extra keys, wrong types,
oversized frames or fields raise :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import json
import math
import re
import socket
from dataclasses import dataclass
from typing import Any

from eqmail.ipc.framing import HEADER, ProtocolError, recv_exact

REQUEST = b"T"
ANSWER = b"t"
MAX_DOMAIN = 253
MAX_POLICY_TEXT = 64 * 1024  # eqmail.delivery.mtasts.MAX_BODY: a body decodes to no more
MAX_DETAIL = 512
MAX_FRAME = {REQUEST: MAX_DOMAIN, ANSWER: 6 * MAX_POLICY_TEXT + 4096}  # JSON escapes (\uXXXX) grow text
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_RESULT = re.compile(r"[a-z][a-z-]{0,39}")

__all__ = ["ANSWER", "REQUEST", "LookupAnswer", "LookupRequest", "PolicyText", "ProtocolError",
           "read_frame", "write_frame"]


@dataclass(frozen=True)
class LookupRequest:
    domain: str

    def encode(self) -> bytes:
        if not _DOMAIN.fullmatch(self.domain):
            raise ProtocolError("not a lower-case domain")
        return self.domain.encode("ascii")

    @classmethod
    def decode(cls, payload: bytes) -> LookupRequest:
        if len(payload) > MAX_DOMAIN:
            raise ProtocolError("domain too long")
        domain = payload.decode("latin-1")
        if not _DOMAIN.fullmatch(domain):
            raise ProtocolError("not a lower-case domain")
        return cls(domain)


@dataclass(frozen=True)
class PolicyText:
    """A fetched policy: its TXT ``id``, when it was ``fetched`` (Unix time), its ``text``."""

    id: str
    fetched: float
    text: str


@dataclass(frozen=True)
class LookupAnswer:
    """``policy`` None: no policy applies; ``failure``: an RFC 8460 result type (e.g.
    ``sts-policy-fetch-error``) when a TXT record announced a policy that could not be
    had; ``detail``: what happened, for the log and the report."""

    policy: PolicyText | None
    failure: str | None = None
    detail: str = ""

    def encode(self) -> bytes:
        p = self.policy
        payload = json.dumps({
            "policy": None if p is None else {"id": p.id, "fetched": p.fetched, "text": p.text},
            "failure": self.failure,
            "detail": self.detail,
        }, separators=(",", ":")).encode("ascii")
        _check(LookupAnswer.decode(payload) == self, "answer would not decode as itself")
        return payload

    @classmethod
    def decode(cls, payload: bytes) -> LookupAnswer:
        _check(len(payload) <= MAX_FRAME[ANSWER], "answer too large")
        try:
            value = json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"bad answer: {type(e).__name__}") from None
        _check(isinstance(value, dict) and set(value) == {"policy", "failure", "detail"},
               "bad answer keys")
        failure, detail = value["failure"], value["detail"]
        _check(isinstance(detail, str) and len(detail) <= MAX_DETAIL, "bad detail")
        _check(failure is None or (isinstance(failure, str) and bool(_RESULT.fullmatch(failure))),
               "bad failure")
        return cls(_policy(value["policy"]), failure, detail)


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ProtocolError(problem)


def _policy(value: Any) -> PolicyText | None:
    if value is None:
        return None
    _check(isinstance(value, dict) and set(value) == {"id", "fetched", "text"}, "bad policy")
    pid, fetched, text = value["id"], value["fetched"], value["text"]
    _check(isinstance(pid, str) and bool(_ID.fullmatch(pid)), "bad policy id")
    _check(isinstance(fetched, (int, float)) and not isinstance(fetched, bool)
           and math.isfinite(fetched) and fetched >= 0, "bad fetch time")
    _check(isinstance(text, str) and len(text) <= MAX_POLICY_TEXT, "bad policy text")
    return PolicyText(pid, float(fetched), text)


def write_frame(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    if len(payload) > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} too large")
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)


def read_frame(sock: socket.socket, expect: bytes) -> bytes:
    """The payload of the next frame on a blocking socket, which must be of type
    ``expect``; ProtocolError otherwise, or when the peer closes early."""
    kind, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    if kind != expect:
        raise ProtocolError(f"unexpected frame {kind!r}")
    if length > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} too long")
    return recv_exact(sock, length) if length else b""
