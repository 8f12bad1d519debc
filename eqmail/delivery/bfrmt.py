"""The before-remote hook (eQmail's qmail-bfrmt), done safely: its rules, without the I/O.

Owns: the format of ``control/beforemote``, the environment and bounds every hook
command runs with, and the reports a hook can produce.  Pure: the commands run in the
plugin sandbox worker (eqmailp; eqmail.spp.beforemote), which the remote delivery
worker (eqmailr) reaches through eqmail.spp.bfrmtclient; both apply the rules here.

Format of ``control/beforemote`` (eqmail's, not eQmail's shell fragment): one command
per line, ``#`` lines and empty lines ignored.  Each command runs as
``/bin/sh -c COMMAND beforemote HOST SENDER RECIPIENT`` — the host, sender and
recipient are *arguments* (``"$1"``, ``"$2"``, ``"$3"``), never interpolated into the
command text — with the working directory at the instance root, the message on stdin,
and its stdout taken as the message to pass on.  Commands are chained: the output of
one is the input of the next; the last output is what is sent.

Reports (qmail-style, :func:`verdict`): exit 100 -> ``D`` (bounce), exit 111 or any
other nonzero, a signal, a timeout, no output or too much output (more than
:func:`output_limit`) -> ``Z`` (retry).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from eqmail.log import sanitize


@dataclass
class HookResult:
    """What the before-remote chain made of one recipient's copy of the message."""

    output: BinaryIO | None  # the message to send (positioned at 0), or None
    report: str = ""  # the Z/D report when output is None


#: The chain runner remote delivery is handed (eqmail.spp.bfrmtclient.run_chain, which
#: talks to the sandbox): commands, host, sender, recipient, message, its size, the
#: instance root, the timeout.  Passed in so this library opens no socket of its own.
RunChain = Callable[[tuple[str, ...], str, str, str, BinaryIO, int, Path, int], HookResult]

HOOK_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LC_ALL": "C"}
EXTRA_OUTPUT = 1 << 20
MAX_STDERR = 4096


def output_limit(message_size: int) -> int:
    return 2 * message_size + EXTRA_OUTPUT


def command_name(cmd: str) -> str:
    short = cmd if len(cmd) <= 60 else cmd[:57] + "..."
    return sanitize(short)


def verdict(cmd: str, status: int, stderr: bytes) -> str:
    """The report for a command that exited with ``status`` (minus a signal number)."""
    name = command_name(cmd)
    said = sanitize(stderr.decode("utf-8", "replace").strip().split("\n")[0][:200])
    tail = f"\nhook said: {said}\n" if said else "\n"
    if status == 100:
        return f"Dbefore-remote hook {name} refused the message (exit 100). (#5.3.0){tail}"
    if status == -signal.SIGXFSZ:
        return f"Zbefore-remote hook {name} produced too much output. (#4.3.0){tail}"
    if status < 0:
        return f"Zbefore-remote hook {name} crashed (signal {-status}); will retry. (#4.3.0){tail}"
    return f"Zbefore-remote hook {name} failed (exit {status}); will retry. (#4.3.0){tail}"


def parse_commands(text: str | None) -> tuple[str, ...]:
    """control/beforemote: one command per line; ``#`` and empty lines ignored."""
    if not text:
        return ()
    lines = (ln.strip() for ln in text.split("\n"))
    return tuple(ln for ln in lines if ln and not ln.startswith("#"))
