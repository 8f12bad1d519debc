"""The listener's side of checkpassword: one ``P`` request over run/sandbox.sock.

Owns: :func:`run_checkpassword`, the I/O around eqmail.smtp.checkpw's rules.  Runs in
the listener (eqmaild), on its event loop; the program itself runs in the plugin sandbox
worker (eqmail.spp.checkpassword, user eqmailp), never here.

Inputs: the sandbox socket path, the listener's ``checkpassword=`` argv, the session's
environment, the AUTH user, password and challenge, the program's timeout, the client
address and the listener's control/authlimit.  Output: an
:class:`eqmail.smtp.checkpw.AuthCheck`.  Failures never raise: a sandbox that cannot be
reached, breaks the protocol or does not answer within the timeout plus
:data:`ANSWER_MARGIN` is logged and answers ``AUTH_NO_CHILD`` (454); the check is not
run in the listener instead.
"""

from __future__ import annotations

from eqmail.authlimit import AuthLimit
from eqmail.ipc.sandbox import CHECKPW, CHECKPW_ANSWER, CheckAnswer, ProtocolError
from eqmail.log import log
from eqmail.smtp.checkpw import NO_CHILD, AuthCheck, check_request, check_result, check_warning
from eqmail.spp.client import call

ANSWER_MARGIN = 15.0  # the sandbox's kill-and-reap after the timeout, and some slack


async def run_checkpassword(sock_path: str, argv: tuple[str, ...], env: dict[str, str],
                            user: bytes, password: bytes, challenge: bytes,
                            timeout: float, client: str = "",
                            limit: AuthLimit | None = None) -> AuthCheck:
    """``client`` and ``limit``: count the check in the sandbox's failure table."""
    request = check_request(argv, env, user, password, challenge, timeout, client, limit)
    if isinstance(request, AuthCheck):
        return request
    try:
        payload = await call(sock_path, CHECKPW, request.encode(), CHECKPW_ANSWER,
                             timeout + ANSWER_MARGIN)
        answer = CheckAnswer.decode(payload)
    except (OSError, ProtocolError) as e:  # TimeoutError is an OSError
        log(f"warning: checkpassword: sandbox {sock_path}: {e!r}")
        return NO_CHILD
    warning = check_warning(answer, argv, timeout)
    if warning is not None:
        log(warning)
    return check_result(answer)
