"""checkpassword with DJB's interface (qmail-smtpd-auth): the rules, without the I/O.

The program (argv from the listener's ``checkpassword=`` option) gets
``user\\0password\\0challenge\\0`` on fd 3 and says yes by exiting 0.  Anything else it
does is its business: vchkpw-style programs and ``/bin/checkpassword`` work unchanged.
It runs in the plugin sandbox worker (eqmail.spp.checkpassword, user eqmailp), never in
the listener; the listener reaches it with eqmail.spp.checkpwclient, which sends the
request built here over run/sandbox.sock and maps the answer with the functions here.
The sandbox keeps the failure table shared by every listener (eqmail.authlimit); the
listener waits the 535 delay it answers.

Owns: :func:`check_request` — the ``P`` request (argv, the session's environment plus a
PATH when it has none — qmail-smtpd's run script had one — and the fd-3 bytes, at most
16 KiB, with the client address and the listener's control/authlimit), or the answer
when there is nothing to run; :func:`check_result` — the :class:`AuthCheck` for the
sandbox's answer; :func:`check_warning` — the log line that answer deserves.  Pure: no
sockets, no processes, no logging.

An :class:`AuthCheck`'s ``temporary`` is the 454 text when the program could not run,
crashed or timed out (eQmail's ``oops, ...`` replies), when the address is locked out
(``refused``: the program did not run) — and when the sandbox cannot be reached or does
not answer in time (then the check is *not* run in the listener instead): None otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.authlimit import LOCKED_TEXT, AuthLimit
from eqmail.ipc.sandbox import (
    MAX_CHECKPW_INPUT,
    CheckAnswer,
    CheckRequest,
    CheckResult,
)
from eqmail.log import sanitize
from eqmail.smtp import replies

MAX_INPUT = MAX_CHECKPW_INPUT
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

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


NO_CHILD = AuthCheck(False, replies.AUTH_NO_CHILD.text)  # nothing to run, or no sandbox


def check_request(argv: tuple[str, ...], env: dict[str, str], user: bytes, password: bytes,
                  challenge: bytes, timeout: float, client: str = "",
                  limit: AuthLimit | None = None) -> CheckRequest | AuthCheck:
    """The request for the sandbox, or the answer when no program is to run."""
    if not argv:
        return NO_CHILD
    data = user + b"\0" + password + b"\0" + challenge + b"\0"
    if len(data) > MAX_INPUT:
        return AuthCheck(False)
    env = dict(env)
    env.setdefault("PATH", DEFAULT_PATH)
    return CheckRequest(tuple(argv), env, data, float(timeout), client, limit)


def check_result(answer: CheckAnswer) -> AuthCheck:
    """What the sandbox's answer means for the session."""
    if answer.result is CheckResult.LOCKED:
        return AuthCheck(False, LOCKED_TEXT, refused=True)
    return AuthCheck(answer.result is CheckResult.OK, _TEMPORARY.get(answer.result),
                     answer.delay, answer.locked)


def check_warning(answer: CheckAnswer, argv: tuple[str, ...], timeout: float) -> str | None:
    """The log line for a program that did not say yes or no, else None."""
    if answer.result is CheckResult.TIMEOUT:
        return f"warning: checkpassword {sanitize(argv[0])}: timed out after {timeout:g}s"
    if answer.result in (CheckResult.OK, CheckResult.FAILED, CheckResult.LOCKED):
        return None
    return (f"warning: checkpassword {sanitize(argv[0])}: {answer.result.value} "
            f"({answer.status})")
