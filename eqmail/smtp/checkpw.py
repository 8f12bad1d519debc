"""checkpassword with DJB's interface (qmail-smtpd-auth): the listener's side.

The program (argv from the listener's ``checkpassword=`` option) gets
``user\\0password\\0challenge\\0`` on fd 3 and says yes by exiting 0.  Anything else it
does is its business: vchkpw-style programs and ``/bin/checkpassword`` work unchanged.
It runs in the plugin sandbox worker (eqmail.spp.checkpassword, user eqmailp), never in
the listener: this module sends one ``P`` request (argv, the session's environment plus
a PATH when it has none — qmail-smtpd's run script had one — and the fd-3 bytes,
at most 16 KiB, with the client address and the listener's control/authlimit) over
run/sandbox.sock and maps the answer.  The sandbox keeps the failure table shared by
every listener (eqmail.authlimit); the listener waits the 535 delay it answers.

Returns an :class:`AuthCheck`: ``temporary`` is the 454 text when the program could
not run, crashed or timed out (eQmail's ``oops, ...`` replies), when the address is
locked out (``refused``: the program did not run) — and when the sandbox cannot be
reached or does not answer in time (then the check is *not* run in the listener
instead): None otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.authlimit import LOCKED_TEXT, AuthLimit
from eqmail.ipc.sandbox import (
    CHECKPW,
    CHECKPW_ANSWER,
    MAX_CHECKPW_INPUT,
    CheckAnswer,
    CheckRequest,
    CheckResult,
    ProtocolError,
)
from eqmail.log import log, sanitize
from eqmail.smtp import replies
from eqmail.spp.client import call

MAX_INPUT = MAX_CHECKPW_INPUT
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
ANSWER_MARGIN = 15.0  # the sandbox's kill-and-reap after the timeout, and some slack

_TEMPORARY = {
    CheckResult.CRASHED: replies.AUTH_CHILD_CRASHED.text,
    CheckResult.TIMEOUT: replies.AUTH_CHILD_CRASHED.text,
    CheckResult.NO_CHILD: replies.AUTH_NO_CHILD.text,
    CheckResult.NO_PIPE: replies.AUTH_NO_PIPE.text,
}


@dataclass(frozen=True)
class AuthCheck:
    ok: bool
    temporary: str | None = None  # the 454 text
    delay: float = 0.0            # a failure: seconds to wait before the 535
    locked: bool = False          # a failure that locked the client address out
    refused: bool = False         # locked out already: the program was not run


async def run_checkpassword(sock_path: str, argv: tuple[str, ...], env: dict[str, str],
                            user: bytes, password: bytes, challenge: bytes,
                            timeout: float, client: str = "",
                            limit: AuthLimit | None = None) -> AuthCheck:
    """``client`` and ``limit``: count the check in the sandbox's failure table."""
    if not argv:
        return AuthCheck(False, replies.AUTH_NO_CHILD.text)
    data = user + b"\0" + password + b"\0" + challenge + b"\0"
    if len(data) > MAX_INPUT:
        return AuthCheck(False)
    env = dict(env)
    env.setdefault("PATH", DEFAULT_PATH)
    request = CheckRequest(tuple(argv), env, data, float(timeout), client, limit)
    try:
        payload = await call(sock_path, CHECKPW, request.encode(), CHECKPW_ANSWER,
                             timeout + ANSWER_MARGIN)
        answer = CheckAnswer.decode(payload)
    except (OSError, ProtocolError) as e:  # TimeoutError is an OSError
        log(f"warning: checkpassword: sandbox {sock_path}: {e!r}")
        return AuthCheck(False, replies.AUTH_NO_CHILD.text)
    if answer.result is CheckResult.LOCKED:
        return AuthCheck(False, LOCKED_TEXT, refused=True)
    if answer.result is CheckResult.TIMEOUT:
        log(f"warning: checkpassword {sanitize(argv[0])}: timed out after {timeout:g}s")
    elif answer.result is not CheckResult.OK and answer.result is not CheckResult.FAILED:
        log(f"warning: checkpassword {sanitize(argv[0])}: {answer.result.value} "
            f"({answer.status})")
    return AuthCheck(answer.result is CheckResult.OK, _TEMPORARY.get(answer.result),
                     answer.delay, answer.locked)
