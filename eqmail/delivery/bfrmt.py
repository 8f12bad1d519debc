"""The before-remote hook (eQmail's qmail-bfrmt), done safely: its rules, without the I/O.

Owns: the format of ``control/beforemote``, the environment and bounds every hook
command runs with, and the outcomes (with qmail-style texts) a hook can produce.
Pure: the commands run in the plugin sandbox worker (eqmailp; eqmail.spp.beforemote),
which the remote delivery worker (eqmailr) reaches through eqmail.spp.bfrmtclient;
both apply the rules here.

Format of ``control/beforemote`` (eqmail's, not eQmail's shell fragment): one command
per line, ``#`` lines and empty lines ignored.  Each command runs as
``/bin/sh -c COMMAND beforemote HOST SENDER RECIPIENT`` — the host, sender and
recipient are *arguments* (``"$1"``, ``"$2"``, ``"$3"``), never interpolated into the
command text — with the working directory at the instance root, the message on stdin,
and its stdout taken as the message to pass on.  Commands are chained: the output of
one is the input of the next; the last output is what is sent.

Outcomes (:func:`exit_outcome` and the others here): exit 100 -> failure (bounce), exit
111 or any other nonzero, a signal, a timeout, no output or too much output (more
than :func:`output_limit`), a sandbox that cannot run the chain -> deferral (retry).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeAlias

from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.log import sanitize

#: What the before-remote chain made of one recipient's copy of the message: the
#: message to send (an open file positioned at 0), or the chain's failure or deferral.
HookResult: TypeAlias = BinaryIO | Outcome

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


def exit_outcome(cmd: str, status: int, stderr: bytes) -> Outcome:
    """A command that exited with ``status`` (minus a signal number) other than 0."""
    name = command_name(cmd)
    said = sanitize(stderr.decode("utf-8", "replace").strip().split("\n")[0][:200])
    tail = f"\nhook said: {said}\n" if said else "\n"
    if status == 100:
        return Outcome(Verdict.FAILURE,
                       f"before-remote hook {name} refused the message (exit 100). (#5.3.0){tail}")
    if status == -signal.SIGXFSZ:
        return _deferral(f"before-remote hook {name} produced too much output. (#4.3.0){tail}")
    if status < 0:
        return _deferral(f"before-remote hook {name} crashed (signal {-status}); will retry. "
                         f"(#4.3.0){tail}")
    return _deferral(f"before-remote hook {name} failed (exit {status}); will retry. "
                     f"(#4.3.0){tail}")


def not_started(cmd: str, why: str) -> Outcome:
    return _deferral(f"before-remote hook {command_name(cmd)} could not be started: {why}. "
                     "(#4.3.0)\n")


def timed_out(cmd: str) -> Outcome:
    return _deferral(f"before-remote hook {command_name(cmd)} timed out; will retry. (#4.3.0)\n")


def no_output(cmd: str) -> Outcome:
    return _deferral(f"before-remote hook {command_name(cmd)} produced no output. (#4.3.0)\n")


NOT_A_FILE = Outcome(Verdict.DEFERRAL,
                     "before-remote hook: the message is not a regular file. (#4.3.0)\n")
SANDBOX_FAILED = Outcome(Verdict.DEFERRAL, "before-remote hook failed in the sandbox. (#4.3.0)\n")
UNAVAILABLE = Outcome(Verdict.DEFERRAL, "before-remote hook could not be run: sandbox unavailable; "
                                        "will retry. (#4.3.0)\n")


def _deferral(text: str) -> Outcome:
    return Outcome(Verdict.DEFERRAL, text)


def parse_commands(text: str | None) -> tuple[str, ...]:
    """control/beforemote: one command per line; ``#`` and empty lines ignored."""
    if not text:
        return ()
    lines = (ln.strip() for ln in text.split("\n"))
    return tuple(ln for ln in lines if ln and not ln.startswith("#"))
