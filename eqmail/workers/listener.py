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
from eqmail.log import log, sanitize
from eqmail.queue.client import AsyncQueueClient
from eqmail.smtp import actions as A
from eqmail.smtp import replies
from eqmail.smtp.pace import Pace
from eqmail.smtp.replies import Reply
from eqmail.smtp.session import Session
from eqmail.smtp.tcpenv import session_config, tcp_environment
from eqmail.spp.checkpwclient import run_checkpassword
from eqmail.spp.client import run_hook
from eqmail.spp.config import PluginTableCache, SppConfigError
from eqmail.tls import (
    ServerTLS,
    bind_alert_socket,
    cipher_name,
    client_cert_email,
    freeze_plaintext,
)
from eqmail.workers.base import ListenerSettings, WorkerContext, stop_on_sigterm
from eqmail.workers.listenerconfig import LOOKUP_THREADS, ListenerConfig, RecipientCheck

READ_SIZE = 256 * 1024
REPORT_INTERVAL = 0.25  # seconds between session-count reports to the supervisor
SIBLING_GRACE = 0.05  # a full process of a multi-process listener lets a sibling accept first
REFUSE_BATCH = 64  # connections a full listener refuses per wake-up


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
                                    mailbox_check=mailbox_check)

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

    def refuse(self, conn: socket.socket, reply: Reply, why: str, ip: str) -> None:
        """Answer ``reply`` instead of a greeting and close (no TLS for SMTPS: just
        close).  Logged at most once a second per reason, with a count."""
        if "SMTPS" not in dict(self.spec.env) or self.tls is None:
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
        env = tcp_environment(dict(self.spec.env), local, remote, cfg.controls.me)
        if cfg.rules is not None:
            verdict = cfg.rules.match(env["TCPREMOTEIP"], env.get("TCPREMOTEHOST"))
            if not verdict.allow:
                conn.close()
                return
            env.update(verdict.env)
        if self.clients is None:
            await self._serve(conn, env, cfg)
            return
        c = cfg.controls
        limit = c.concurrencyperclientrelay if "RELAYCLIENT" in env else c.concurrencyperclient
        key = client_key(env["TCPREMOTEIP"])
        admitted = self.clients.admit(key, limit, self.pid)
        if admitted is Verdict.OVER:
            self.refuse(conn, replies.too_many_from_client(cfg.greeting),
                        "too many connections from one client", env["TCPREMOTEIP"])
            return
        try:
            await self._serve(conn, env, cfg)
        finally:
            if admitted is Verdict.ADMITTED:
                self.clients.release(key, self.pid)

    async def _serve(self, conn: socket.socket, env: dict[str, str], cfg: ListenerConfig) -> None:
        # SMTPS: TLS from the first byte.  The handshake must own the socket from the
        # start; a ClientHello read by a plain-text stream first would be lost.
        smtps = "SMTPS" in env and self.tls is not None and self.tls.available
        try:
            reader, writer = await _server_streams(
                conn, self.tls.context if smtps and self.tls else None, cfg.timeout)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log(f"qmail-smtpd: TLS handshake failed from {env['TCPREMOTEIP']}: "
                f"{str(e) or e.__class__.__name__}")
            conn.close()
            return
        conn_io = Connection(self, cfg, reader, writer, env)
        try:
            await conn_io.run()
        except Exception as e:  # one broken session must not hurt the others
            log(f"warning: smtp session from {env['TCPREMOTEIP']}: {e!r}")
        finally:
            await conn_io.cleanup()


async def _server_streams(conn: socket.socket, tls: ssl.SSLContext | None,
                          timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams for an accepted socket, made by a *server-side* stream protocol so that
    ``StreamWriter.start_tls`` does the server half of the handshake.  With ``tls``
    (SMTPS) the handshake is done first, bounded by ``timeout``."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = loop.create_future()

    def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        made.set_result((r, w))

    def protocol() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=READ_SIZE * 2), connected)

    # STARTTLS's handshake runs in the context the transport captures here.
    bind_alert_socket(conn.fileno())
    if tls is None:
        await loop.connect_accepted_socket(protocol, sock=conn)
    else:
        await asyncio.wait_for(loop.connect_accepted_socket(
            protocol, sock=conn, ssl=tls, ssl_handshake_timeout=timeout), timeout + 1)
    return await made


class Connection:
    """The I/O of one SMTP session."""

    def __init__(self, listener: Listener, cfg: ListenerConfig, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, env: dict[str, str]) -> None:
        self.l = listener
        self.cfg = cfg  # the configuration the session started with, to its end
        self.reader = reader
        self.writer = writer
        self.env = env
        self.queue: AsyncQueueClient | None = None
        self.message: A.BeginMessage | None = None
        self.closed = False
        tls = listener.tls
        self.spp_error = False
        try:
            self.plugins = listener.spp.for_session(env)
        except SppConfigError as e:
            log(f"warning: {e}")
            self.plugins = None
            self.spp_error = True
        session_cfg = session_config(cfg.controls, env, rcpthosts=cfg.rcpthosts,
                             badmailfrom=cfg.badmailfrom, local_ips=cfg.local_ips,
                             tls_available=tls is not None and tls.available,
                             auth_available=bool(listener.spec.checkpassword),
                             tls_client_relay=bool(cfg.tlsclients),
                             submission=listener.spec.service == "submission",
                             plugins_enabled=self.plugins is not None and not self.plugins.empty,
                             check_mailbox=cfg.mailbox_check is not None)
        self.session = Session(session_cfg, env, time.time)
        self.pace = Pace(cfg.timeout, cfg.controls.mindatarate)

    async def run(self) -> None:
        if self.spp_error:  # an unreadable smtplugins file: qmail-spp's 421
            log(self.session.log_line("unable to read controls"))
            self.writer.write(replies.UNABLE_TO_READ_CONTROLS.wire())
            await self._drain()
            return
        if "SMTPS" in self.env:
            if self.writer.get_extra_info("ssl_object") is None:  # no usable certificate
                await self._start_tls()  # eQmail: the TLS set-up error, then exit
                return
            await self._perform(self.session.tls_started(cipher_name(self.writer)))
        await self._perform(self.session.start())
        loop = asyncio.get_running_loop()
        while not self.closed and not self.session.closed:
            deadline = self.pace.next_read()
            began = loop.time()
            try:
                # asyncio.timeout, not wait_for: no extra task per read on the hot path
                async with asyncio.timeout(deadline.seconds):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                await self._timeout(deadline.reply, deadline.event)
                return
            except (ConnectionError, OSError):
                log(self.session.log_line("read failed"))
                await self._perform([A.AbortMessage()])
                return
            waited = loop.time() - began
            lines = self.session.lines
            actions = self.session.feed(data) if data else self.session.eof()
            await self._perform(actions)
            if not data:
                return
            self.pace.after_read(waited, len(data), partial_line=self.session.partial_line,
                                 line_done=self.session.lines != lines,
                                 in_data=self.session.in_data)

    async def _timeout(self, reply: Reply = replies.TIMEOUT, event: str = "timeout") -> None:
        log(self.session.log_line(event))
        await self._perform([A.AbortMessage()])
        try:
            self.writer.write(reply.wire())
            await asyncio.wait_for(self.writer.drain(), 5)
        except (OSError, TimeoutError):
            pass
        self.closed = True

    async def _perform(self, actions: list[A.Action]) -> None:
        pending = list(actions)
        if any(isinstance(a, A.StartTLS) for a in pending):
            freeze_plaintext(self.writer, self.reader)  # before the 220 goes out
        while pending:
            action = pending.pop(0)
            more = await self._do(action)
            if more:
                pending = more + pending
            if self.closed:
                return

    async def _do(self, action: A.Action) -> list[A.Action]:
        if isinstance(action, A.Send):
            self.writer.write(action.data)
            if self.writer.transport.get_write_buffer_size() > 64 * 1024:
                await self._drain()
            return []
        if isinstance(action, A.MessageData):
            assert self.queue is not None
            await self.queue.write(action.data)
            return []
        if isinstance(action, A.BeginMessage):
            if self.queue is None:
                self.queue = AsyncQueueClient(self.l.root)
            self.message = action
            await self.queue.write(action.header_prefix)
            return []
        if isinstance(action, A.EndMessage):
            return await self._end_message()
        if isinstance(action, A.AbortMessage):
            if self.queue is not None and self.message is not None:
                await self.queue.abandon()
            self.message = None
            return []
        if isinstance(action, A.Log):
            log(action.line)
            return []
        if isinstance(action, A.Delay):  # too many errors: this session waits, no other
            await asyncio.sleep(action.seconds)
            return []
        if isinstance(action, A.Close):
            await self._drain()
            self.closed = True
            return []
        if isinstance(action, A.CheckPassword):
            return await self._check_password(action)
        if isinstance(action, A.StartTLS):
            await self._drain()
            await self._start_tls()
            return []
        if isinstance(action, A.CheckClientCert):
            email, reason = client_cert_email(self.writer)
            if email is not None and email not in self.cfg.tlsclients:
                email, reason = None, "email address not in my list of tlsclients"
            return self.session.cert_result(email, reason)
        if isinstance(action, A.CheckMailbox):
            assert self.cfg.mailbox_check is not None
            found = await self.cfg.mailbox_check.found(action.address)
            return self.session.mailbox_result(found)
        if isinstance(action, A.RunHook):
            assert self.plugins is not None
            outcome = await run_hook(self.l.sandbox_sock, action.stage,
                                     self.plugins.for_stage(action.stage), self.session.env,
                                     plugin_timeout=self.cfg.controls.spptimeout)
            return self.session.hook_result(outcome)
        raise AssertionError(f"unknown action {action!r}")

    async def _drain(self) -> None:
        try:
            if self.writer.transport.get_write_buffer_size() == 0:
                return  # nothing queued: the usual case, no need to wait
            async with asyncio.timeout(self.cfg.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError):
            self.closed = True

    async def _end_message(self) -> list[A.Action]:
        assert self.queue is not None and self.message is not None
        msg, self.message = self.message, None
        await self._drain()  # replies before the 250 go out first
        result = await self.queue.finish(msg.sender, list(msg.recipients))
        return self.session.queue_result(A.QueueOutcome.of(result))

    async def _check_password(self, action: A.CheckPassword) -> list[A.Action]:
        ip = self.env["TCPREMOTEIP"]
        who = f"{action.method} {_printable(action.user)} from {ip}"
        # The program runs in the plugin sandbox, which also keeps the failure counts
        # of every listener; a locked-out address is refused there without a check.
        check = await run_checkpassword(
            self.l.sandbox_sock, self.l.spec.checkpassword, dict(self.session.env),
            action.user, action.password, action.challenge, timeout=self.cfg.timeout,
            client=ip, limit=self.cfg.authlimit)
        if check.refused:
            log(f"qmail-smtpd: auth refused (too many failures): {who}")
        elif check.ok:
            log(f"qmail-smtpd: auth ok: {who}")
        elif check.temporary is not None:
            log(f"qmail-smtpd: auth temporary failure ({check.temporary}): {who}")
        else:
            log(f"qmail-smtpd: auth failed: {who}" + (" (locked out)" if check.locked else ""))
            await asyncio.sleep(check.delay)  # qmail-smtpd-auth: sleep(5) before the 535
        return self.session.auth_result(check.ok, check.temporary)

    async def _start_tls(self) -> bool:
        tls = self.l.tls
        if tls is None or not tls.available:
            why = tls.error if tls is not None and tls.error else "missing certificate"
            await self._perform(self.session.tls_failed(why))
            return False
        try:
            cipher = await tls.upgrade(self.writer, self.cfg.timeout)
        except Exception as e:  # the handshake failed (or stalled past timeoutsmtpd)
            why = str(e) or e.__class__.__name__
            log(f"qmail-smtpd: TLS handshake failed from {self.env['TCPREMOTEIP']}: {why}")
            actions = self.session.tls_failed(why)
            if self.writer.transport.is_closing():
                # The failed handshake took the connection with it: there is nobody to
                # send eQmail's "454 TLS connection failed" to.
                self.closed = True
                return False
            await self._perform(actions)
            return False
        await self._perform(self.session.tls_started(cipher))
        return True

    async def cleanup(self) -> None:
        if self.queue is not None:
            if self.message is not None:
                await self.queue.abandon()  # the writer removes the half-written message
            else:
                self.queue.release()
        try:
            self.writer.close()
        except OSError:
            pass


def _printable(name: bytes) -> str:
    """A user name for a log line: at most 64 characters, made safe by log.sanitize."""
    text = sanitize(name[:64].decode("utf-8", "replace")).replace(" ", "?")
    return text + ("..." if len(name) > 64 else "")


def _refuse_backlog(listener: Listener, sock: socket.socket, conn: socket.socket, ip: str) -> None:
    """Full: answer ``conn`` and up to REFUSE_BATCH more waiting connections with 421
    (no await in between, so the listener stays full), so a flood is refused at the
    rate it arrives, not one connection per wake-up."""
    full = replies.too_many_connections(listener.config.greeting)
    for _ in range(REFUSE_BATCH):
        listener.refuse(conn, full, "too many connections", ip)
        try:
            conn, addr = sock.accept()
        except OSError:  # BlockingIOError: nothing more is waiting
            return
        conn.setblocking(False)
        ip = str(addr[0])
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
