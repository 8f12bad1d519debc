"""The configuration push (eqmail.ipc.config): round trips, and the restricted
unpickler that refuses anything but eqmail's own values."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.control import Controls, ListenerSpec, load_controls
from eqmail.ipc import ProtocolError
from eqmail.ipc.config import (
    HEADER,
    MAX_UPDATE,
    ConfigApplied,
    ConfigReader,
    ConfigUpdate,
)
from eqmail.logformat import LogFormat


def _loaded() -> Controls:
    """A Controls as the supervisor parses it, with every kind of value it holds:
    users/assign, a tcprules file, smtproutes, listen lines, authlimit, the log format."""
    root = Path(tempfile.mkdtemp(prefix="eqmail-ipc-config-"))
    (root / "control").mkdir()
    (root / "users").mkdir()
    for name, text in {"me": "a.example\n", "locals": "a.example\nb.example\n",
                       "rcpthosts": "a.example\n", "databytes": "1000\n",
                       "smtproutes": "c.example:relay.example:26 u p\n",
                       "listen": "smtp [::1]:25 processes=2 RELAYCLIENT=\n",
                       "tcp.smtp": "127.:allow,RELAYCLIENT=\"\"\n:allow\n",
                       "authlimit": "3 60\n", "logformat": "json\n"}.items():
        (root / "control" / name).write_text(text)
    (root / "users" / "assign").write_text("=joe:joe:1:1:/home/joe:::\n.\n")
    try:
        return load_controls(root)
    finally:
        shutil.rmtree(root)


CONTROLS = _loaded()


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def update_payload(obj: object, generation: int = 3) -> bytes:
    return struct.pack(">Q", generation) + pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def test_the_parsed_tables_arrive_working() -> None:
    """users/assign and the tcprules file are not dataclasses: they cross as their
    tables and their text, and answer lookups on arrival as they did before."""
    (update,) = ConfigReader(b"U").feed(ConfigUpdate(1, CONTROLS).encode())
    c = update.controls
    assert c.assign is not None and c.assign.lookup("JOE") == CONTROLS.assign.lookup("joe")
    assert c.assign.lookup("joe") is not None
    rules = c.rules_for("tcp.smtp")
    assert rules is not None and rules == CONTROLS.rules_for("tcp.smtp")
    assert rules.match("127.0.0.1", "") == CONTROLS.rules_for("tcp.smtp").match("127.0.0.1", "")


def test_update_round_trip_in_any_chunks() -> None:
    data = ConfigUpdate(7, CONTROLS).encode() + ConfigUpdate(8, CONTROLS).encode()
    for size in (1, 5, 4096, len(data)):
        reader = ConfigReader(b"U")
        got = []
        for i in range(0, len(data), size):
            got += reader.feed(data[i:i + size])
        assert got == [ConfigUpdate(7, CONTROLS), ConfigUpdate(8, CONTROLS)]
        assert got[0].controls.logformat is LogFormat.JSON
        assert got[0].controls.sources == CONTROLS.sources  # not compared by ==: carried all the same


def test_applied_round_trip() -> None:
    assert ConfigReader(b"u").feed(ConfigApplied(2**40).encode()) == [ConfigApplied(2**40)]
    with pytest.raises(ProtocolError):
        ConfigApplied(-1).encode()


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("obj", [Evil(), {"me": "a"}, [CONTROLS], ListenerSpec("smtp", "::1", 25)],
                         ids=["os.system", "dict", "list", "not Controls"])
def test_only_controls_are_accepted(obj: object) -> None:
    with pytest.raises(ProtocolError):
        ConfigReader(b"U").feed(frame(b"U", update_payload(obj)))


def test_getattr_reaches_enum_members_only() -> None:
    """A pickled enum member is ``getattr(cls, name)``; nothing else may use it."""
    class Sneaky:
        def __reduce__(self) -> tuple[object, tuple[object, str]]:
            return (getattr, (Controls, "route_for"))

    with pytest.raises(ProtocolError):
        ConfigReader(b"U").feed(frame(b"U", update_payload(Sneaky())))
    payload = update_payload(CONTROLS)
    assert payload.count(b"JSON") == 1  # the member name of CONTROLS.logformat
    with pytest.raises(ProtocolError, match="not an enum member"):
        ConfigReader(b"U").feed(frame(b"U", payload.replace(b"JSON", b"mro_")))


def test_bounds_and_framing() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        ConfigReader(b"U").feed(HEADER.pack(b"U", MAX_UPDATE + 1))  # refused before buffering
    with pytest.raises(ProtocolError, match="unexpected"):
        ConfigReader(b"U").feed(ConfigApplied(1).encode())  # a listener only takes updates
    with pytest.raises(ProtocolError, match="unexpected"):
        ConfigReader(b"u").feed(ConfigUpdate(1, CONTROLS).encode())
    with pytest.raises(ProtocolError):
        ConfigReader(b"U").feed(frame(b"U", b"\0" * 8))  # no pickle at all
    with pytest.raises(ProtocolError):
        ConfigReader(b"U").feed(frame(b"U", update_payload(CONTROLS)[:-3]))  # truncated
    with pytest.raises(ProtocolError):
        ConfigReader(b"u").feed(frame(b"u", b"\0" * 7))
    assert ConfigReader(b"U").feed(ConfigUpdate(1, CONTROLS).encode()[:-1]) == []  # incomplete: waits
    with pytest.raises(ValueError):
        ConfigReader(b"X")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_payloads_raise_only_protocol_error(payload: bytes) -> None:
    for kind in (b"U", b"u"):
        try:
            ConfigReader(kind).feed(frame(kind, payload))
        except ProtocolError:
            pass


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_random_streams_raise_only_protocol_error(data: bytes) -> None:
    try:
        ConfigReader(b"U").feed(data)
    except ProtocolError:
        pass


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=10**9),
       st.text(max_size=40))
def test_update_round_trips(generation: int, databytes: int, greeting: str) -> None:
    c = replace(CONTROLS, databytes=databytes, smtpgreeting=greeting)
    assert ConfigReader(b"U").feed(ConfigUpdate(generation, c).encode()) == [ConfigUpdate(generation, c)]
    assert ConfigReader(b"u").feed(ConfigApplied(generation).encode()) == [ConfigApplied(generation)]


def test_unpickler_is_not_the_default() -> None:
    """The same bytes a plain pickle.loads would run are refused."""
    payload = pickle.dumps(Evil())
    assert isinstance(pickle.Unpickler(io.BytesIO(payload)).find_class("os", "system"), object)
    with pytest.raises(ProtocolError, match="not allowed"):
        ConfigReader(b"U").feed(frame(b"U", struct.pack(">Q", 1) + payload))
