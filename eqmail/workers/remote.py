"""The remote delivery worker (qmail-rspawn), eQmail's IPv6/TLS/AUTH/bfrmt included.

Runs as eqmailr (group eqmail: reads queue/mess, owns queue/lock/tcpto).  The socket,
the scanner's frames, the reports and the stop are the delivery-worker skeleton's
(eqmail.workers.deliveryserver, serving the socket the supervisor bound,
``ctx.settings.socket_fd``, run/remote.sock); this module is its handler.  The SMTP
conversation itself is eqmail.delivery.remote (qmail-remote as a library).

Beyond qmail: requests for the same message, sender and recipient domain that are
outstanding together (up to MAX_RCPTS) go in one SMTP transaction (``handle(requests)
-> outcomes``), each recipient still getting its own report; an idle connection is
kept for eqmail.delivery.remote.IDLE_SECONDS and reused (RSET) for the next message to
the same address.  At most ``concurrencyremote`` deliveries run at once (threads);
more requests wait here, still collecting recipients.

DKIM (issue 16): this worker is the one process that reads the private keys
(control/dkim/, owner eqmailr, mode 0400); one :class:`eqmail.dkim.signer.OutboundSigner`
holds the loaded keys for every pool thread, and each batch passes the message's
origin (the request's ``origin`` option, from the queue) to the signing step of
eqmail.delivery.remote.

Outbound TLS policy (issue 17): MTA-STS policies are asked of the policy worker
(run/policy.sock, :class:`eqmail.delivery.stsclient.StsClient`), DANE's TLSA records
of control/dnsservers (trusted with control/dnssec); the request's ``requiretls``
option (RFC 8689, from the queue) is passed on; each session's TLS result is recorded
under the instance root for TLS-RPT (eqmail.delivery.tlsrpt).

Failures: an unexpected exception while delivering is a deferral, logged (our bug
must never bounce mail); a request that arrives while the worker stops is deferred.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from eqmail.control import Controls
from eqmail.delivery.remote import ConnectionCache, RemoteJob, deliver_batch
from eqmail.delivery.stsclient import StsClient
from eqmail.dkim.signer import OutboundSigner
from eqmail.ipc.delivery import Channel, DeliveryRequest, Outcome, Verdict
from eqmail.ipc.queue import Origin
from eqmail.log import log
from eqmail.netif import local_addresses
from eqmail.queue import tcpto
from eqmail.smtp.transport import TlsConfig
from eqmail.spp import bfrmtclient
from eqmail.workers.base import RemoteSettings, WorkerContext
from eqmail.workers.deliveryserver import DeliveryServer

STS_WAIT = 15  # seconds a first MTA-STS policy fetch may hold a delivery up (bounded)
MAX_RCPTS = 100  # RFC 5321's minimum a server must accept in one transaction
GATHER = 0.02  # a new batch waits this long for the scanner's other recipients of it
ME_REFRESH = 60.0
BUG = Outcome(Verdict.DEFERRAL, "Temporary failure in remote delivery. (#4.3.0)\n")
STOPPING = Outcome(Verdict.DEFERRAL, "Remote delivery is stopping; will retry. (#4.3.0)\n")


@dataclass
class Batch:
    key: tuple[int, str, str]
    requests: list[DeliveryRequest] = field(default_factory=list)
    born: float = field(default_factory=time.monotonic)


def request_origin(request: DeliveryRequest) -> Origin | None:
    """The message's origin from the request's options; None without one, or with a
    value this eqmail does not know (never signed)."""
    value = dict(request.options).get("origin")
    try:
        return Origin(value) if value is not None else None
    except ValueError:
        return None


class RemoteWorker:
    """qmail-rspawn: the remote delivery handler of the delivery-worker skeleton —
    grouping recipients into batches, the thread pool, the shared connection cache."""

    role = "remote delivery"
    channel = Channel.REMOTE
    bad_msgid = Outcome(Verdict.FAILURE, "Sorry, message id is not valid. (#5.3.5)\n")

    def __init__(self, ctx: WorkerContext[RemoteSettings], server: DeliveryServer) -> None:
        self.ctx = ctx
        self.server = server
        self.controls: Controls = ctx.controls
        self.open: dict[tuple[int, str, str], Batch] = {}  # may still take recipients
        self.order: list[Batch] = []  # not started yet, oldest first
        self.running = 0
        self.limit = max(1, self.controls.concurrencyremote)
        self.pool = ThreadPoolExecutor(self.limit, thread_name_prefix="remote")
        self.tcpto_path = ctx.instance.queue / "lock" / "tcpto"
        self.tcpto = tcpto.Tcpto(self.tcpto_path)
        self.me = local_addresses()
        self.me_when = time.monotonic()
        self.cache = ConnectionCache(self.limit)
        self.signer = OutboundSigner(ctx.instance.control)
        c = self.controls
        self.tls = TlsConfig(ctx.instance.control, c.tlsclientciphers, c.clientcert,
                             c.tlshosts, c.tlshosts_exhaustive, c.notlshosts)
        # MTA-STS policies come from the policy worker (issue 17): this process, which
        # holds the DKIM keys and reads the queue, makes no HTTPS request of its own
        self.sts = StsClient(ctx.instance.run / "policy.sock", float(STS_WAIT))

    def begin(self) -> None:
        tcpto.clear(self.tcpto_path, create=True)  # qmail-rspawn's tcpto_clean at start

    # ------------------------------------------------------------ requests
    def submit(self, request: DeliveryRequest) -> Outcome | None:
        if self.server.stopping:
            return STOPPING
        domain = request.recipient.rpartition("@")[2].lower()
        key = (request.msgid, request.sender, domain)
        batch = self.open.get(key)
        if batch is None:
            batch = self.open[key] = Batch(key)
            self.order.append(batch)
        batch.requests.append(request)
        if len(batch.requests) >= MAX_RCPTS:
            del self.open[key]  # full: it goes out as it is; the next one starts a new one
        return None

    def dispatch(self) -> None:
        """Start waiting batches while threads are free (oldest first).  A batch waits
        GATHER seconds first: the scanner sends one frame per recipient."""
        ripe = time.monotonic() - GATHER
        while self.order and self.running < self.limit:
            if (self.order[0].born > ripe and self.order[0].key in self.open
                    and not self.server.stopping):
                return
            batch = self.order.pop(0)
            if self.open.get(batch.key) is batch:
                del self.open[batch.key]
            self.running += 1
            self.pool.submit(self._work, batch)

    def handle(self, requests: list[DeliveryRequest]) -> list[Outcome]:
        """One batch (one message, sender and domain): an outcome per request, in order;
        never raises."""
        try:
            job = RemoteJob(self.controls, self.me, self.tcpto, self.cache, self.tls,
                            bfrmtclient.run_chain, self.signer, self.sts, self.ctx.instance.root)
            first = requests[0]
            return deliver_batch(job, self.ctx.instance, first.msgid, first.sender,
                                 [r.recipient for r in requests], request_origin(first),
                                 dict(first.options).get("requiretls") == "1")
        except Exception as e:  # our bug must never bounce mail: defer, and say so
            log(f"warning: remote delivery of message {requests[0].msgid} raised {e!r}")
            return [BUG] * len(requests)

    def _work(self, batch: Batch) -> None:
        """In a pool thread."""
        results = list(zip(batch.requests, self.handle(batch.requests), strict=True))
        self.server.call_from_thread(lambda: self._finished(results))

    def _finished(self, results: list[tuple[DeliveryRequest, Outcome]]) -> None:
        self.running -= 1
        for request, outcome in results:
            self.server.finish(request.slot, outcome)

    # ------------------------------------------------------------ the skeleton's hooks
    def timeout(self) -> float:
        return GATHER if self.order else 1.0

    def turn(self) -> None:
        self.dispatch()
        self.cache.expire()
        now = time.monotonic()
        if now - self.me_when > ME_REFRESH:
            self.me, self.me_when = local_addresses(), now

    def busy(self) -> bool:
        return self.running > 0 or bool(self.order)

    def close(self) -> None:
        self.cache.close_all()
        self.pool.shutdown(wait=True)


def run(ctx: WorkerContext[RemoteSettings]) -> int:
    threading.current_thread().name = "remote-main"
    server = DeliveryServer(ctx, ctx.settings.socket_fd, lambda server: RemoteWorker(ctx, server))
    return server.serve()
