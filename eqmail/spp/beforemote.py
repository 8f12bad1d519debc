"""Before-remote (qmail-bfrmt) commands in the plugin sandbox: one chain, bounded.

Owns: running the commands of one ``B`` request of run/sandbox-remote.sock on a
message.  Runs in the sandbox worker (user eqmailp) in a pool thread (it blocks);
never in the remote delivery worker, which only sends the request
(eqmail.spp.bfrmtclient.run_chain).

Input: the commands (control/beforemote lines), host, sender and recipient, the
per-command timeout (timeoutremote) and the message as an fd received from the remote
worker: the sandbox's user has no access to the queue, only to this one open file.
Each command runs as ``/bin/sh -c COMMAND beforemote HOST SENDER RECIPIENT`` (the
addresses are arguments, never interpolated), started with ``os.posix_spawn`` in a
session and process group of its own, default signal dispositions, an empty signal
mask, the environment eqmail.delivery.bfrmt.HOOK_ENV and nothing else, cwd the
instance root, stdin the message (or the previous command's output, from offset 0),
stdout an unlinked temporary file, stderr another (its first line goes into the
report), no other fd.  rlimits by prlimit: the sandbox's (address space, open files,
processes, no core) plus CPU = timeout + 1 s and file size = the output bound
(2 × message + 1 MiB).  At the deadline, and after every command, its process group
is killed.

Output: an :data:`eqmail.delivery.bfrmt.HookResult` — the last command's output,
complete and non-empty, in an unlinked temporary file — or the deferral or failure
with its text (eqmail.delivery.bfrmt.exit_outcome and the others there).  Logged here,
where the hook ran.
"""

from __future__ import annotations

import os
import signal
import stat
import tempfile
from dataclasses import replace
from typing import BinaryIO

from eqmail.delivery.bfrmt import (
    HOOK_ENV,
    MAX_STDERR,
    NOT_A_FILE,
    HookResult,
    exit_outcome,
    no_output,
    not_started,
    output_limit,
    timed_out,
)
from eqmail.ipc.delivery import Outcome
from eqmail.log import log, sanitize
from eqmail.spp.runner import SIGDEF, Limits, kill_group, wait_exit_blocking


def run_chain(commands: tuple[str, ...], args: tuple[str, str, str], message_fd: int,
              timeout: float, limits: Limits) -> HookResult:
    """Every command in order, the output of one the input of the next."""
    st = os.fstat(message_fd)
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE
    limit = output_limit(st.st_size)
    stdin_fd = message_fd
    previous: BinaryIO | None = None
    for cmd in commands:
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        out = run_one(cmd, args, stdin_fd, limit, timeout, limits)
        if previous is not None:
            previous.close()
        if isinstance(out, Outcome):
            log(f"warning: {sanitize(out.text.strip())}")
            return out
        previous, stdin_fd = out, out.fileno()
    assert previous is not None
    return previous


def run_one(cmd: str, args: tuple[str, str, str], stdin_fd: int, limit: int,
            timeout: float, limits: Limits) -> HookResult:
    """One command; its output fully collected in an unlinked temporary file."""
    argv = ["/bin/sh", "-c", cmd, "beforemote", *args]
    wrapped = replace(limits, cpu=int(timeout) + 1, fsize=limit).wrap(argv)
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    try:
        pid = os.posix_spawn(wrapped[0], wrapped, HOOK_ENV, file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
        ], setsid=True, setsigdef=SIGDEF, setsigmask=())
    except OSError as e:
        out.close()
        err.close()
        return not_started(cmd, str(e.strerror))
    exited = False
    try:
        exited = wait_exit_blocking(pid, timeout)
    finally:
        kill_group(pid)  # at the deadline, and whatever it left behind; leader unreaped
        if not exited:
            wait_exit_blocking(pid, 5.0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    stderr = os.pread(err.fileno(), MAX_STDERR, 0)
    err.close()
    size = os.fstat(out.fileno()).st_size
    if not exited:
        out.close()
        return timed_out(cmd)
    if size >= limit or status == 128 + signal.SIGXFSZ:
        # RLIMIT_FSIZE stops the writer at the bound (SIGXFSZ; a shell reports it as
        # 128 + 25); without prlimit the size is checked here.
        status = -signal.SIGXFSZ
    if status != 0:
        out.close()
        return exit_outcome(cmd, status, stderr)
    if size == 0:
        out.close()
        return no_output(cmd)
    return out
