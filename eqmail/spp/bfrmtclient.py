"""The before-remote hook (eQmail's qmail-bfrmt): the remote worker's side of the sandbox.

Owns: :func:`run_chain`, which the remote delivery worker (eqmailr) calls to have a
message passed through the hooks of ``control/beforemote`` (their format, environment,
bounds and reports are eqmail.delivery.bfrmt's).  The commands never run in the remote
worker: they run in the plugin sandbox worker (eqmailp; eqmail.spp.beforemote), reached
over run/sandbox-remote.sock (mode 0600, owner eqmailr).  The remote worker opens the
message and sends the open fd (SCM_RIGHTS), so the sandbox's user needs no access to
the queue; the sandbox answers with the fd of an unlinked temporary file holding the
hooks' output, which is copied here into a file of the remote worker's own before any
SMTP starts (nothing the sandbox's processes do afterwards can change what is sent).

Outputs: a :data:`~eqmail.delivery.bfrmt.HookResult` — the final message in an unlinked
temporary file, or the hooks' deferral or failure (eqmail.delivery.bfrmt.exit_outcome
and the others there).  A sandbox that cannot be reached, breaks the protocol or does
not answer in time -> a deferral (retry): the hooks
are never run here instead, a failing hook never sends a truncated message and never
sends twice (eQmail's fallback could).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from eqmail.delivery.bfrmt import UNAVAILABLE, HookResult, output_limit
from eqmail.instance import Instance
from eqmail.ipc.sandbox import (
    BFRMT,
    BFRMT_ANSWER,
    BfrmtAnswer,
    BfrmtRequest,
    ProtocolError,
    recv_frame_fds,
    send_frame_fds,
)
from eqmail.log import log

REMOTE_SOCKET = "sandbox-remote.sock"  # in the instance's run/
CONNECT_TIMEOUT = 10.0
COPY_CHUNK = 1 << 20


def _unavailable(why: str) -> HookResult:
    log(f"warning: before-remote hook not run: sandbox {why}")
    return UNAVAILABLE


def run_chain(commands: tuple[str, ...], host: str, sender: str, recipient: str,
              message: BinaryIO, message_size: int, root: Path, timeout: int) -> HookResult:
    """Run every command in order, in the sandbox of the instance at ``root``; the
    message is read (through a file description of its own), never modified."""
    path = str(Instance(root).run / REMOTE_SOCKET)
    request = BfrmtRequest(commands, (host, sender, recipient), float(timeout)).encode()
    try:
        # A file description of its own: the sandbox moves its offset, not ours.
        fd = os.open(f"/proc/self/fd/{message.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return _unavailable(f"not given the message: {e.strerror}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(path)
            send_frame_fds(sock, BFRMT, request, [fd])
            os.close(fd)
            fd = -1
            sock.settimeout(len(commands) * (timeout + 10) + CONNECT_TIMEOUT)
            got = recv_frame_fds(sock, BFRMT_ANSWER, 1)
    except (OSError, ProtocolError) as e:  # TimeoutError is an OSError
        return _unavailable(f"{path}: {e!r}")
    finally:
        if fd >= 0:
            os.close(fd)
    if got is None:
        return _unavailable("closed the connection")
    payload, fds = got
    try:
        answer = BfrmtAnswer.decode(payload)
        if answer.failure is not None:
            return answer.failure
        if len(fds) != 1:
            return _unavailable("answered without the output")
        return _private_copy(fds[0], output_limit(message_size))
    except ProtocolError as e:
        return _unavailable(repr(e))
    finally:
        for received in fds:
            os.close(received)


def _private_copy(fd: int, limit: int) -> HookResult:
    """The hooks' output, copied into a file only this process has."""
    st = os.fstat(fd)
    size = st.st_size
    if not stat.S_ISREG(st.st_mode) or not 0 < size < limit:
        return _unavailable("answered with a bad output file")
    out = tempfile.TemporaryFile()
    try:
        done = 0
        while done < size:
            n = _copy(fd, out.fileno(), done, min(COPY_CHUNK, size - done))
            if n == 0:
                out.close()
                return _unavailable("output file shrank")
            done += n
    except OSError as e:
        out.close()
        return _unavailable(f"output not readable: {e.strerror}")
    out.seek(0)
    return out


def _copy(src: int, dst: int, offset: int, count: int) -> int:
    try:
        return os.copy_file_range(src, dst, count, offset, offset)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, count, offset)
    return os.pwrite(dst, data, offset) if data else 0

