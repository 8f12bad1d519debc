"""Running a checkpassword program with DJB's interface (qmail-smtpd-auth).

The program (argv from the listener's ``checkpassword=`` option) gets
``user\\0password\\0challenge\\0`` on fd 3 and says yes by exiting 0.  Anything else it
does is its business: vchkpw-style programs and ``/bin/checkpassword`` work unchanged.
Its environment is the session's (TCPREMOTEIP etc.) plus a PATH when the session has
none (qmail-smtpd's run script had one; shell-script checkers need it).  Started with
posix_spawn (a Python fork of a big process costs milliseconds), in a session of its
own, bounded by a timeout after which its whole process group is killed.

Returns ``(ok, temporary_text)``: temporary_text is the 454 text when the program could
not run or crashed (eQmail's ``oops, ...`` replies), None otherwise.
"""

from __future__ import annotations

import asyncio
import os
import signal

from eqmail.smtp import replies

MAX_INPUT = 16 * 1024
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


async def wait_pid(pid: int, timeout: float) -> int | None:
    """Exit code (negative signal number) of ``pid``, or None after ``timeout``."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


async def run_checkpassword(argv: tuple[str, ...], env: dict[str, str], user: bytes,
                            password: bytes, challenge: bytes,
                            timeout: float) -> tuple[bool, str | None]:
    if not argv:
        return False, replies.AUTH_NO_CHILD.text
    data = user + b"\0" + password + b"\0" + challenge + b"\0"
    env = dict(env)
    env.setdefault("PATH", DEFAULT_PATH)
    if len(data) > MAX_INPUT:
        return False, None
    try:
        r, w = os.pipe()
    except OSError:
        return False, replies.AUTH_NO_PIPE.text
    try:
        pid = os.posix_spawnp(argv[0], list(argv), env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, r, 3),
        ], setsid=True)
    except OSError:
        return False, replies.AUTH_NO_CHILD.text
    finally:
        os.close(r)
    try:
        os.write(w, data)  # far below the pipe buffer: never blocks
    except OSError:
        pass  # the program exited without reading: its exit code decides
    finally:
        os.close(w)
    code = await wait_pid(pid, timeout)
    if code is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await wait_pid(pid, 5.0)
        return False, replies.AUTH_CHILD_CRASHED.text
    if code < 0:
        return False, replies.AUTH_CHILD_CRASHED.text
    return code == 0, None
