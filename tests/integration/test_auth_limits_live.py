"""SMTP AUTH against hostile clients, live (issue 12, item 10).

One instance with two listeners whose checkpassword always says no (``/bin/false``):
``smtp`` with two processes, ``submission`` with one.  control/authlimit is
``4 600 0``: the fourth failure from one address within 600 s locks it out (no delay,
to keep the test quick).  Each test uses its own 127.0.0.N source address, so the
counts of one test do not touch another.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import IS_ROOT, ME, Instance, free_port, poll, worker_pids
from live_smtp import RawClient

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (privilege split)")

MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
FAILED = b"535 authentication failed (#5.7.1)\r\n"
CLOSING = b"421 too many authentication failures, closing connection (#4.7.0)\r\n"
LOCKED = b"454 too many authentication failures, try later (#4.7.0)\r\n"
LISTENER = "eqmail: listener"


@dataclass
class World:
    inst: Instance
    smtp: int
    submission: int


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    smtp, submission = free_port(("127.0.0.1",)), free_port(("127.0.0.1",))
    inst = Instance.create(listen=(
        f"smtp 127.0.0.1:{smtp} processes=2 checkpassword=/bin/false\n"
        f"smtp 127.0.0.1:{submission} checkpassword=/bin/false\n"))
    inst.write_control("authlimit", "4 600 0")
    try:
        inst.start()
        poll(lambda: len(worker_pids(inst, LISTENER)) == 3, what="three listener processes")
        yield World(inst, smtp, submission)
    finally:
        inst.destroy()


def session(port: int, source: str) -> RawClient:
    client = RawClient("127.0.0.1", port, source=source)
    assert client.line() == f"220 {ME} ESMTP\r\n".encode()
    client.send(b"EHLO client.example\r\n")
    client.reply()
    return client


def exchange(client: RawClient, line: bytes) -> bytes:
    client.send(line + b"\r\n")
    out = b""
    while True:
        raw = client.line()
        out += raw
        if raw[3:4] != b"-":
            return out


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: bytes = b"alice", password: bytes = b"guess") -> bytes:
    return b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password)


# ------------------------------------------------------------------ challenges


def test_every_session_gets_its_own_challenge(world: World) -> None:
    clients = [session(world.submission, "127.0.0.41") for _ in range(6)]  # one process
    try:
        challenges = []
        for client in clients:  # all within a second or two: eQmail's were equal
            answer = exchange(client, b"AUTH CRAM-MD5")
            assert answer.startswith(b"334 ") and answer.endswith(b"\r\n"), answer
            challenges.append(base64.b64decode(answer[4:-2], validate=True))
    finally:
        for client in clients:
            client.close()
    for challenge in challenges:  # qmail's shape, which clients know
        assert re.fullmatch(rb"<\d+\.\d+@" + re.escape(ME.encode()) + rb">", challenge)
    assert len(set(challenges)) == len(challenges), challenges
    numbers = {n for c in challenges for n in re.findall(rb"\d+", c)}
    assert len(numbers) == 2 * len(challenges)  # no pid, no clock: all random


# ------------------------------------------------------------------ malformed input

JUNK = [
    b"AUTH PLAIN AGFsaWNlAGd1ZXNz!",              # a byte outside the alphabet
    b"AUTH PLAIN AGFsaWNl AGd1ZXNz",              # a space inside
    b"AUTH PLAIN AGFsaWNlAGd1ZXN",                # not a multiple of four
    b"AUTH PLAIN AGFsaWNlAGd1ZX=z",               # padding inside
    b"AUTH PLAIN AGFsaWNlAGd1ZXNz====",           # too much padding
    b"AUTH PLAIN " + b64(b"alice\0guess"),        # two fields
    b"AUTH PLAIN " + b64(b"\0alice\0guess\0x"),   # four fields: a NUL inside the password
    b"AUTH LOGIN " + b64(b"ali\0ce"),             # a NUL inside the LOGIN user name
]


@pytest.mark.parametrize("line", JUNK)
def test_malformed_base64_and_nul_get_501(world: World, line: bytes) -> None:
    before = world.inst.log().count("auth failed")
    client = session(world.smtp, "127.0.0.42")
    try:
        assert exchange(client, line) == MALFORMED
        assert exchange(client, b"NOOP") == b"250 ok\r\n"  # the session goes on
    finally:
        client.close()
    assert world.inst.log().count("auth failed") == before  # no password was checked


@pytest.mark.parametrize("mech, steps", [
    (b"LOGIN", [b64(b"alice"), b64(b"pass\0word")]),          # NUL inside the password
    (b"LOGIN", [b"YWxp*2U="]),                               # junk in the user name
    (b"LOGIN", [b64(b"alice"), b"cGFzc3dvcmQ"]),             # unpadded password
    (b"CRAM-MD5", [b64(b"alice 0123456789abcdef") + b"%"]),  # junk in the response
    (b"CRAM-MD5", [b64(b"ali\0ce 0123456789abcdef")]),       # NUL inside the user name
])
def test_malformed_continuation_lines_get_501(world: World, mech: bytes,
                                              steps: list[bytes]) -> None:
    client = session(world.smtp, "127.0.0.43")
    try:
        assert exchange(client, b"AUTH " + mech).startswith(b"334 ")
        for step in steps[:-1]:
            assert exchange(client, step).startswith(b"334 ")
        assert exchange(client, steps[-1]) == MALFORMED
        assert exchange(client, b"NOOP") == b"250 ok\r\n"
    finally:
        client.close()


# ------------------------------------------------------------------ failures


def test_the_third_failure_in_a_session_closes_it(world: World) -> None:
    client = session(world.smtp, "127.0.0.44")
    try:
        assert exchange(client, plain()) == FAILED
        assert exchange(client, b"AUTH LOGIN " + b64(b"bob")) == b"334 Password:\r\n"
        assert exchange(client, b64(b"guess")) == FAILED
        assert exchange(client, plain(b"carol")) == CLOSING
        assert client.read_to_eof() == b""
    finally:
        client.close()


def _replace_listeners(inst: Instance, old: set[int]) -> None:
    poll(lambda: len(worker_pids(inst, LISTENER)) == 3
         and not old & set(worker_pids(inst, LISTENER)),
         timeout=30, what="a new generation of listeners")


def test_counts_are_shared_by_listeners_and_survive_reload_and_kill(world: World) -> None:
    source, inst = "127.0.0.45", world.inst
    # Failures 1 and 2 on the two-process listener, 3 on the other one.
    for port in (world.smtp, world.smtp, world.submission):
        client = session(port, source)
        try:
            assert exchange(client, plain()) == FAILED
        finally:
            client.close()
    # A reload that changes the listeners re-forks them (an unchanged one keeps its
    # processes: test_reload_keeps_listeners.py); a listener killed with SIGKILL is restarted.
    old = set(worker_pids(inst, LISTENER))
    inst.write_control("listen", f"smtp 127.0.0.1:{world.smtp} processes=2 concurrency=99 "
                                 f"checkpassword=/bin/false\n"
                                 f"smtp 127.0.0.1:{world.submission} concurrency=99 "
                                 f"checkpassword=/bin/false\n")
    inst.ctl("reload")
    _replace_listeners(inst, old)
    old = set(worker_pids(inst, LISTENER))
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    _replace_listeners(inst, old)
    # Failure 4 locks the address out, on whichever listener process...
    client = session(world.submission, source)
    try:
        assert exchange(client, plain()) == FAILED
    finally:
        client.close()
    poll(lambda: f"auth failed: plain alice from {source} (locked out)" in inst.log(),
         what="the lock-out logged", inst=inst)  # the logger writes asynchronously
    for port in (world.smtp, world.smtp, world.submission):
        client = session(port, source)
        try:
            start = time.monotonic()
            assert exchange(client, plain()) == LOCKED
            assert time.monotonic() - start < 5  # refused without running the checker
        finally:
            client.close()
    # ...and only that address.
    client = session(world.smtp, "127.0.0.46")
    try:
        assert exchange(client, plain()) == FAILED
    finally:
        client.close()
