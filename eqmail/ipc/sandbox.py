"""The protocol of the plugin sandbox's two sockets.

Framing is eqmail.ipc.framing's (a type byte, a 4-byte big-endian length, the payload)
with this module's own bounded frame types, so framing.MAX_FRAME needs no entry for them.

run/sandbox.sock (mode 0600, owner eqmaild: the listeners):

  listener -> sandbox  ``Q`` request: JSON ``{"stage": str, "plugins": [line, ...],
                       "env": {name: value}}`` — run that section once
  sandbox -> listener  ``A`` answer: JSON of a HookOutcome (bytes as latin-1 text)
  listener -> sandbox  ``P`` checkpassword: JSON ``{"argv": [str, ...], "env": {...},
                       "input": latin-1 text, "timeout": seconds, "client": str,
                       "limit": [failures, seconds, delay] or null}`` — ``input`` is
                       what goes to fd 3 (``user\0password\0challenge\0``, <= 16 KiB);
                       ``client`` (the remote IP, "" = none) and ``limit`` (the
                       listener's control/authlimit) put the check under the shared
                       failure table (eqmail.authlimit)
  sandbox -> listener  ``p`` answer: JSON ``{"result": CheckResult value, "status": int,
                       "delay": seconds before the 535, "locked": bool}``

run/sandbox-remote.sock (mode 0600, owner eqmailr: the remote delivery worker):

  remote -> sandbox    ``B`` before-remote chain: JSON ``{"commands": [str, ...],
                       "args": [host, sender, recipient], "timeout": seconds}`` sent in
                       one sendmsg with exactly one fd (SCM_RIGHTS): the message, open
                       for reading — the sandbox's user cannot open the queue itself
  sandbox -> remote    ``b`` answer: JSON ``{"verdict": str, "text": str}``, a Verdict's
                       value: "success" (text "") = exactly one fd comes with it, an
                       unlinked temporary file holding the hooks' final output;
                       "deferral" or "failure" with the text of qmail's report
                       (lines ending in "\\n"), no fd

The sandbox decides what a request may do by the socket it came in on, never by the
request: the listener socket serves ``Q`` and ``P`` only, the remote socket ``B`` only.
One request at a time per connection; the listener keeps a small pool of connections
and runs concurrent sessions on different ones, the remote worker connects per chain.
Strings are surrogate-escaped str (JSON carries the lone surrogates); nothing here
trusts its input: unknown frame types, oversized frames, bad JSON, missing or extra
fds raise :class:`ProtocolError`.  Received fds are close-on-exec (MSG_CMSG_CLOEXEC).
"""

from __future__ import annotations

import array
import asyncio
import enum
import json
import math
import os
import socket
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from eqmail.authlimit import AuthLimit
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.ipc.framing import HEADER, ProtocolError
from eqmail.ipc.hooks import HookOutcome, HookStage, HookVerdict, valid_header, wire_shape

REQUEST = b"Q"
ANSWER = b"A"
CHECKPW = b"P"
CHECKPW_ANSWER = b"p"
BFRMT = b"B"
BFRMT_ANSWER = b"b"
MAX_FRAME = {REQUEST: 1 << 20, ANSWER: 1 << 20, CHECKPW: 1 << 20, CHECKPW_ANSWER: 256,
             BFRMT: 256 << 10, BFRMT_ANSWER: 8 << 10}
MAX_PLUGINS = 64
MAX_CHECKPW_INPUT = 16 * 1024  # fd 3's bytes
MAX_ARGV = 256
MAX_COMMANDS = 64  # before-remote commands in one chain
MAX_REPORT = 4096
MAX_TIMEOUT = 86400.0
MAX_CLIENT = 64            # an IPv6 address with a zone, as text
MAX_LIMIT_SECONDS = 86400.0 * 7  # eqmail.authlimit's bound for SECONDS and DELAY

__all__ = ["ANSWER", "BFRMT", "BFRMT_ANSWER", "CHECKPW", "CHECKPW_ANSWER", "BfrmtAnswer",
           "BfrmtRequest", "CheckAnswer", "CheckRequest", "CheckResult", "ProtocolError",
           "REQUEST", "Request", "decode_outcome", "encode_outcome", "read_frame",
           "read_frame_any", "recv_frame_fds", "send_frame_fds", "write_frame"]


def _bounded(payload: bytes, kind: bytes) -> bytes:
    """An encoded payload, which must fit the frame it goes out in."""
    if len(payload) > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes too large")
    return payload


def _load(payload: bytes, what: str) -> Any:
    """The JSON value of a payload; ProtocolError for anything that is not JSON (also
    for nesting too deep for the parser)."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"bad {what}: {type(e).__name__}") from None


@dataclass(frozen=True)
class Request:
    stage: HookStage
    plugins: tuple[str, ...]
    env: dict[str, str]

    def encode(self) -> bytes:
        return _bounded(json.dumps({"stage": self.stage.value, "plugins": list(self.plugins),
                           "env": self.env}).encode(), REQUEST)

    @classmethod
    def decode(cls, payload: bytes) -> Request:
        obj = _load(payload, "sandbox request")
        try:
            stage = HookStage(obj["stage"])
            plugins = obj["plugins"]
            env = obj["env"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"bad sandbox request: {e}") from None
        if (not isinstance(plugins, list) or len(plugins) > MAX_PLUGINS
                or not all(isinstance(p, str) and p for p in plugins)
                or not isinstance(env, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ProtocolError("bad sandbox request")
        return cls(stage, tuple(plugins), env)


def _b(data: bytes) -> str:
    return data.decode("latin-1")


def encode_outcome(o: HookOutcome) -> bytes:
    return _bounded(json.dumps({
        "verdict": o.verdict.value, "output": _b(o.output), "env": [list(e) for e in o.env],
        "headers": list(o.headers), "later": [[s.value, _b(t)] for s, t in o.later],
        "disable": o.disable, "address": o.address}).encode(), ANSWER)


def decode_outcome(payload: bytes) -> HookOutcome:
    """The sandbox's answer, checked again on the listener's side: its reply bytes and
    headers must keep the rules eqmail.spp.protocol enforces (one reply per command,
    one header field per header), whatever the sandbox process has become."""
    obj = _load(payload, "sandbox answer")
    try:
        env = tuple((str(n), None if v is None else str(v)) for n, v in obj["env"])
        outcome = HookOutcome(
            verdict=HookVerdict(obj["verdict"]), output=obj["output"].encode("latin-1"),
            env=env, headers=tuple(str(h) for h in obj["headers"]),
            later=tuple((HookStage(s), t.encode("latin-1")) for s, t in obj["later"]),
            disable=bool(obj["disable"]),
            address=None if obj["address"] is None else str(obj["address"]))
        problem = _outcome_problem(outcome)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProtocolError(f"bad sandbox answer: {e}") from None
    if problem:
        raise ProtocolError(f"bad sandbox answer: {problem}")
    return outcome


def _outcome_problem(o: HookOutcome) -> str | None:
    """Why ``o`` could make a second reply or a broken header; None when it is sane.
    (UnicodeEncodeError, a ValueError, for a header that is no surrogate-escaped str.)"""
    shape = wire_shape(o.output)
    if o.verdict is HookVerdict.REJECT:
        ok = shape == (1, None)
    elif o.verdict is HookVerdict.TERMINATE:
        ok = shape in ((0, None), (1, None))
    else:  # the session's own reply finishes an open continuation
        ok = shape is not None and shape[0] == 0
    if not ok:
        return "output is not one reply"
    if len({stage for stage, _ in o.later}) != len(o.later) or any(
            wire_shape(text) != (1, None) for _, text in o.later):
        return "a queued text is not one reply"
    if not all(valid_header(h.encode("utf-8", "surrogateescape")) for h in o.headers):
        return "a header is not one header field"
    return None


async def read_frame(reader: asyncio.StreamReader, expect: bytes) -> bytes:
    """The payload of the next frame, which must be of type ``expect``.
    Raises asyncio.IncompleteReadError at a clean end of stream."""
    return (await read_frame_any(reader, (expect,)))[1]


async def read_frame_any(reader: asyncio.StreamReader,
                         allowed: Container[bytes]) -> tuple[bytes, bytes]:
    """``(type, payload)`` of the next frame, whose type must be in ``allowed``."""
    kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    if kind not in allowed or kind not in MAX_FRAME or length > MAX_FRAME[kind]:
        raise ProtocolError(f"unexpected frame {kind!r} of {length} bytes")
    return kind, await reader.readexactly(length)


def write_frame(writer: asyncio.StreamWriter, kind: bytes, payload: bytes) -> None:
    if len(payload) > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes too large")
    writer.write(HEADER.pack(kind, len(payload)) + payload)


# ---- checkpassword (listener socket) ---------------------------------------------------


class CheckResult(enum.Enum):
    OK = "ok"                # exit 0
    FAILED = "failed"        # any other exit code
    CRASHED = "crashed"      # killed by a signal (qmail-smtpd-auth: "problem with child")
    TIMEOUT = "timeout"      # killed with its process group at the deadline
    NO_CHILD = "no child"    # not found, not executable, or posix_spawn failed
    NO_PIPE = "no pipe"      # the fd-3 pipe could not be made
    LOCKED = "locked"        # the client address is locked out: the program did not run


def _str_env(env: Any) -> dict[str, str]:
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ProtocolError("bad environment")
    return env


def _float(value: Any, what: str) -> float:
    """A JSON number as a finite float (an integer too big for a float is refused)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError(f"bad {what}")
    try:
        number = float(value)
    except OverflowError:
        raise ProtocolError(f"bad {what}") from None
    if not math.isfinite(number):
        raise ProtocolError(f"bad {what}")
    return number


def _timeout(value: Any) -> float:
    number = _float(value, "timeout")
    if not 0 < number <= MAX_TIMEOUT:
        raise ProtocolError("bad timeout")
    return number


def _seconds(value: Any) -> float:
    number = _float(value, "number of seconds")
    if not 0 <= number <= MAX_LIMIT_SECONDS * 4:
        raise ProtocolError("bad number of seconds")
    return number


def _limit(value: Any) -> AuthLimit | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 3 or not isinstance(value[0], int)
            or isinstance(value[0], bool) or not 0 <= value[0] <= 1_000_000):
        raise ProtocolError("bad authlimit")
    seconds, delay = _seconds(value[1]), _seconds(value[2])
    if max(seconds, delay) > MAX_LIMIT_SECONDS:
        raise ProtocolError("bad authlimit")
    return AuthLimit(value[0], seconds, delay)


@dataclass(frozen=True)
class CheckRequest:
    argv: tuple[str, ...]
    env: dict[str, str]
    input: bytes  # fd 3
    timeout: float
    client: str = ""                # the client's IP address: counted in the sandbox
    limit: AuthLimit | None = None  # the listener's control/authlimit (None: not counted)

    def encode(self) -> bytes:
        limit = None if self.limit is None else [
            self.limit.failures, self.limit.seconds, self.limit.delay]
        return _bounded(json.dumps({"argv": list(self.argv), "env": self.env,
                           "input": self.input.decode("latin-1"),
                           "timeout": self.timeout, "client": self.client,
                           "limit": limit}).encode(), CHECKPW)

    @classmethod
    def decode(cls, payload: bytes) -> CheckRequest:
        obj = _load(payload, "checkpassword request")
        try:
            argv, env, data, timeout = obj["argv"], obj["env"], obj["input"], obj["timeout"]
            client, limit = obj.get("client", ""), obj.get("limit")
            raw = data.encode("latin-1")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"bad checkpassword request: {e}") from None
        if (not isinstance(argv, list) or not 0 < len(argv) <= MAX_ARGV
                or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]
                or len(raw) > MAX_CHECKPW_INPUT
                or not isinstance(client, str) or len(client) > MAX_CLIENT):
            raise ProtocolError("bad checkpassword request")
        return cls(tuple(argv), _str_env(env), raw, _timeout(timeout), client, _limit(limit))


@dataclass(frozen=True)
class CheckAnswer:
    result: CheckResult
    status: int = 0         # exit code, or minus the signal number
    delay: float = 0.0      # FAILED under the table: seconds to wait before the 535
    locked: bool = False    # FAILED under the table: this failure locked the address out

    def encode(self) -> bytes:
        return _bounded(json.dumps({"result": self.result.value, "status": self.status,
                           "delay": self.delay, "locked": self.locked}).encode(), CHECKPW_ANSWER)

    @classmethod
    def decode(cls, payload: bytes) -> CheckAnswer:
        obj = _load(payload, "checkpassword answer")
        try:
            status, locked = obj["status"], obj.get("locked", False)
            if not isinstance(status, int) or not isinstance(locked, bool):
                raise TypeError("status")
            return cls(CheckResult(obj["result"]), status, _seconds(obj.get("delay", 0.0)),
                       locked)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"bad checkpassword answer: {e}") from None


# ---- before-remote (remote socket) -----------------------------------------------------


@dataclass(frozen=True)
class BfrmtRequest:
    commands: tuple[str, ...]
    args: tuple[str, str, str]  # host, sender, recipient: $1 $2 $3
    timeout: float              # per command

    def encode(self) -> bytes:
        return _bounded(json.dumps({"commands": list(self.commands), "args": list(self.args),
                           "timeout": self.timeout}).encode(), BFRMT)

    @classmethod
    def decode(cls, payload: bytes) -> BfrmtRequest:
        obj = _load(payload, "before-remote request")
        try:
            commands, args, timeout = obj["commands"], obj["args"], obj["timeout"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"bad before-remote request: {e}") from None
        if (not isinstance(commands, list) or not 0 < len(commands) <= MAX_COMMANDS
                or not all(isinstance(c, str) and c and "\0" not in c for c in commands)
                or not isinstance(args, list) or len(args) != 3
                or not all(isinstance(a, str) and "\0" not in a for a in args)):
            raise ProtocolError("bad before-remote request")
        return cls(tuple(commands), (args[0], args[1], args[2]), _timeout(timeout))


@dataclass(frozen=True)
class BfrmtAnswer:
    """How a before-remote chain ended: ``failure`` None = the output fd comes with the
    answer; else the chain's deferral or failure, its text one or more lines, each
    ending in ``\\n``, without NUL, shorter than MAX_REPORT."""

    failure: Outcome | None

    def encode(self) -> bytes:
        outcome = self.failure or Outcome(Verdict.SUCCESS, "")
        if self.failure is not None and outcome.verdict is Verdict.SUCCESS:
            raise ProtocolError("bad before-remote answer: a failure that is a success")
        _check_bfrmt_outcome(outcome)
        return _bounded(json.dumps({"verdict": outcome.verdict.value,
                                    "text": outcome.text}).encode(), BFRMT_ANSWER)

    @classmethod
    def decode(cls, payload: bytes) -> BfrmtAnswer:
        obj = _load(payload, "before-remote answer")
        if not isinstance(obj, dict) or set(obj) != {"verdict", "text"}:
            raise ProtocolError("bad before-remote answer")
        verdict, text = obj["verdict"], obj["text"]
        if not isinstance(verdict, str) or not isinstance(text, str):
            raise ProtocolError("bad before-remote answer")
        try:
            outcome = Outcome(Verdict(verdict), text)
        except ValueError:
            raise ProtocolError("bad before-remote answer: unknown verdict") from None
        _check_bfrmt_outcome(outcome)
        return cls(None if outcome.verdict is Verdict.SUCCESS else outcome)


def _check_bfrmt_outcome(outcome: Outcome) -> None:
    """Success has no text; a deferral or failure has qmail's report text."""
    text = outcome.text
    if outcome.verdict is Verdict.SUCCESS:
        ok = text == ""
    else:
        ok = 0 < len(text) < MAX_REPORT and text.endswith("\n") and "\0" not in text
    if not ok:
        raise ProtocolError("bad before-remote answer")


# ---- frames with fds (blocking sockets: the remote worker's threads, the sandbox's) ---


def send_frame_fds(sock: socket.socket, kind: bytes, payload: bytes,
                   fds: Sequence[int] = ()) -> None:
    """One frame; ``fds`` ride on its first byte (one sendmsg)."""
    if len(payload) > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes too large")
    data = HEADER.pack(kind, len(payload)) + payload
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


_FD = array.array("i")


def _recv_exactly(sock: socket.socket, n: int, fds: list[int], max_fds: int,
                  eof_ok: bool = False) -> bytes:
    """``n`` bytes; b"" when ``eof_ok`` and the stream ends before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        # Not socket.recv_fds: Python 3.11's drops its flags argument, and a received
        # fd without close-on-exec would leak into every hook started after it.
        data, ancdata, flags, _ = sock.recvmsg(
            n - len(buf), socket.CMSG_SPACE((max_fds + 1) * _FD.itemsize),
            socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[:len(cdata) - len(cdata) % got.itemsize])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
            raise ProtocolError("too many file descriptors")
        if not data:
            if not buf and eof_ok:
                return b""
            raise ProtocolError("truncated frame")
        buf += data
    return bytes(buf)


def recv_frame_fds(sock: socket.socket, expect: bytes,
                   max_fds: int) -> tuple[bytes, list[int]] | None:
    """The payload of the next frame (type ``expect``) and the fds that came with it;
    None at a clean end of stream.  On any error the fds received are closed."""
    fds: list[int] = []
    try:
        header = _recv_exactly(sock, HEADER.size, fds, max_fds, eof_ok=True)
        if not header:
            return None
        kind, length = HEADER.unpack(header)
        if kind != expect or length > MAX_FRAME[expect]:
            raise ProtocolError(f"unexpected frame {kind!r} of {length} bytes")
        return _recv_exactly(sock, length, fds, max_fds), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
