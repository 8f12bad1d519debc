"""eqmail.delivery.bfrmt: the before-remote hook chain, its bounds and its verdicts."""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import pytest

from eqmail.delivery import bfrmt

MESSAGE = b"Subject: hi\n\nbody\n"


def run(commands: list[str], tmp: Path, sender: str = "s@x.test", timeout: int = 5,
        message: bytes = MESSAGE) -> bfrmt.HookResult:
    f = tempfile.TemporaryFile()
    f.write(message)
    f.seek(0)
    return bfrmt.run_chain(tuple(commands), "y.test", sender, "r@y.test", f, len(message), tmp, timeout)


def test_hook_output_is_the_message_and_args_are_positional(tmp_path: Path) -> None:
    res = run(["printf 'X-Hook: %s %s %s\\n' \"$1\" \"$2\" \"$3\"; cat"], tmp_path)
    assert res.output is not None
    assert res.output.read() == b"X-Hook: y.test s@x.test r@y.test\n" + MESSAGE


def test_addresses_are_never_interpolated(tmp_path: Path) -> None:
    evil = "$(touch pwned)`touch pwned2`;touch pwned3@x.test"
    res = run(['printf "%s\\n" "$2" >seen; cat'], tmp_path, sender=evil)
    assert res.output is not None
    assert (tmp_path / "seen").read_text() == evil + "\n"
    assert not any((tmp_path / n).exists() for n in ("pwned", "pwned2", "pwned3@x.test"))


def test_chain_and_clean_environment(tmp_path: Path) -> None:
    res = run(["sed 's/^Subject:/X-One: 1\\nSubject:/'", "printf 'X-Env: %s\\n' \"$HOME${SECRET-}\"; cat"],
              tmp_path)
    assert res.output is not None
    assert res.output.read() == b"X-Env: /\nX-One: 1\nSubject: hi\n\nbody\n"


@pytest.mark.parametrize(("cmd", "start"), [
    ("cat >/dev/null; echo temporary >&2; exit 111", "Zbefore-remote hook "),
    ("cat >/dev/null; exit 100", "Dbefore-remote hook "),
    ("cat >/dev/null; exit 3", "Zbefore-remote hook "),
    ("kill -9 $$", "Zbefore-remote hook "),
    ("cat >/dev/null", "Zbefore-remote hook "),  # no output
])
def test_failures(tmp_path: Path, cmd: str, start: str) -> None:
    res = run([cmd], tmp_path)
    assert res.output is None and res.report.startswith(start) and res.report.endswith("\n")


def test_texts(tmp_path: Path) -> None:
    res = run(["cat >/dev/null; echo 'key missing' >&2; exit 111"], tmp_path)
    assert res.report == ("Zbefore-remote hook cat >/dev/null; echo 'key missing' >&2; exit 111 "
                          "failed (exit 111); will retry. (#4.3.0)\nhook said: key missing\n")
    res = run(["cat >/dev/null; exit 100"], tmp_path)
    assert res.report == ("Dbefore-remote hook cat >/dev/null; exit 100 refused the message "
                          "(exit 100). (#5.3.0)\n")


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    start = time.monotonic()
    res = run(["sleep 30 & sleep 30; cat"], tmp_path, timeout=1)
    assert time.monotonic() - start < 5
    assert res.output is None and "timed out" in res.report and res.report[0] == "Z"


def test_output_is_bounded(tmp_path: Path) -> None:
    res = run(["cat; head -c 3000000 /dev/zero"], tmp_path)
    assert res.output is None and "too much output" in res.report and res.report[0] == "Z"


def test_failing_second_command_leaves_nothing(tmp_path: Path) -> None:
    res = run(["cat", "head -c 3 >/dev/null; exit 111"], tmp_path)
    assert res.output is None and res.report.startswith("Z")


def test_parse_commands() -> None:
    assert bfrmt.parse_commands("# signer\n\n dkimsign x \nexec cat\n") == ("dkimsign x", "exec cat")
    assert bfrmt.parse_commands(None) == ()
    assert isinstance(io.BytesIO(), io.BufferedIOBase)
