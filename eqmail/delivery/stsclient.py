"""The MTA-STS policy worker's client, in the remote delivery worker (eqmailr).

Owns: asking run/policy.sock (eqmail.ipc.policy) for a recipient domain's MTA-STS
policy, and a short in-process cache of the answers so that a busy domain does not
cost a round trip per message.  The policy text the worker sends is parsed again here
(eqmail.delivery.mtasts): what remote delivery enforces is what the domain published.

Inputs: the socket path and a time bound for one question (which covers a first fetch
of a policy by the worker, itself bounded).  Output: an
:class:`~eqmail.delivery.tlspolicy.StsLookup`.  Never raises for a domain's problems
or the worker's: a worker that is down, slow or speaks nonsense gives
``StsLookup(None, sts-policy-fetch-error, ...)`` — no policy, as a failed fetch with
nothing cached (RFC 8461 §5), and such an answer is not cached.  Thread-safe (the
remote worker's pool threads share one client).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from eqmail.delivery import mtasts
from eqmail.delivery.tlspolicy import ResultType, StsLookup, StsMode
from eqmail.ipc.policy import (
    ANSWER,
    REQUEST,
    LookupAnswer,
    LookupRequest,
    ProtocolError,
    read_frame,
    write_frame,
)

CACHE_SECONDS = 60.0   # an answer is reused this long (the worker checks the TXT id)
CACHE_MAX = 4096       # domains remembered; the oldest go first


def to_lookup(answer: LookupAnswer) -> StsLookup:
    """The StsLookup an answer means; a policy that does not parse (the worker never
    sends one) counts as sts-policy-invalid without a policy."""
    try:
        failure = None if answer.failure is None else ResultType(answer.failure)
    except ValueError:
        failure = ResultType.STS_POLICY_FETCH_ERROR
    if answer.policy is None:
        return StsLookup(None, failure, answer.detail)
    p = answer.policy
    parsed = mtasts.parse_policy(p.text.encode("utf-8", "surrogateescape"), p.id, p.fetched)
    if isinstance(parsed, mtasts.StsError):
        return StsLookup(None, parsed.result, parsed.detail)
    if parsed.mode is StsMode.NONE:
        return StsLookup(None, failure, answer.detail)
    return StsLookup(parsed, failure, answer.detail)


class StsClient:
    """Asks the policy worker (``run/policy.sock``) for a domain's policy."""

    def __init__(self, socket_path: Path, timeout: float, cache_seconds: float = CACHE_SECONDS) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, StsLookup]] = {}
        self._lock = threading.Lock()

    def lookup(self, domain: str) -> StsLookup:
        d = mtasts.normal_domain(domain)
        if d is None:
            return StsLookup(None)  # an IP literal or an impossible name: no policy
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(d)
            if hit is not None and hit[0] > now:
                if hit[1].policy is None or not hit[1].policy.expired(time.time()):
                    return hit[1]
        try:
            answer = self._ask(d)
        except (OSError, ProtocolError) as e:
            return StsLookup(None, ResultType.STS_POLICY_FETCH_ERROR,
                             f"MTA-STS policy worker unavailable: {e}")
        result = to_lookup(answer)
        with self._lock:
            if len(self._cache) >= CACHE_MAX:
                del self._cache[next(iter(self._cache))]
            self._cache[d] = (now + self.cache_seconds, result)
        return result

    def _ask(self, domain: str) -> LookupAnswer:
        deadline = time.monotonic() + self.timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            write_frame(sock, REQUEST, LookupRequest(domain).encode())
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(left)
            return LookupAnswer.decode(read_frame(sock, ANSWER))
