"""checkpassword in the plugin sandbox: one AUTH check with DJB's interface, bounded.

Owns: starting the listener's checkpassword program (argv from its ``checkpassword=``
option) for one ``P`` request of run/sandbox.sock.  Runs in the sandbox worker (user
eqmailp) on its event loop; never in the listener, which keeps the 535 delay, the
AUTH limiter and the replies (eqmail.smtp.checkpw).

The program gets ``user\\0password\\0challenge\\0`` on fd 3 (a pipe), /dev/null on fds
0 and 1, the log on fd 2 and no other fd; its environment is exactly the session's
(plus PATH when it has none, added by the listener); its cwd is the instance root.  It
is started with ``os.posix_spawn`` in a session and process group of its own, with
default signal dispositions, an empty signal mask and the sandbox's rlimits set by
prlimit (CPU seconds = the timeout).  argv[0] is looked up in the session's PATH
first (as qmail-smtpd's execvp did), so a program that is missing or not executable
is reported as such (``454 oops, child won't start``) instead of as a failed check.
At the deadline (timeoutsmtpd), and after every run, the process group is killed.

Output: a CheckAnswer — OK (exit 0), FAILED (other exit), CRASHED (signal), TIMEOUT,
NO_CHILD (cannot start), NO_PIPE.  Never raises for the program's sake.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace

from eqmail.ipc.sandbox import CheckAnswer, CheckRequest, CheckResult
from eqmail.spp.runner import SIGDEF, Limits, kill_group, wait_exit

FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"


def _env(session_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in session_env.items()
           if k and "=" not in k and "\0" not in k and "\0" not in v}
    env.setdefault("PATH", FALLBACK_PATH)
    return env


def resolve(program: str, path: str) -> str | None:
    """execvp's lookup, done before the spawn so that "cannot execute" is known."""
    if "/" in program:
        ok = os.path.isfile(program) and os.access(program, os.X_OK)
        return program if ok else None
    return shutil.which(program, path=path)


async def check(req: CheckRequest, limits: Limits) -> CheckAnswer:
    env = _env(req.env)
    program = resolve(req.argv[0], env["PATH"])
    if program is None:
        return CheckAnswer(CheckResult.NO_CHILD)
    limits = replace(limits, cpu=max(1, math.ceil(req.timeout)))
    if limits.prlimit is None:
        cmd = list(req.argv)
    else:  # prlimit execs its argv[0] itself: give it the path found above
        cmd = limits.wrap([program, *req.argv[1:]])
        program = cmd[0]
    try:
        r, w = os.pipe()  # both close-on-exec; the child's fd 3 is a dup
    except OSError:
        return CheckAnswer(CheckResult.NO_PIPE)
    try:
        pid = os.posix_spawn(program, cmd, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, r, 3),
        ], setsid=True, setsigdef=SIGDEF, setsigmask=())
    except OSError:
        os.close(w)
        return CheckAnswer(CheckResult.NO_CHILD)
    finally:
        os.close(r)
    try:
        os.write(w, req.input)  # <= 16 KiB, below the pipe buffer: never blocks
    except OSError:
        pass  # the program exited without reading: its exit code decides
    finally:
        os.close(w)
    exited = False
    try:
        exited = await wait_exit(pid, req.timeout)
    finally:
        kill_group(pid)  # at the deadline, and whatever it left behind; leader unreaped
        if not exited:
            await wait_exit(pid, 5.0)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if not exited:
        return CheckAnswer(CheckResult.TIMEOUT, status)
    if status < 0:
        return CheckAnswer(CheckResult.CRASHED, status)
    return CheckAnswer(CheckResult.OK if status == 0 else CheckResult.FAILED, status)
