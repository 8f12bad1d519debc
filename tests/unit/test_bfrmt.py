"""The before-remote hook chain, its bounds and its verdicts (eqmail.delivery.bfrmt).

The chain runs where production runs it: in a sandbox worker (its own entry point, in a
subprocess, serving ``<root>/run/sandbox-remote.sock`` for the instance root
``tmp_path``), reached through :func:`eqmail.spp.bfrmtclient.run_chain` with the message
passed as an fd."""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spp_harness import Sandbox

from eqmail.delivery import bfrmt
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.spp import bfrmtclient

Z, F = Verdict.DEFERRAL, Verdict.FAILURE

MESSAGE = b"Subject: hi\n\nbody\n"


@pytest.fixture(autouse=True)
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test.example\n")
    sb = Sandbox(tmp_path, remote=True).start()
    yield sb
    log = sb.stop()
    assert "Traceback" not in log, log


def run(commands: list[str], tmp: Path, sender: str = "s@x.test", timeout: int = 5,
        message: bytes = MESSAGE) -> bfrmt.HookResult:
    f = tempfile.TemporaryFile()
    f.write(message)
    f.seek(0)
    return bfrmtclient.run_chain(tuple(commands), "y.test", sender, "r@y.test", f, len(message), tmp, timeout)


def output(res: bfrmt.HookResult) -> bytes:
    assert not isinstance(res, Outcome), res
    return res.read()


def failure(res: bfrmt.HookResult) -> Outcome:
    assert isinstance(res, Outcome), res
    return res


def test_hook_output_is_the_message_and_args_are_positional(tmp_path: Path) -> None:
    res = run(["printf 'X-Hook: %s %s %s\\n' \"$1\" \"$2\" \"$3\"; cat"], tmp_path)
    assert output(res) == b"X-Hook: y.test s@x.test r@y.test\n" + MESSAGE


def test_addresses_are_never_interpolated(tmp_path: Path) -> None:
    evil = "$(touch pwned)`touch pwned2`;touch pwned3@x.test"
    res = run(['printf "%s\\n" "$2" >seen; cat'], tmp_path, sender=evil)
    assert output(res) == MESSAGE
    assert (tmp_path / "seen").read_text() == evil + "\n"
    assert not any((tmp_path / n).exists() for n in ("pwned", "pwned2", "pwned3@x.test"))


def test_chain_and_clean_environment(tmp_path: Path) -> None:
    res = run(["sed 's/^Subject:/X-One: 1\\nSubject:/'", "printf 'X-Env: %s\\n' \"$HOME${SECRET-}\"; cat"],
              tmp_path)
    assert output(res) == b"X-Env: /\nX-One: 1\nSubject: hi\n\nbody\n"


@pytest.mark.parametrize(("cmd", "verdict"), [
    ("cat >/dev/null; echo temporary >&2; exit 111", Z),
    ("cat >/dev/null; exit 100", F),
    ("cat >/dev/null; exit 3", Z),
    ("kill -9 $$", Z),
    ("cat >/dev/null", Z),  # no output
])
def test_failures(tmp_path: Path, cmd: str, verdict: Verdict) -> None:
    res = failure(run([cmd], tmp_path))
    assert res.verdict is verdict
    assert res.text.startswith("before-remote hook ") and res.text.endswith("\n")


def test_texts(tmp_path: Path) -> None:
    res = run(["cat >/dev/null; echo 'key missing' >&2; exit 111"], tmp_path)
    assert res == Outcome(Z, "before-remote hook cat >/dev/null; echo 'key missing' >&2; exit 111 "
                             "failed (exit 111); will retry. (#4.3.0)\nhook said: key missing\n")
    res = run(["cat >/dev/null; exit 100"], tmp_path)
    assert res == Outcome(F, "before-remote hook cat >/dev/null; exit 100 refused the message "
                             "(exit 100). (#5.3.0)\n")
    res = run(["cat >/dev/null"], tmp_path)
    assert res == Outcome(Z, "before-remote hook cat >/dev/null produced no output. (#4.3.0)\n")
    res = run(["kill -9 $$"], tmp_path)
    assert res == Outcome(Z, "before-remote hook kill -9 $$ crashed (signal 9); will retry. (#4.3.0)\n")


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    start = time.monotonic()
    res = run(["sleep 30 & sleep 30; cat"], tmp_path, timeout=1)
    assert time.monotonic() - start < 5
    assert res == Outcome(Z, "before-remote hook sleep 30 & sleep 30; cat timed out; will retry. (#4.3.0)\n")


def test_output_is_bounded(tmp_path: Path) -> None:
    res = run(["cat; head -c 3000000 /dev/zero"], tmp_path)
    assert failure(res).verdict is Z and "too much output" in failure(res).text


def test_failing_second_command_leaves_nothing(tmp_path: Path) -> None:
    res = run(["cat", "head -c 3 >/dev/null; exit 111"], tmp_path)
    assert res == Outcome(Z, "before-remote hook head -c 3 >/dev/null; exit 111 failed (exit 111); "
                             "will retry. (#4.3.0)\n")


def test_parse_commands() -> None:
    assert bfrmt.parse_commands("# signer\n\n dkimsign x \nexec cat\n") == ("dkimsign x", "exec cat")
    assert bfrmt.parse_commands(None) == ()
    assert isinstance(io.BytesIO(), io.BufferedIOBase)


def test_message_goes_as_an_fd_and_is_left_alone(tmp_path: Path) -> None:
    big = b"Subject: big\n\n" + b"x" * 999 + b"\n"
    big *= 3000  # 3 MB: never in one frame
    f = tempfile.TemporaryFile()
    f.write(big)
    f.seek(123)
    res = bfrmtclient.run_chain(("cat",), "y.test", "s@x.test", "r@y.test", f, len(big), tmp_path, 5)
    assert output(res) == big
    assert f.tell() == 123  # the sandbox read through a file description of its own
    f.seek(0)
    assert f.read() == big


def test_hook_sees_no_other_fd(tmp_path: Path) -> None:
    fds = "import os; print(*[fd for fd in range(1024) if os.path.exists(f\"/dev/fd/{fd}\")])"
    res = run([f"cat; exec /usr/bin/python3 -S -c '{fds}'"], tmp_path)
    assert output(res) == MESSAGE + b"0 1 2\n"


def test_unreachable_sandbox_defers_and_runs_nothing(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.stop()
    os.unlink(tmp_path / "run" / "sandbox-remote.sock")
    res = run(["touch ran; cat"], tmp_path)
    assert res == Outcome(Z, "before-remote hook could not be run: sandbox unavailable; "
                             "will retry. (#4.3.0)\n")
    assert not (tmp_path / "ran").exists()
