"""The before-remote hook (eQmail's qmail-bfrmt), done safely.

Owns: running the commands of ``control/beforemote`` on a message before it goes out
(e.g. a DKIM signer).  Runs in the remote delivery worker (eqmailr) until the plugin
sandbox worker exists; each command gets a clean environment, rlimits (``prlimit``: file
size = the output bound, CPU time, address space, no core files), its own process group
and the ``timeoutremote`` deadline.

Format of ``control/beforemote`` (eqmail's, not eQmail's shell fragment): one command
per line, ``#`` lines and empty lines ignored.  Each command runs as
``/bin/sh -c COMMAND beforemote HOST SENDER RECIPIENT`` — the host, sender and
recipient are *arguments* (``"$1"``, ``"$2"``, ``"$3"``), never interpolated into the
command text — with the working directory at the instance root, the message on stdin,
and its stdout taken as the message to pass on.  Commands are chained: the output of
one is the input of the next; the last output is what is sent.

Outputs: :class:`HookResult` — the final message in an unlinked temporary file, or a
qmail-style report: exit 100 -> ``D`` (bounce), exit 111 or any other nonzero, a
signal, a timeout, no output or too much output -> ``Z`` (retry).  The output is
collected completely and checked before any SMTP transaction starts, so a failing hook
never sends a truncated message and never sends twice (eQmail's fallback could).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from eqmail.log import log, sanitize

HOOK_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LC_ALL": "C"}
ADDRESS_SPACE = 1 << 30
EXTRA_OUTPUT = 1 << 20
MAX_STDERR = 4096


@dataclass
class HookResult:
    output: BinaryIO | None  # the message to send (positioned at 0), or None
    report: str = ""  # the Z/D report when output is None


def output_limit(message_size: int) -> int:
    return 2 * message_size + EXTRA_OUTPUT


def _name(cmd: str) -> str:
    short = cmd if len(cmd) <= 60 else cmd[:57] + "..."
    return sanitize(short)


def _argv(cmd: str, args: tuple[str, str, str], limit: int, timeout: int) -> list[str]:
    argv = ["/bin/sh", "-c", cmd, "beforemote", *args]
    prlimit = shutil.which("prlimit", path=HOOK_ENV["PATH"])
    if prlimit is None:  # pragma: no cover - util-linux is always there on Debian
        return argv
    return [prlimit, f"--fsize={limit}", f"--cpu={timeout + 1}", f"--as={ADDRESS_SPACE}",
            "--core=0", "--", *argv]


def _verdict(cmd: str, status: int, stderr: bytes) -> str:
    name = _name(cmd)
    said = sanitize(stderr.decode("utf-8", "replace").strip().split("\n")[0][:200])
    tail = f"\nhook said: {said}\n" if said else "\n"
    if status == 100:
        return f"Dbefore-remote hook {name} refused the message (exit 100). (#5.3.0){tail}"
    if status == -signal.SIGXFSZ:
        return f"Zbefore-remote hook {name} produced too much output. (#4.3.0){tail}"
    if status < 0:
        return f"Zbefore-remote hook {name} crashed (signal {-status}); will retry. (#4.3.0){tail}"
    return f"Zbefore-remote hook {name} failed (exit {status}); will retry. (#4.3.0){tail}"


def run_one(cmd: str, args: tuple[str, str, str], stdin: BinaryIO, cwd: Path,
            limit: int, timeout: int) -> HookResult:
    """Run one command; its output fully collected in a temporary file."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(_argv(cmd, args, limit, timeout), stdin=stdin, stdout=out,
                                stderr=err, cwd=cwd, env=HOOK_ENV, close_fds=True,
                                start_new_session=True)
    except OSError as e:
        out.close()
        err.close()
        return HookResult(None, f"Zbefore-remote hook {_name(cmd)} could not be started: "
                                f"{e.strerror}. (#4.3.0)\n")
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        status = None
    err.seek(0)
    stderr = err.read(MAX_STDERR)
    err.close()
    size = out.seek(0, os.SEEK_END)
    out.seek(0)
    if status is None:
        out.close()
        return HookResult(None, f"Zbefore-remote hook {_name(cmd)} timed out; will retry. (#4.3.0)\n")
    if size >= limit or status == 128 + signal.SIGXFSZ:
        # prlimit's RLIMIT_FSIZE stops the writer at the bound (SIGXFSZ; a shell reports
        # it as 128 + 25); without prlimit the size is checked here.
        status = -signal.SIGXFSZ
    if status != 0:
        out.close()
        report = _verdict(cmd, status, stderr)
        log(f"warning: {sanitize(report[1:].strip())}")
        return HookResult(None, report)
    if size == 0:
        out.close()
        return HookResult(None, f"Zbefore-remote hook {_name(cmd)} produced no output. (#4.3.0)\n")
    return HookResult(out)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_chain(commands: tuple[str, ...], host: str, sender: str, recipient: str,
              message: BinaryIO, message_size: int, cwd: Path, timeout: int) -> HookResult:
    """Run every command in order; the message fd is read, never modified."""
    limit = output_limit(message_size)
    current: BinaryIO = message
    for cmd in commands:
        current.seek(0)
        result = run_one(cmd, (host, sender, recipient), current, cwd, limit, timeout)
        if current is not message:
            current.close()
        if result.output is None:
            return result
        current = result.output
    current.seek(0)
    return HookResult(current)


def parse_commands(text: str | None) -> tuple[str, ...]:
    """control/beforemote: one command per line; ``#`` and empty lines ignored."""
    if not text:
        return ()
    lines = (ln.strip() for ln in text.split("\n"))
    return tuple(ln for ln in lines if ln and not ln.startswith("#"))
