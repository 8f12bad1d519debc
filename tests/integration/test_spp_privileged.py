"""The sandbox as an unprivileged user (root only): plugins see no queue files, and a
fork bomb is bounded by RLIMIT_NPROC and killed at the timeout while other sessions
proceed.  The fork bomb runs only as a dedicated test user with a low process limit."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Instance  # noqa: E402
from spp_harness import Sandbox, converse, ensure_user, make_root, script  # noqa: E402

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")]

BOMB_USER = "eqmsppbomb"
BOMB_NPROC = 40
# Every process forks forever and shrugs off EAGAIN, so the bomb stays at the limit
# until the sandbox's timeout kills its process group.
BOMB = """#!/usr/bin/python3 -S
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""


def _procs_of(uid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


@pytest.fixture
def bomb_sandbox() -> Iterator[Sandbox]:
    uid, _ = ensure_user(BOMB_USER)
    root = make_root("", {"spptimeout": "2\n",
                          "spp-bomb": "[mail]\nbomb\n",
                          "spp-fine": "[mail]\n:echo P250-fine; echo N\n"})
    script(root, "bomb", BOMB)
    sb = Sandbox(root, user=BOMB_USER, nproc=BOMB_NPROC).start()
    try:
        yield sb
    finally:
        sb.stop()
        for pid in _procs_of(uid):  # only this dedicated user's processes: ours
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sb.destroy()


def test_fork_bomb_is_bounded_and_killed(bomb_sandbox: Sandbox) -> None:
    uid = pwd.getpwnam(BOMB_USER).pw_uid
    cmds = [b"HELO c\r\n", b"MAIL FROM:<a@example.net>\r\n"]

    async def run() -> tuple[str, list[str], int]:
        bomb = asyncio.ensure_future(converse(
            bomb_sandbox, cmds, env={"SPPCONFFILE": "control/spp-bomb"}))
        await asyncio.sleep(0.5)
        peak = len(_procs_of(uid))
        fine = []
        for _ in range(3):
            t = await converse(bomb_sandbox, cmds, env={"SPPCONFFILE": "control/spp-fine"})
            fine.append(t.text)
        return (await bomb).text, fine, peak

    bomb_text, fine, peak = asyncio.run(run())
    assert bomb_text.endswith("451 qmail-spp failure: bomb: timeout (#4.3.0)\r\n")
    assert all(t.endswith("250-fine\r\n250 ok\r\n") for t in fine), fine
    assert peak <= BOMB_NPROC + 5
    deadline = time.monotonic() + 10
    while len(_procs_of(uid)) > 1 and time.monotonic() < deadline:  # only the sandbox
        time.sleep(0.1)
    assert len(_procs_of(uid)) == 1


@pytest.fixture
def real_instance() -> Iterator[Instance]:
    inst = Instance.create()
    try:
        yield inst
    finally:
        inst.destroy()


def test_plugins_as_eqmailp_see_no_queue_files(real_instance: Instance) -> None:
    root = real_instance.root
    (root / "control" / "smtpplugins").write_text(
        "[mail]\n:for f in queue/mess queue/todo queue/intd queue/info queue/lock/sendmutex;"
        " do if ls $f >/dev/null 2>&1 || cat $f >/dev/null 2>&1; then echo \"E550 saw $f\";"
        " exit 0; fi; done; echo P250-queue hidden; echo N\n"
        "[rcpt]\n:cat control/servercert.pem >/dev/null 2>&1 && echo 'E550 saw key'; echo N\n")
    sb = Sandbox(root, user="eqmailp").start()
    try:
        t = asyncio.run(converse(sb, [b"HELO c\r\n", b"MAIL FROM:<a@example.net>\r\n",
                                      b"RCPT TO:<testuser@mx.test.example>\r\n"]))
    finally:
        sb.stop()
    assert t.text.endswith("250-queue hidden\r\n250 ok\r\n250 ok\r\n"), t.text
