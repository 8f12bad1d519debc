"""The SMTP listener worker: tcpserver + qmail-smtpd, running as eqmaild.

Accepts connections on the socket the supervisor bound (one listener per control/listen
line, one or more processes sharing its socket), applies control/tcp.smtp (deny: close
without a banner), builds tcpserver's environment, and drives one pure
:class:`eqmail.smtp.session.Session` per connection: bytes in, actions out.  Message
data is streamed to the queue writer as it arrives (never held whole).

Concurrency is tcpserver's ``-c``: at most ``concurrency`` sessions per listener line
(shared out among its ``processes``); a connection over the limit is accepted, told
``421 <greeting> too many connections, try again later (#4.3.2)`` and closed, never
left waiting unanswered in the kernel's accept queue.  Each client address (IPv4, or
IPv6 /64) may hold at most control/concurrencyperclient sessions over every listener
process (control/concurrencyperclientrelay for RELAYCLIENT clients), counted in the
supervisor's shared table (eqmail.connlimit); over it: ``421 ... (#4.7.0)``.  An SMTPS
connection is refused by closing it (no TLS handshake is spent on it).

A listener with ``proxy=`` (control/listen) serves only the load balancers it lists:
each connection must begin with a PROXY protocol header (v1 or v2, the pure parser of
eqmail.smtp.proxy), read before anything else -- peeked, then exactly the bytes the
parser took are read, so a TLS ClientHello or early commands stay in the socket --
within PROXY_TIMEOUT (or timeoutsmtpd if shorter).  The client it names replaces the
socket's peer for everything above (tcprules, RELAYCLIENT, TCPREMOTEIP/PORT, the
per-client and AUTH limits, the Received line); PROXYIP/PROXYPORT name the balancer
and every log line of the session ends in `` via BALANCER:PORT``.  A peer not listed,
or a header that is malformed, truncated, too long or too slow, gets the connection
closed without a byte (logged at most once a second per reason); the balancer's own
connections (``PROXY UNKNOWN``, v2 LOCAL: health checks) are served as the balancer.

Every read and write is bounded by timeoutsmtpd (``451 timeout (#4.4.2)``); besides,
a command line must be complete within timeoutsmtpd of its first byte and message data
keep control/mindatarate (eqmail.smtp.pace, 451 and close).  The session's error delay
(the Delay action) is an asyncio sleep of that session alone.  TLS (STARTTLS, SMTPS) is
done here with the session's
upgrade point; checkpassword (DJB fd-3 interface) runs in the plugin sandbox worker.
Failed AUTHs are counted per client address by the sandbox, for every listener process
(eqmail.authlimit, control/authlimit): the 535 comes after a growing delay, and an
address over the limit gets a 454 without its password being checked.  With
control/rcptchecklocal (default on) a local recipient is looked up at RCPT
(eqmail.delivery.mailbox, the rules local delivery uses) in a small thread pool, bounded
by LOOKUP_TIMEOUT; only a certain "no mailbox" refuses it.

Configuration: everything a session takes from control/ (tcprules, rcpthosts, limits,
tlsclients, authlimit, users/assign for the RCPT check, ...) comes from one Controls,
parsed by the supervisor, through one :class:`ListenerConfig`.  A session takes the
current one when it is accepted and keeps it; :meth:`Listener.reconfigure` puts a new
one in place for the sessions after it, so a reload need not replace a listener whose
socket, options and TLS files are unchanged.  The listener opens no control file.

A reload that keeps this listener (eqmail.supervisor.diff) pushes the new configuration
over the supervisor's channel (``ctx.settings.config_fd``, eqmail.ipc.config);
``Listener.reconfigure`` applies it and the answer tells the supervisor so.

Failure modes: a broken connection ends its session (a half-received message is
abandoned, so nothing is queued); an unexpected exception is logged and ends only
that session.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from eqmail.connlimit import ClientTable, Verdict, client_key
from eqmail.control import Controls, ListenerSpec
from eqmail.delivery.mailbox import LocalUsers
from eqmail.ipc import ProtocolError
from eqmail.ipc.config import ConfigApplied, ConfigReader, ConfigUpdate
from eqmail.ipc.worker import Closed, SessionCount
from eqmail.log import log
from eqmail.smtp import proxy, replies
from eqmail.smtp.proxy import ProxyError, ProxyHeader, ProxyParser
from eqmail.smtp.replies import Reply
from eqmail.smtp.tcpenv import tcp_environment
from eqmail.spp.config import PluginTableCache
from eqmail.tls import (
    ServerTLS,
)
from eqmail.workers.base import ListenerSettings, WorkerContext, stop_on_sigterm
from eqmail.workers.inbound import AUTH_THREADS, InboundChecker
from eqmail.workers.listenerconfig import LOOKUP_THREADS, ListenerConfig, RecipientCheck
from eqmail.workers.smtpconn import Connection, server_streams

REPORT_INTERVAL = 0.25  # seconds between session-count reports to the supervisor
SIBLING_GRACE = 0.05  # a full process of a multi-process listener lets a sibling accept first
REFUSE_BATCH = 64  # connections a full listener refuses per wake-up
PROXY_TIMEOUT = 5.0  # seconds a balancer has for its PROXY header (at most timeoutsmtpd)


class Listener:
    def __init__(self, ctx: WorkerContext[ListenerSettings], spec: ListenerSpec) -> None:
        self.ctx = ctx
        self.spec = spec
        self.root = ctx.instance.root
        self.sessions = 0
        self._report_pending = False
        # control/concurrencyperclient, shared by every listener process (None: no table)
        self.clients: ClientTable | None = ctx.settings.clients
        self.pid = os.getpid()
        self._refused: dict[str, tuple[float, int]] = {}
        # Built by the supervisor before the privilege drop (the key may be root-only).
        self.tls: ServerTLS | None = ctx.settings.tls
        # qmail-spp: control/smtpplugins (or SPPCONFFILE), re-read when it changes; the
        # plugins themselves run in the sandbox worker, never in this process.
        self.spp = PluginTableCache(self.root)
        self.sandbox_sock = str(ctx.instance.run / "sandbox.sock")
        if self.tls is not None and self.tls.error:
            log(f"warning: {spec.display_address}: TLS unavailable: {self.tls.error}")
        if self.tls is not None and self.tls.warning:
            log(f"warning: {spec.display_address}: {self.tls.warning}")
        # The RCPT check's threads and its "cannot tell" memory outlive a reconfigure.
        self.lookup_pool: ThreadPoolExecutor | None = None
        self.warned: set[str] = set()
        # control/authcheck's threads, and its one-at-a-time gate for spooled messages
        self.auth_pool: ThreadPoolExecutor | None = None
        self.auth_big = asyncio.Semaphore(1)
        self.config = self._configure(ctx.controls)

    def reconfigure(self, controls: Controls) -> None:
        """Make every session accepted from now on use ``controls``: tcprules, rcpthosts,
        badmailfrom, databytes and the other session limits, timeoutsmtpd, the greeting,
        tlsclients, authlimit, users/assign, locals and virtualdomains for the RCPT
        check, ...  Sessions in progress finish with the configuration they started
        with.  The AUTH failure counts are the sandbox's and stay as they are.

        Not picked up (the supervisor replaces the listener instead): this listener's
        own ListenerSpec (socket, options, processes, its rules= file *name*), and its
        TLS context — ``tlsserverciphers`` and the files in ``tlsfiles`` — which only
        root can load; the per-client table's size is the supervisor's too
        (eqmail.supervisor.diff.listener_diff says which listeners may stay)."""
        self.config = self._configure(controls)

    def _configure(self, c: Controls) -> ListenerConfig:
        for warning in c.warnings:  # a bad control/authlimit: defaults are used
            log(f"warning: {warning}")
        mailbox_check = None
        if c.rcptchecklocal:
            if self.lookup_pool is None:
                self.lookup_pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="rcptcheck")
            alias = self.ctx.ids["alias"]
            users = LocalUsers.build(c.assign, alias.uid, alias.gid, str(self.ctx.instance.alias))
            mailbox_check = RecipientCheck(c, users, self.lookup_pool, self.warned)
        return ListenerConfig.build(c, self.spec, client_ca=self.tls is not None and self.tls.client_ca,
                                    mailbox_check=mailbox_check, inbound=self._inbound(c))

    def _inbound(self, c: Controls) -> InboundChecker | None:
        """control/authcheck 1: the checks of eqmail.workers.inbound, with threads and a
        large-message gate that outlive a reconfigure; 0: none, and no lookups at all."""
        if not c.authcheck:
            return None
        if self.auth_pool is None:
            self.auth_pool = ThreadPoolExecutor(AUTH_THREADS, thread_name_prefix="authcheck")
        return InboundChecker(c, self.auth_pool, self.auth_big)

    def report_sessions(self) -> None:
        """Tell the supervisor how many sessions are open (for eqmailctl status), at
        most every REPORT_INTERVAL seconds (a write per connection showed in the
        profile); never blocks: a full pipe only means an update is skipped."""
        if self._report_pending:
            return
        self._report_pending = True
        asyncio.get_running_loop().call_later(REPORT_INTERVAL, self._send_sessions)

    def _send_sessions(self) -> None:
        self._report_pending = False
        fd = self.ctx.settings.status_fd
        if fd >= 0:
            try:
                os.write(fd, SessionCount(self.sessions).encode())
            except OSError:
                pass

    def report_closed(self) -> None:
        """Tell the supervisor this process accepts no more connections (a reload is
        complete only when every retired listener has said so)."""
        fd = self.ctx.settings.status_fd
        if fd >= 0:
            try:
                os.write(fd, Closed().encode())
            except OSError:
                pass

    def refuse(self, conn: socket.socket, reply: Reply | None, why: str, ip: str) -> None:
        """Answer ``reply`` instead of a greeting and close (no TLS for SMTPS, and no
        reply at all without ``reply``: just close).  Logged at most once a second per
        reason (``why``, a fixed text), with a count."""
        if reply is not None and ("SMTPS" not in dict(self.spec.env) or self.tls is None):
            try:
                conn.send(reply.wire())  # a few bytes into an empty socket buffer
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        conn.close()
        now = time.monotonic()
        since, count = self._refused.get(why, (0.0, 0))
        if now - since >= 1.0:
            log(f"qmail-smtpd: {why}: refused {count + 1} connection(s), the last from {ip}")
            self._refused[why] = (now, 0)
        else:
            self._refused[why] = (since, count + 1)

    # ------------------------------------------------------------ one connection
    async def serve(self, conn: socket.socket) -> None:
        cfg = self.config  # this session's configuration, whatever a reconfigure does later
        local, remote = conn.getsockname()[:2], conn.getpeername()[:2]
        balancer: tuple[str, int] | None = None  # the peer, when it relays a client
        header: ProxyHeader | None = None
        if self.spec.proxy:
            # proxy=: the header's client stands for the socket's peer everywhere after
            # this (tcprules, RELAYCLIENT, the environment, limits, Received).
            header = await self.proxy_header(conn, remote, cfg.timeout)
            if header is None:
                return
            if header.source is not None:
                balancer, remote = remote, header.source
        env = tcp_environment(dict(self.spec.env), local, remote, cfg.controls.me)
        via = ""
        if balancer is not None and header is not None:
            env.update(proxy.balancer_environment(balancer, header))
            via = proxy.via(balancer)
        if cfg.rules is not None:
            verdict = cfg.rules.match(env["TCPREMOTEIP"], env.get("TCPREMOTEHOST"))
            if not verdict.allow:
                conn.close()
                return
            env.update(verdict.env)
        if self.clients is None:
            await self._serve(conn, env, cfg, via)
            return
        c = cfg.controls
        limit = c.concurrencyperclientrelay if "RELAYCLIENT" in env else c.concurrencyperclient
        key = client_key(env["TCPREMOTEIP"])
        admitted = self.clients.admit(key, limit, self.pid)
        if admitted is Verdict.OVER:
            self.refuse(conn, replies.too_many_from_client(cfg.greeting),
                        "too many connections from one client", env["TCPREMOTEIP"] + via)
            return
        try:
            await self._serve(conn, env, cfg, via)
        finally:
            if admitted is Verdict.ADMITTED:
                self.clients.release(key, self.pid)

    async def proxy_header(self, conn: socket.socket, peer: tuple[str, int],
                           timeout: float) -> ProxyHeader | None:
        """The PROXY header on a ``proxy=`` listener, read within PROXY_TIMEOUT (or
        timeoutsmtpd if shorter) and not a byte further; None when the peer is not a
        trusted balancer or sent no valid header in time -- then the connection is
        closed without a reply and logged (no reply: a client that is not a balancer
        learns nothing, and a balancer's client gets the balancer's own error)."""
        ip = proxy.peer_text(peer[0])
        if not self.spec.trusts(ip):
            self.refuse(conn, None, "connection not from a proxy= balancer", ip)
            return None
        try:
            async with asyncio.timeout(min(timeout, PROXY_TIMEOUT)):
                return await read_proxy_header(conn)
        except ProxyError as e:
            why = e.reason.value
        except TimeoutError:
            why = "no PROXY header in time"
        except OSError:
            why = "connection failed before the PROXY header"
        self.refuse(conn, None, why, ip)
        return None

    async def _serve(self, conn: socket.socket, env: dict[str, str], cfg: ListenerConfig,
                     via: str = "") -> None:
        # SMTPS: TLS from the first byte.  The handshake must own the socket from the
        # start; a ClientHello read by a plain-text stream first would be lost.
        smtps = "SMTPS" in env and self.tls is not None and self.tls.available
        try:
            reader, writer = await server_streams(
                conn, self.tls.context if smtps and self.tls else None, cfg.timeout)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log(f"qmail-smtpd: TLS handshake failed from {env['TCPREMOTEIP']}{via}: "
                f"{str(e) or e.__class__.__name__}")
            conn.close()
            return
        conn_io = Connection(self, cfg, reader, writer, env, via=via)
        try:
            await conn_io.run()
        except Exception as e:  # one broken session must not hurt the others
            log(f"warning: smtp session from {env['TCPREMOTEIP']}{via}: {e!r}")
        finally:
            await conn_io.cleanup()


async def read_proxy_header(conn: socket.socket) -> ProxyHeader:
    """Read the PROXY header from the accepted, non-blocking ``conn``: peek, let the
    pure parser say how many of the peeked bytes are header, take exactly those.  What
    follows (a TLS ClientHello, early commands) stays in the socket for the session.
    ProxyError for a bad or truncated header; OSError if the connection breaks."""
    loop = asyncio.get_running_loop()
    parser = ProxyParser()
    while True:
        await _readable(loop, conn)
        try:
            data = conn.recv(parser.want(), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            parser.eof()  # raises: the connection ended inside (or before) the header
        taken = parser.feed(data)  # raises ProxyError on a bad header
        while taken:  # the peeked bytes are in the socket: recv returns them at once
            got = conn.recv(taken)
            if not got:
                raise ConnectionResetError("connection lost in the PROXY header")
            taken -= len(got)
        if parser.header is not None:
            return parser.header


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


def _refuse_backlog(listener: Listener, sock: socket.socket, conn: socket.socket, ip: str) -> None:
    """Full: answer ``conn`` and up to REFUSE_BATCH more waiting connections with 421
    (no await in between, so the listener stays full), so a flood is refused at the
    rate it arrives, not one connection per wake-up."""
    full = replies.too_many_connections(listener.config.greeting)
    for _ in range(REFUSE_BATCH):
        _refuse_full(listener, conn, full, ip)
        try:
            conn, addr = sock.accept()
        except OSError:  # BlockingIOError: nothing more is waiting
            return
        conn.setblocking(False)
        ip = str(addr[0])
    _refuse_full(listener, conn, full, ip)


def _refuse_full(listener: Listener, conn: socket.socket, full: Reply, ip: str) -> None:
    """The 421 of a full listener, except to a client a proxy= listener does not
    trust, which gets no reply at all (as when the listener has room)."""
    if listener.spec.proxy and not listener.spec.trusts(ip):
        listener.refuse(conn, None, "connection not from a proxy= balancer", proxy.peer_text(ip))
    else:
        listener.refuse(conn, full, "too many connections", ip)


async def _accept_loop(listener: Listener, sock: socket.socket, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    per_process = max(1, -(-listener.spec.concurrency // max(1, listener.spec.processes)))
    tasks: set[asyncio.Task[None]] = set()
    sock.setblocking(False)
    while not stop.is_set():
        if listener.sessions >= per_process and listener.spec.processes > 1:
            # Full: a sibling process with a free slot should take the next connection;
            # if none does within the grace, this one answers it with 421.
            await asyncio.sleep(SIBLING_GRACE)
        # Wait for readability, then accept synchronously (cancelling a pending
        # sock_accept task could drop one accepted in the same instant as the stop).
        readable: asyncio.Future[None] = loop.create_future()

        def wake(f: asyncio.Future[None] = readable) -> None:
            if not f.done():
                f.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        stopper: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        try:
            waiters: list[asyncio.Future[Any]] = [readable, stopper]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(sock.fileno())
            stopper.cancel()
        if stop.is_set():
            break
        try:
            conn, addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another process of this listener took it
        except OSError:
            await asyncio.sleep(0.05)
            continue
        conn.setblocking(False)
        if listener.sessions >= per_process:
            _refuse_backlog(listener, sock, conn, str(addr[0]))
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.sessions += 1
        listener.report_sessions()

        async def session(c: socket.socket = conn) -> None:
            try:
                await listener.serve(c)
            finally:
                listener.sessions -= 1
                listener.report_sessions()

        task = asyncio.ensure_future(session())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    # graceful stop: no new connections (closing our copy of the socket makes a removed
    # port refuse at once; the supervisor keeps the ones still listed); sessions in
    # progress finish (bounded by timeouts)
    sock.close()
    listener.report_closed()
    if tasks:
        await asyncio.wait(tasks)


def run(ctx: WorkerContext[ListenerSettings]) -> int:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    spec: ListenerSpec = ctx.settings.spec
    sock = socket.socket(fileno=ctx.settings.socket_fd)
    sock.set_inheritable(False)  # never leak it into checkpassword or plugins
    listener = Listener(ctx, spec)
    stop = asyncio.Event()
    stop_on_sigterm(loop, stop)
    os.umask(0o077)
    ctx.ready()
    loop.run_until_complete(_serve_until_stopped(listener, sock, stop, ctx.settings.config_fd))
    return 0


async def _serve_until_stopped(listener: Listener, sock: socket.socket, stop: asyncio.Event,
                               config_fd: int) -> None:
    receiver = asyncio.ensure_future(_receive_config(listener, config_fd, stop))
    try:
        await _accept_loop(listener, sock, stop)
    finally:
        receiver.cancel()
        try:
            await receiver
        except asyncio.CancelledError:
            pass


async def _receive_config(listener: Listener, fd: int, stop: asyncio.Event) -> None:
    """The supervisor's channel (eqmail.ipc.config): each ConfigUpdate is applied with
    ``reconfigure`` and answered with ConfigApplied.  A channel that breaks the
    protocol stops this process gracefully (sessions finish); the supervisor then
    starts a successor with the current configuration."""
    if fd < 0:
        return
    channel = socket.socket(fileno=fd)
    channel.set_inheritable(False)
    channel.setblocking(False)
    loop = asyncio.get_running_loop()
    reader = ConfigReader(b"U")
    try:
        while True:
            data = await loop.sock_recv(channel, 65536)
            if not data:
                return  # the supervisor is gone (and so will this process be)
            for update in reader.feed(data):
                assert isinstance(update, ConfigUpdate)
                listener.reconfigure(update.controls)
                await loop.sock_sendall(channel, ConfigApplied(update.generation).encode())
    except ProtocolError as e:
        log(f"alert: {listener.ctx.name}: configuration channel: {e}; stopping")
        stop.set()
    except OSError as e:
        log(f"alert: {listener.ctx.name}: configuration channel: {e.strerror}; stopping")
        stop.set()
    finally:
        channel.close()
