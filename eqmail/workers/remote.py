"""The remote delivery worker (qmail-rspawn + qmail-remote, eQmail's IPv6/TLS/AUTH/bfrmt).

Runs as eqmailr (group eqmail: reads queue/mess, owns queue/lock/tcpto).  Serves the
listening Unix socket the supervisor bound (``ctx.settings.socket_fd``, run/remote.sock,
mode 0600, owner eqmails); connections are accepted only from root, our own uid or the
scanner's uid (SO_PEERCRED).

Requests ``D``: ``slot\\0msgid\\0sender\\0recipient\\0`` (framing: eqmail.ipc); each is
answered exactly once with ``r``: ``slot\\0`` + the report qmail-rspawn would build from
qmail-remote's results (K/Z/D + text, ``\\n`` where qmail has newlines).

Beyond qmail: requests for the same message, sender and recipient domain that are
outstanding together (up to MAX_RCPTS) go in one SMTP transaction, each recipient still
getting its own report; an idle connection is kept for IDLE_SECONDS and reused (RSET)
for the next message to the same address.  At most ``concurrencyremote`` deliveries run
at once (threads); more requests wait here, still collecting recipients.

Deliveries outlive the scanner connection that asked for them: a restarted scanner
takes over those still waiting or running and their reports (eqmail.workers.jobs), so
none is sent twice.

Failures: an unexpected exception while delivering is a ``Z`` report, logged (our bug
must never bounce mail); a scanner that breaks the framing is dropped; a report for a
scanner connection that has gone waits for the next scanner (lost if this worker exits
first: the scanner then redoes that recipient).
"""

from __future__ import annotations

import hashlib
import os
import queue
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from eqmail.control import Controls
from eqmail.delivery import bfrmt
from eqmail.dns import PREF_CNAME, PREF_ROUTE, DnsFailure, Resolver, candidates, literal_ip
from eqmail.ipc import ProtocolError, accept_from
from eqmail.log import log, sanitize
from eqmail.netif import local_addresses
from eqmail.queue import tcpto
from eqmail.smtp.client import (
    Destination,
    Quit,
    RetryClear,
    SmtpSession,
    TryNext,
    dropped_text,
    quote_address,
    rspawn_report,
)
from eqmail.smtp.transport import Dropped, TlsConfig, Transport, connect, counts_for_tcpto
from eqmail.textio import decode
from eqmail.workers.base import RemoteSettings, WorkerContext, drain_wake_pipe
from eqmail.workers.jobs import JobBoard, ScannerClients

MAX_RCPTS = 100  # RFC 5321's minimum a server must accept in one transaction
GATHER = 0.02  # a new batch waits this long for the scanner's other recipients of it
ME_REFRESH = 60.0


@dataclass
class Request:
    slot: bytes
    msgid: int
    sender: str
    recipient: str


@dataclass
class Batch:
    key: tuple[int, str, str]
    requests: list[Request] = field(default_factory=list)
    born: float = field(default_factory=time.monotonic)


class RemoteWorker(ScannerClients):
    """The socket loop: framing, grouping, the thread pool, reports."""

    def __init__(self, ctx: WorkerContext[RemoteSettings]) -> None:
        self.ctx = ctx
        self.controls: Controls = ctx.controls
        self.sel = selectors.DefaultSelector()
        self.clients: dict[socket.socket, bytearray] = {}
        self.board = JobBoard()
        self.role = "remote delivery"
        self.open: dict[tuple[int, str, str], Batch] = {}  # may still take recipients
        self.order: list[Batch] = []  # not started yet, oldest first
        self.running = 0
        self.limit = max(1, self.controls.concurrencyremote)
        self.pool = ThreadPoolExecutor(self.limit, thread_name_prefix="remote")
        self.done: queue.SimpleQueue[list[tuple[Request, str]]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = False
        self.tcpto_path = ctx.instance.queue / "lock" / "tcpto"
        self.tcpto = tcpto.Tcpto(self.tcpto_path)
        self.me = local_addresses()
        self.me_when = time.monotonic()
        self.cache = ConnectionCache(self.limit)
        c = self.controls
        self.tls = TlsConfig(ctx.instance.control, c.tlsclientciphers, c.clientcert,
                             c.tlshosts, c.tlshosts_exhaustive, c.notlshosts)

    # ------------------------------------------------------------ requests
    def handle_request(self, conn: socket.socket, payload: bytes) -> None:
        parts = payload.split(b"\0")
        if len(parts) < 5:
            raise ProtocolError("malformed delivery request")
        slot, msgid_b, sender_b, recip_b = parts[:4]
        if not self.board.start(conn, slot):
            return  # waiting or running already (a restarted scanner asked again), or reported
        if not msgid_b.isdigit() or len(msgid_b) > 20:
            self.board.finish(slot, "DSorry, message id is not valid. (#5.3.5)\n")
            return
        recipient = decode(recip_b)
        req = Request(slot, int(msgid_b), decode(sender_b), recipient)
        if self.stopping:
            self.board.finish(slot, "ZRemote delivery is stopping; will retry. (#4.3.0)\n")
            return
        domain = recipient.rpartition("@")[2].lower()
        key = (req.msgid, req.sender, domain)
        batch = self.open.get(key)
        if batch is None:
            batch = self.open[key] = Batch(key)
            self.order.append(batch)
        batch.requests.append(req)
        if len(batch.requests) >= MAX_RCPTS:
            del self.open[key]  # full: it goes out as it is; the next one starts a new one

    def dispatch(self) -> None:
        """Start waiting batches while threads are free (oldest first).  A batch waits
        GATHER seconds first: the scanner sends one frame per recipient."""
        ripe = time.monotonic() - GATHER
        while self.order and self.running < self.limit:
            if self.order[0].born > ripe and self.order[0].key in self.open and not self.stopping:
                return
            batch = self.order.pop(0)
            if self.open.get(batch.key) is batch:
                del self.open[batch.key]
            self.running += 1
            self.pool.submit(self._work, batch)

    def _work(self, batch: Batch) -> None:
        """In a pool thread: deliver, never raise."""
        reqs = batch.requests
        try:
            job = Job(self.controls, self.me, self.tcpto, self.cache, self.tls)
            reports = deliver_batch(job, self.ctx.instance.root, reqs[0].msgid, reqs[0].sender,
                                    [r.recipient for r in reqs])
            results = list(zip(reqs, reports, strict=True))
        except Exception as e:  # our bug must never bounce mail: defer, and say so
            log(f"warning: remote delivery of message {reqs[0].msgid} raised {e!r}")
            results = [(r, "ZTemporary failure in remote delivery. (#4.3.0)\n") for r in reqs]
        self.done.put(results)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def collect(self) -> None:
        drain_wake_pipe(self.wake_r)
        while True:
            try:
                results = self.done.get_nowait()
            except queue.Empty:
                return
            self.running -= 1
            for req, report in results:
                self.board.finish(req.slot, report)

    # ------------------------------------------------------------ loop
    def serve(self) -> int:
        self.listener = socket.socket(fileno=self.ctx.settings.socket_fd)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        tcpto.clear(self.tcpto_path, create=True)  # qmail-rspawn's tcpto_clean at start
        self.ctx.ready()
        while not (self.stopping and self.running == 0 and not self.order):
            for key, _ in self.sel.select(GATHER if self.order else 1.0):
                if key.data == "listen":
                    self.accept()
                elif key.data == "wake":
                    self.collect()
                else:
                    self.client_data(key.fileobj)  # type: ignore[arg-type]
            self.dispatch()
            self.housekeeping()
        self.cache.close_all()
        self.pool.shutdown(wait=True)
        return 0

    def housekeeping(self) -> None:
        self.cache.expire()
        now = time.monotonic()
        if now - self.me_when > ME_REFRESH:
            self.me, self.me_when = local_addresses(), now

    def on_term(self, *_: object) -> None:
        self.stopping = True
        try:
            os.write(self.wake_w, b"x")  # end the select() now, not at its timeout
        except OSError:
            pass

    def accept(self) -> None:
        conn = accept_from(self.listener, {0, os.getuid(), self.ctx.ids["send"].uid})
        if conn is not None:
            self.clients[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, "client")



# ---------------------------------------------------------------- delivery (pool threads)

IDLE_SECONDS = 5.0  # how long an idle connection is kept for reuse
TEMP_NOCONN = "ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
TEMP_READ = "ZUnable to read message. (#4.3.0)\n"
TEMP_CONTROL = "ZUnable to read control files. (#4.3.0)\n"
PERM_PARTIAL = "DSMTP cannot transfer messages with partial final lines. (#5.6.2)\n"


class ConnectionCache:
    """Idle SMTP sessions by destination (address, port, host name, credentials)."""

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.idle: list[tuple[float, SmtpSession]] = []
        self.limit = limit

    def take(self, dest: Destination) -> SmtpSession | None:
        while True:
            with self.lock:
                found = [i for i, (_, s) in enumerate(self.idle) if s.dest == dest]
                if not found:
                    return None
                _, session = self.idle.pop(found[-1])
            if session.rset():
                return session
            session.close(send_quit=False)

    def put(self, session: SmtpSession) -> None:
        with self.lock:
            self.idle.append((time.monotonic(), session))
            old = self.idle[: max(0, len(self.idle) - self.limit)]
            del self.idle[: len(old)]
        for _, s in old:
            s.close()

    def expire(self) -> None:
        limit = time.monotonic() - IDLE_SECONDS
        with self.lock:
            old = [s for when, s in self.idle if when < limit]
            self.idle = [(w, s) for w, s in self.idle if w >= limit]
        for s in old:
            s.close()

    def close_all(self) -> None:
        with self.lock:
            old, self.idle = self.idle, []
        for _, s in old:
            s.close()


_local = threading.local()


def _resolver(c: Controls) -> Resolver:
    """One resolver per thread (its deadline is per resolution)."""
    lifetime = float(min(c.timeoutconnect, 30))
    key = (c.dnsservers, lifetime)
    if getattr(_local, "key", None) != key:
        _local.resolver, _local.key = Resolver(c.dnsservers, lifetime), key
    return _local.resolver  # type: ignore[no-any-return]


@dataclass
class Job:
    """What one delivery needs besides the message."""

    controls: Controls
    me: frozenset[str]
    tcpto: tcpto.Tcpto
    cache: ConnectionCache
    tls: TlsConfig


def deliver_batch(job: Job, root: Path, msgid: int, sender: str,
                  recipients: list[str]) -> list[str]:
    """qmail-rspawn's report for each recipient (all of one message, sender, domain)."""
    path = root / "queue" / "mess" / str(msgid % 23) / str(msgid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return [TEMP_READ] * len(recipients)
    with os.fdopen(fd, "rb") as message:
        size = os.fstat(fd).st_size
        domain = recipients[0].rpartition("@")[2]
        reports = [""] * len(recipients)
        for idxs, body, failure in _bodies(job, root, domain, sender, recipients, message, size):
            try:
                texts = [failure] * len(idxs) if body is None else _send(
                    job, domain, sender, [recipients[i] for i in idxs], body)
            finally:
                if body is not None and body is not message:
                    body.close()
            for i, text in zip(idxs, texts, strict=True):
                reports[i] = text
    return reports


def _bodies(job: Job, root: Path, domain: str, sender: str, recipients: list[str],
            message: BinaryIO, size: int) -> list[tuple[list[int], BinaryIO | None, str]]:
    """The message each recipient gets: the stored one, or what the before-remote hooks
    made of it — recipients whose hook output is identical share one transaction."""
    commands = job.controls.beforemote
    if not commands:
        return [(list(range(len(recipients))), message, "")]
    groups: dict[bytes, tuple[list[int], BinaryIO]] = {}
    out: list[tuple[list[int], BinaryIO | None, str]] = []
    for i, rcpt in enumerate(recipients):
        res = bfrmt.run_chain(commands, domain, sender, rcpt, message, size, root,
                              job.controls.timeoutremote)
        if res.output is None:
            out.append(([i], None, res.report))
            continue
        digest = _digest(res.output)
        if digest in groups:
            groups[digest][0].append(i)
            res.output.close()
        else:
            groups[digest] = ([i], res.output)
    return out + [(idxs, body, "") for idxs, body in groups.values()]


def _digest(f: BinaryIO) -> bytes:
    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(1 << 16):
        h.update(chunk)
    f.seek(0)
    return h.digest()


def _partial_final_line(body: BinaryIO) -> bool:
    end = body.seek(0, os.SEEK_END)
    if end == 0:
        return False
    body.seek(end - 1)
    last = body.read(1)
    body.seek(0)
    return last != b"\n"


def _send(job: Job, domain: str, sender: str, recipients: list[str], body: BinaryIO) -> list[str]:
    """Resolve, connect and run one transaction: reports for these recipients."""
    c = job.controls
    n = len(recipients)
    if _partial_final_line(body):
        return [PERM_PARTIAL] * n  # found before any DNS or SMTP, unlike qmail-remote
    if not c.helohost:
        return [TEMP_CONTROL] * n
    route = c.route_for(domain)
    if route is not None and not route.relay:
        route = None  # qmail: an empty relay means "look up MX as usual"
    resolver = _resolver(c)
    try:
        if route is not None:
            addrs = candidates(resolver.host_addresses(route.relay), job.me, PREF_ROUTE)
            rcpt_domain = domain
        else:
            rcpt_domain = resolver.canonical(domain)
            aliased = rcpt_domain.lower() != domain.lower()
            addrs = candidates(resolver.mx_addresses(domain), job.me,
                               PREF_CNAME if aliased else None)
    except DnsFailure as e:
        return [e.report] * n
    rcpts = [quote_address(r.rpartition("@")[0] + "@" + rcpt_domain) for r in recipients]
    port = route.port if route is not None else 25
    user = route.user if route is not None else None
    password = route.password if route is not None else None
    ip_relay = relay_tls_name(route.relay) if route is not None else ""
    dests = [Destination(a.ip, port, ip_relay or a.host, user, password, port == 465)
             for a in addrs]
    rcpt_reports, message = _deliver(job, dests, quote_address(sender) if sender else "", rcpts, body)
    if rcpt_reports is None:
        return [rspawn_report(None, message)] * n
    return [rspawn_report(r, message) for r in rcpt_reports]


def relay_tls_name(relay: str) -> str:
    """The name a relay given as an IP address goes by for TLS (tlshosts/<name>.pem,
    notlshosts/<name>, the certificate check): the address as written in smtproutes,
    without brackets or an ``IPv6:`` prefix, lower case — ``[127.0.0.1]`` and
    ``127.0.0.1`` -> ``127.0.0.1``, ``[IPv6:2001:DB8::1]`` -> ``2001:db8::1``.  "" for
    a relay given by name (its addresses carry that name already)."""
    if literal_ip(relay) is None:
        return ""
    text = relay[1:-1] if relay.startswith("[") and relay.endswith("]") else relay
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    return text.lower()


def _deliver(job: Job, dests: list[Destination], sender: str, rcpts: list[str],
             body: BinaryIO) -> tuple[list[str] | None, str]:
    """qmail-remote's connection loop: the first address that answers gets the message."""
    for dest in dests:
        if job.tcpto.blocked(dest.ip):
            continue
        session = job.cache.take(dest)
        if session is None:
            try:
                session = _open(job, dest)
            except Quit as q:
                return None, q.report
            if session is None:
                continue
        body.seek(0)
        try:
            rcpt_reports, message = session.transaction(sender, rcpts, body)
        except BaseException:  # e.g. the message became unreadable: never leak the socket
            session.close(send_quit=False)
            raise
        if session.usable:
            job.cache.put(session)
        else:
            session.close(send_quit=False)
        return rcpt_reports, message
    return None, TEMP_NOCONN


def _open(job: Job, dest: Destination) -> SmtpSession | None:
    """Connect and greet; None = try the next address; Quit = a terminal report."""
    c = job.controls
    for allow_tls in (True, False):
        try:
            sock = connect(dest.ip, dest.port, c.timeoutconnect)
        except OSError as e:
            if counts_for_tcpto(e):
                job.tcpto.record(dest.ip, failed=True)
            return None
        job.tcpto.record(dest.ip, failed=False)
        session = SmtpSession(Transport(sock, c.timeoutremote), dest, c.helohost, job.tls)
        try:
            session.open(allow_tls)
            return session
        except TryNext:
            return None
        except RetryClear as e:
            log(f"remote: TLS handshake with {dest.ip} failed ({sanitize(str(e))[:200]}); "
                "retrying in clear text")
            continue
        except Quit:
            session.close(send_quit=False)
            raise
        except Dropped:
            session.close(send_quit=False)
            raise Quit(dropped_text(dest.ip, False)) from None
    return None


def run(ctx: WorkerContext[RemoteSettings]) -> int:
    worker = RemoteWorker(ctx)
    signal.signal(signal.SIGTERM, worker.on_term)
    threading.current_thread().name = "remote-main"
    return worker.serve()
