"""The MTA-STS policy worker (issue 17): answers the remote delivery worker's questions
"what is the MTA-STS policy of this domain" on run/policy.sock, and mails the TLS-RPT
reports once an hour.

Runs as eqmailt (role "policy", group nofiles): it talks to DNS and to web servers of
the receiving domains, so it holds nothing else — no queue access, no keys, no
control/ files but the world-readable ones.  It owns <root>/sts/ (mode 0700), the
policy cache (eqmail.workers.stscache, which also does the fetch and the lookup).

The socket: run/policy.sock, bound by the supervisor (mode 0600, owner eqmailr;
``ctx.settings.socket_fd``); when privileged only the remote worker's uid (and root) is
served (SO_PEERCRED, on top of the socket's mode) — anyone else is closed at once and
logged.  One request and one answer per connection (eqmail.ipc.policy), each served in
a thread of its own (at most MAX_CONNECTIONS at once; more wait to be accepted), since a
first fetch may take eqmail.workers.stscache.FETCH_SECONDS.  With control/mtasts 0 every
answer is "no policy".

TLS-RPT: about once an hour (the first time TLSRPT_FIRST seconds after its start) it
calls eqmail.workers.tlsrptsend.send_due(instance, controls, now) in a thread of its
own; an exception there is logged and the worker goes on.

Failures: a client that breaks the protocol is dropped (logged); an unexpected
exception while answering is logged and the client gets "no policy" with
sts-policy-fetch-error (delivery goes on as without a policy, RFC 8461 §5).  SIGTERM
stops accepting; answers in progress finish (bounded by the fetch time).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from eqmail.control import Controls
from eqmail.delivery.mtasts import StsError
from eqmail.delivery.tlspolicy import ResultType
from eqmail.dns import Resolver
from eqmail.instance import Instance
from eqmail.ipc.framing import peer_uid
from eqmail.ipc.policy import (
    ANSWER,
    REQUEST,
    LookupAnswer,
    LookupRequest,
    ProtocolError,
    read_frame,
    write_frame,
)
from eqmail.log import log
from eqmail.privsep.ids import Role
from eqmail.workers import stscache
from eqmail.workers.base import PolicySettings, WorkerContext

MAX_CONNECTIONS = 32
CLIENT_SECONDS = 5.0     # to read a request, and to write an answer
TLSRPT_FIRST = 300.0    # not at once: a restart or reload is no reason to mail
TLSRPT_EVERY = 3600.0
STS_DIR = "sts"


class PolicyServer:
    """The accept loop and its connection threads."""

    def __init__(self, sock: socket.socket, policies: stscache.Policies | None,
                 allowed_uids: frozenset[int] | None) -> None:
        self.sock = sock
        self.policies = policies  # None: control/mtasts 0
        self.allowed_uids = allowed_uids  # None: whoever can connect (unprivileged)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.threads: set[threading.Thread] = set()
        self.stop = threading.Event()

    def serve(self) -> None:
        while not self.stop.is_set():
            if not self.slots.acquire(timeout=1.0):
                continue
            try:
                readable, _, _ = select.select([self.sock], [], [], 1.0)
                conn = self.sock.accept()[0] if readable else None
            except OSError as e:
                if not isinstance(e, BlockingIOError):
                    log(f"warning: policy: accept: {e}")
                conn = None
            if conn is None:
                self.slots.release()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="policy-conn", daemon=True)
            self.threads.add(t)
            t.start()
        deadline = time.monotonic() + stscache.FETCH_SECONDS + 2 * CLIENT_SECONDS
        for t in list(self.threads):
            t.join(max(0.0, deadline - time.monotonic()))

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                uid = peer_uid(conn)
                if self.allowed_uids is not None and uid not in self.allowed_uids:
                    log(f"warning: policy: refused a connection from uid {uid}")
                    return
                conn.setblocking(True)
                conn.settimeout(CLIENT_SECONDS)
                request = LookupRequest.decode(read_frame(conn, REQUEST))
                answer = self.answer(request.domain)
                conn.settimeout(CLIENT_SECONDS)
                write_frame(conn, ANSWER, answer.encode())
        except (ProtocolError, OSError) as e:
            log(f"warning: policy: dropping a client: {e}")
        except Exception as e:  # never let a thread die silently
            log(f"warning: policy: serving a client failed: {e!r}")
        finally:
            self.threads.discard(threading.current_thread())
            self.slots.release()

    def answer(self, domain: str) -> LookupAnswer:
        if self.policies is None:
            return LookupAnswer(None)
        try:
            return self.policies.lookup(domain)
        except Exception as e:  # our bug: no policy this time, and the log says why
            log(f"warning: policy: lookup of {domain} failed: {e!r}")
            return LookupAnswer(None, ResultType.STS_POLICY_FETCH_ERROR.value,
                                "MTA-STS policy lookup failed")


SendDue = Callable[[Instance, Controls, float], int]


def tlsrpt_loop(ctx: WorkerContext[PolicySettings], stop: threading.Event,
                first: float = TLSRPT_FIRST, every: float = TLSRPT_EVERY,
                send_due: SendDue | None = None) -> None:
    """Mail the TLS-RPT reports that are due (``send_due``: eqmail.workers.tlsrptsend's),
    about once an hour, until ``stop``; never raises."""
    wait = first
    while not stop.wait(wait):
        wait = every
        try:
            send = send_due
            if send is None:
                from eqmail.workers import tlsrptsend

                send = tlsrptsend.send_due
            sent = send(ctx.instance, ctx.controls, time.time())
            if sent:
                log(f"policy: mailed {sent} TLS-RPT report(s)")
        except Exception as e:  # reports wait for the next hour; lookups go on
            log(f"warning: policy: sending TLS-RPT reports failed: {e!r}")


def make_policies(ctx: WorkerContext[PolicySettings]) -> stscache.Policies:
    cache = stscache.DiskCache(sts_dir(ctx.instance.root))
    cache.clean()
    tlsca = ctx.instance.control / "tlsca.pem"

    def fetcher(domain: str) -> bytes | StsError:
        # a resolver per fetch: Resolver keeps one deadline per resolution, and
        # fetches of different domains run at once in different threads
        r = Resolver(ctx.controls.dnsservers, lifetime=stscache.FETCH_SECONDS / 3)
        return stscache.fetch(domain, r, tlsca if ctx.controls.tlsca else None)

    return stscache.Policies(
        cache, lambda: Resolver(ctx.controls.dnsservers, lifetime=stscache.TXT_SECONDS), fetcher)


def run(ctx: WorkerContext[PolicySettings]) -> int:
    threading.current_thread().name = "policy-main"
    sock = socket.socket(fileno=os.dup(ctx.settings.socket_fd))
    sock.setblocking(False)
    allowed = None
    if ctx.ids.privileged:
        allowed = frozenset({ctx.ids[Role.REMOTE].uid, 0})
    policies = make_policies(ctx) if ctx.controls.mtasts else None
    server = PolicyServer(sock, policies, allowed)
    signal.signal(signal.SIGTERM, lambda *_: server.stop.set())
    reports = threading.Thread(target=tlsrpt_loop, args=(ctx, server.stop), name="tlsrpt",
                               daemon=True)
    reports.start()
    ctx.ready()
    server.serve()
    return 0


def sts_dir(root: Path) -> Path:
    """<root>/sts/, the policy cache (made by setup and by the supervisor at start)."""
    return root / STS_DIR
