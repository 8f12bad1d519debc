"""checkpassword and before-remote commands in the plugin sandbox: what each socket may
ask for, checkpassword's answers, bounds and environment, and (root) that a hook runs
as the sandbox's user with the message but without access to the queue.

The sandbox runs as a subprocess (its own entry point) serving both sockets; requests
go through the same client code the listener and the remote worker use.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spp_harness import Sandbox, make_root  # noqa: E402

from eqmail.authlimit import LOCKED_TEXT, AuthLimit  # noqa: E402
from eqmail.ipc.delivery import Outcome  # noqa: E402
from eqmail.ipc.sandbox import (  # noqa: E402
    BFRMT,
    CHECKPW,
    REQUEST,
    BfrmtRequest,
    CheckRequest,
    Request,
    recv_frame_fds,
    send_frame_fds,
)
from eqmail.smtp import replies  # noqa: E402
from eqmail.smtp.actions import HookStage  # noqa: E402
from eqmail.smtp.checkpw import AuthCheck  # noqa: E402
from eqmail.spp import bfrmtclient  # noqa: E402
from eqmail.spp.checkpwclient import run_checkpassword  # noqa: E402

ENV = {"TCPREMOTEIP": "192.0.2.10", "TCPLOCALPORT": "587", "PROTO": "TCP"}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox(make_root(""), remote=True).start()
    yield sb
    log = sb.stop()
    sb.destroy()
    assert "Traceback" not in log, log


def remote_path(sb: Sandbox) -> str:
    return str(sb.root / "run" / bfrmtclient.REMOTE_SOCKET)


def refused(path: str, kind: bytes, payload: bytes, fds: list[int]) -> bool:
    """True when the sandbox drops the connection instead of answering."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        send_frame_fds(s, kind, payload, fds)
        try:
            s.recv(1)  # a reply of any type would be a byte here
            return recv_frame_fds(s, b"?", 0) is None
        except ConnectionResetError:
            return True


# ------------------------------------------------------------------ one socket, one job


def test_listener_socket_cannot_run_before_remote_commands(sandbox: Sandbox) -> None:
    with tempfile.TemporaryFile() as msg:
        msg.write(b"Subject: x\n\nbody\n")
        req = BfrmtRequest(("touch ran; cat",), ("h", "s@x", "r@y"), 5).encode()
        assert refused(sandbox.sock, BFRMT, req, [msg.fileno()])
    assert not (sandbox.root / "ran").exists()


def test_remote_socket_cannot_run_plugins_or_checkpassword(sandbox: Sandbox) -> None:
    plugin = Request(HookStage.MAIL, (":touch ran-plugin",), dict(ENV)).encode()
    assert refused(remote_path(sandbox), REQUEST, plugin, [])
    check = CheckRequest(("/bin/sh", "-c", "touch ran-check"), dict(ENV), b"u\0p\0\0", 5).encode()
    assert refused(remote_path(sandbox), CHECKPW, check, [])
    assert not (sandbox.root / "ran-plugin").exists()
    assert not (sandbox.root / "ran-check").exists()


def test_before_remote_request_without_the_message_fd_is_refused(sandbox: Sandbox) -> None:
    req = BfrmtRequest(("touch ran; cat",), ("h", "s@x", "r@y"), 5).encode()
    assert refused(remote_path(sandbox), BFRMT, req, [])
    assert not (sandbox.root / "ran").exists()


# ------------------------------------------------------------------ checkpassword


def check(sb: Sandbox, argv: tuple[str, ...], user: bytes = b"alice", password: bytes = b"pw",
          timeout: float = 5, env: dict[str, str] | None = None) -> tuple[bool, str | None]:
    check = asyncio.run(run_checkpassword(sb.sock, argv, dict(env or ENV), user, password,
                                          b"", timeout))
    return check.ok, check.temporary


def test_checkpassword_answers(sandbox: Sandbox) -> None:
    script = sandbox.root / "checker"
    script.write_text('#!/bin/sh\n[ "$(tr "\\0" : <&3)" = "alice:pw::" ] && exec "$@"\nexit 1\n')
    script.chmod(0o755)
    assert check(sandbox, ("./checker", "/bin/true")) == (True, None)
    assert check(sandbox, ("./checker", "/bin/false")) == (False, None)  # the exec'd program decides
    assert check(sandbox, ("./checker", "/bin/true"), password=b"wrong") == (False, None)
    assert check(sandbox, ("sh", "-c", "kill -9 $$")) == (False, replies.AUTH_CHILD_CRASHED.text)
    assert check(sandbox, ("./missing",)) == (False, replies.AUTH_NO_CHILD.text)
    assert check(sandbox, ("no-such-checkpassword",)) == (False, replies.AUTH_NO_CHILD.text)
    assert check(sandbox, ("/bin/true",), user=b"x" * 20000) == (False, None)  # over 16 KiB


def test_checkpassword_environment_is_the_sessions(sandbox: Sandbox) -> None:
    assert check(sandbox, ("sh", "-c", "env >env.out"), env={**ENV, "X": "1"}) == (True, None)
    names = {line.split("=")[0] for line in (sandbox.root / "env.out").read_text().splitlines()}
    assert names - {"PWD", "OLDPWD"} == {*ENV, "X", "PATH"}  # sh adds PWD itself


def test_checkpassword_timeout_kills_the_process_group(sandbox: Sandbox) -> None:
    start = time.monotonic()
    argv = ("sh", "-c", "sleep 30 & echo $! >child.pid; wait")
    assert check(sandbox, argv, timeout=1) == (False, replies.AUTH_CHILD_CRASHED.text)
    assert time.monotonic() - start < 5
    child = int((sandbox.root / "child.pid").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_parallel_guesses_from_one_address_cannot_outrun_the_lock_out(sandbox: Sandbox) -> None:
    """Eight sessions from one address check at once under ``2 600 0``: the sandbox
    serialises them per address, so exactly two passwords are checked (the second
    failure locks the address out) and six are refused unchecked; another address is
    not affected.  The checker leaves a file per run."""
    limit = AuthLimit(failures=2, seconds=600, delay=0)
    argv = ("sh", "-c", "mktemp ran.XXXXXX >/dev/null; sleep 0.2; exit 1")

    async def guesses() -> list[AuthCheck]:
        return await asyncio.gather(*(
            run_checkpassword(sandbox.sock, argv, dict(ENV), b"alice", b"guess%d" % n, b"", 10,
                              client="192.0.2.77", limit=limit) for n in range(8)))

    results = asyncio.run(guesses())
    assert sorted((r.ok, r.refused, r.locked) for r in results) == (
        [(False, False, False), (False, False, True)] + [(False, True, False)] * 6)
    assert all(r.temporary == LOCKED_TEXT for r in results if r.refused)
    assert len(list(sandbox.root.glob("ran.*"))) == 2
    other = asyncio.run(run_checkpassword(sandbox.sock, argv, dict(ENV), b"alice", b"x", b"",
                                          10, client="192.0.2.78", limit=limit))
    assert not other.refused and other.temporary is None


def test_unreachable_sandbox_is_a_temporary_failure(sandbox: Sandbox) -> None:
    sandbox.stop()
    os.unlink(sandbox.sock)
    assert check(sandbox, ("sh", "-c", "touch ran")) == (False, replies.AUTH_NO_CHILD.text)
    assert not (sandbox.root / "ran").exists()


# ------------------------------------------------------------------ privileges (root)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_hook_runs_as_the_sandbox_user_with_the_message_but_not_the_queue() -> None:
    try:
        pwd.getpwnam("eqmailp")
    except KeyError:
        pytest.skip("no eqmailp user (eqmailctl setup makes it)")
    root = make_root("")
    mess = root / "queue" / "mess" / "0"
    mess.mkdir(parents=True)
    os.chmod(root / "queue", 0o750)
    (mess / "23").write_bytes(b"Subject: secret\n\nbody\n")
    os.chmod(mess / "23", 0o600)
    sb = Sandbox(root, user="eqmailp", remote=True).start()
    try:
        hook = "cat queue/mess/0/23 >/dev/null 2>&1 && echo LEAK; printf 'X-User: %s\\n' $(id -un); cat"
        with open(mess / "23", "rb") as msg:
            res = bfrmtclient.run_chain((hook,), "h.test", "s@x.test", "r@h.test", msg, 22, root, 5)
        assert not isinstance(res, Outcome), res
        assert res.read() == b"X-User: eqmailp\nSubject: secret\n\nbody\n"
    finally:
        log = sb.stop()
        sb.destroy()
    assert "Traceback" not in log, log
