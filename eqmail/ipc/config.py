"""The supervisor's configuration push to a running listener (a reload that keeps it).

Owns: the two messages on the channel the supervisor gives each listener process (a
Unix socketpair end passed at spawn, ``ListenerSettings.config_fd``):

  supervisor -> listener  ``U`` ``ConfigUpdate``: the reload's generation and the new
                          parsed ``Controls`` (at most MAX_UPDATE bytes)
  listener -> supervisor  ``u`` ``ConfigApplied``: the generation now in force (8 bytes)

Framing is the protocol's usual one (a type byte, a 4-byte big-endian length, the
payload; eqmail.ipc).  ``Controls`` is a large frozen dataclass of strings, numbers,
tuples, frozensets, a Path and a few eqmail dataclasses and enums, so it travels as a
pickle -- sent by root to an unprivileged process, and read with a restricted
unpickler all the same: ``find_class`` resolves only eqmail's own dataclasses and enums
(an enum member by its name only) and pathlib's Path; anything else, a payload over
the bound, a truncated pickle or a value that is not ``Controls`` raises
``ProtocolError`` (docs/design-notes.md).  No I/O here: callers move the bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from eqmail.control import Controls
from eqmail.ipc import ProtocolError

HEADER = struct.Struct(">cI")
MAX_UPDATE = 64 << 20  # bytes: users/assign and virtualdomains may be large
GENERATION = struct.Struct(">Q")
MAX_FRAME = {b"U": MAX_UPDATE, b"u": GENERATION.size}

# What a pickled Controls may name besides eqmail's dataclasses and enums.
STDLIB_GLOBALS = frozenset({("pathlib", "PosixPath"), ("pathlib", "Path")})
# eqmail's value classes that are not dataclasses, each pickled by its own __reduce__:
# users/assign's two tables, and a tcprules file rebuilt from its text.
VALUE_GLOBALS = frozenset({("eqmail.control.assign", "Assign"),
                           ("eqmail.tcprules", "rules_from_text")})


def _enum_member(cls: Any, name: Any) -> Any:
    """What a pickled enum member asks for (``getattr(cls, name)``), for eqmail's enums
    and their members' names only: the real getattr would reach any attribute."""
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and cls.__module__.startswith("eqmail.")
            and isinstance(name, str) and name in cls.__members__):
        return cls.__members__[name]
    raise ProtocolError("not an enum member")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if (module, name) in STDLIB_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in VALUE_GLOBALS:
            return super().find_class(module, name)
        if module == "eqmail" or module.startswith("eqmail."):
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                raise ProtocolError(f"unknown class {module}.{name}") from None
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise ProtocolError(f"class {module}.{name} not allowed in a configuration")


def _frame(kind: bytes, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME[kind]:
        raise ProtocolError(f"frame {kind!r} of {len(payload)} bytes not allowed")
    return HEADER.pack(kind, len(payload)) + payload


@dataclass(frozen=True)
class ConfigUpdate:
    generation: int
    controls: Controls

    def encode(self) -> bytes:
        if not 0 <= self.generation < 1 << 64:
            raise ProtocolError(f"generation {self.generation} out of range")
        body = pickle.dumps(self.controls, protocol=pickle.HIGHEST_PROTOCOL)
        return _frame(b"U", GENERATION.pack(self.generation) + body)

    @classmethod
    def decode(cls, payload: bytes) -> ConfigUpdate:
        if not GENERATION.size < len(payload) <= MAX_UPDATE:
            raise ProtocolError(f"configuration update of {len(payload)} bytes")
        (generation,) = GENERATION.unpack_from(payload)
        try:
            controls = _RestrictedUnpickler(io.BytesIO(payload[GENERATION.size:])).load()
        except ProtocolError:
            raise
        except Exception as e:  # any malformed pickle: the unpickler raises many kinds
            raise ProtocolError(f"malformed configuration: {e.__class__.__name__}") from None
        if not isinstance(controls, Controls):
            raise ProtocolError(f"configuration is a {type(controls).__name__}, not Controls")
        return cls(generation, controls)


@dataclass(frozen=True)
class ConfigApplied:
    generation: int

    def encode(self) -> bytes:
        if not 0 <= self.generation < 1 << 64:
            raise ProtocolError(f"generation {self.generation} out of range")
        return _frame(b"u", GENERATION.pack(self.generation))

    @classmethod
    def decode(cls, payload: bytes) -> ConfigApplied:
        if len(payload) != GENERATION.size:
            raise ProtocolError(f"configuration answer of {len(payload)} bytes")
        return cls(GENERATION.unpack(payload)[0])


ConfigMessage = ConfigUpdate | ConfigApplied
_DECODERS: dict[bytes, Any] = {b"U": ConfigUpdate.decode, b"u": ConfigApplied.decode}


class ConfigReader:
    """Buffers a byte stream and returns each complete message of the ``expect`` type;
    any other type, an over-long frame or a bad payload raises ``ProtocolError`` (the
    header is checked before the payload is buffered, so memory stays bounded)."""

    def __init__(self, expect: bytes) -> None:
        if expect not in _DECODERS:
            raise ValueError(f"no configuration message {expect!r}")
        self.expect = expect
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[ConfigMessage]:
        self.buf += data
        out: list[ConfigMessage] = []
        while len(self.buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self.buf)
            if kind != self.expect:
                raise ProtocolError(f"unexpected frame {kind!r}")
            if length > MAX_FRAME[kind]:
                raise ProtocolError(f"frame {kind!r} too long ({length})")
            if len(self.buf) - HEADER.size < length:
                break
            payload = bytes(self.buf[HEADER.size:HEADER.size + length])
            del self.buf[:HEADER.size + length]
            out.append(_DECODERS[kind](payload))
        return out
