"""One SMTP connection of the listener: the pure session's actions performed on a socket.

Owns: :class:`Connection` — reading (bounded by timeoutsmtpd and control/mindatarate),
writing, STARTTLS, streaming DATA to the queue writer (with control/authcheck through the
checks of eqmail.workers.inbound, which hold a message that fits in memory back and
write it behind its Authentication-Results field, send the field of a larger, streamed
one as a QueuePrepend, or refuse it for DMARC), checkpassword and qmail-spp hooks
through the plugin sandbox, the RCPT-time mailbox check — for one client, with the
:class:`~eqmail.workers.listenerconfig.ListenerConfig` its session was accepted with.
The accept loop, the limits and the configuration are the listener's
(eqmail.workers.listener).

Failure modes: a broken connection ends its session (a half-received message is
abandoned, so nothing is queued); an unexpected exception is logged and ends only that
session.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import TYPE_CHECKING

from eqmail.log import log, log_lines, sanitize
from eqmail.queue.client import AsyncQueueClient
from eqmail.queue.origin import session_claim
from eqmail.smtp import actions as A
from eqmail.smtp import replies
from eqmail.smtp.pace import Pace
from eqmail.smtp.replies import Reply
from eqmail.smtp.session import Session
from eqmail.smtp.tcpenv import session_config
from eqmail.spp.checkpwclient import run_checkpassword
from eqmail.spp.client import run_hook
from eqmail.spp.config import SppConfigError
from eqmail.tls import (
    bind_alert_socket,
    cipher_name,
    client_cert_email,
    freeze_plaintext,
)
from eqmail.workers.inbound import InboundMessage
from eqmail.workers.listenerconfig import ListenerConfig

if TYPE_CHECKING:
    from eqmail.workers.listener import Listener

READ_SIZE = 256 * 1024


async def server_streams(conn: socket.socket, tls: ssl.SSLContext | None,
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
                 writer: asyncio.StreamWriter, env: dict[str, str], via: str = "") -> None:
        self.l = listener
        self.cfg = cfg  # the configuration the session started with, to its end
        self.reader = reader
        self.writer = writer
        self.env = env
        # " via BALANCER" when a proxy= balancer relays this client: every log line of
        # the session names both (the session's own lines name only the client).
        self.via = via
        self.queue: AsyncQueueClient | None = None
        self.message: A.BeginMessage | None = None
        self.inbound: InboundMessage | None = None  # the message's checks (control/authcheck)
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
            self._log(self.session.log_line("unable to read controls"))
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
                self._log(self.session.log_line("read failed"))
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

    def _log(self, line: str) -> None:
        log(line + self.via)

    async def _timeout(self, reply: Reply = replies.TIMEOUT, event: str = "timeout") -> None:
        self._log(self.session.log_line(event))
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
            data = action.data if self.inbound is None else self.inbound.feed(action.data)
            if data:
                await self.queue.write(data)
            return []
        if isinstance(action, A.BeginMessage):
            if self.queue is None:
                self.queue = AsyncQueueClient(self.l.root)
            self.message = action
            self.inbound = self._inbound_check(action)
            if self.inbound is None:  # else it holds the prefix back with the message
                await self.queue.write(action.header_prefix)
            return []
        if isinstance(action, A.EndMessage):
            return await self._end_message()
        if isinstance(action, A.AbortMessage):
            if self.queue is not None and self.message is not None:
                await self.queue.abandon()
            self.message = None
            self._drop_inbound()
            return []
        if isinstance(action, A.Log):
            self._log(action.line)
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
        auth_line = None
        if self.inbound is not None:
            inbound, self.inbound = self.inbound, None
            tail = inbound.end()
            if tail:
                await self.queue.write(tail)
            began = time.monotonic()
            verdict = await inbound.finish()
            took = (time.monotonic() - began) * 1000
            ip = self.env.get("TCPREMOTEIP", "unknown")
            auth_line = (f"qmail-smtpd: auth: {sanitize(verdict.summary[:400])} from {ip} "
                         f"({took:.0f} ms){self.via}")
            if verdict.refuse is not None:  # DMARC p=reject with control/dmarcreject reject
                await self.queue.abandon()
                return _with_line(auth_line, self.session.queue_result(
                    A.QueueOutcome(A.QueueStatus.REFUSED, text=verdict.refuse)), self.via)
            now, prepend = inbound.commit(verdict)
            if now:
                await self.queue.write(now)
            if prepend is not None:
                self.queue.prepend(prepend)
        result = await self.queue.finish(msg.sender, list(msg.recipients), session_claim(
            self.session.authenticated, "RELAYCLIENT" in self.session.env), msg.requiretls)
        actions = self.session.queue_result(A.QueueOutcome.of(result))
        return actions if auth_line is None else _with_line(auth_line, actions, self.via)

    def _inbound_check(self, begin: A.BeginMessage) -> InboundMessage | None:
        """control/authcheck: the checks of a message from a client that is neither a
        relay client nor authenticated; relay clients' and users' mail is left alone."""
        checker = self.cfg.inbound
        session = self.session
        if checker is None or session.authenticated or "RELAYCLIENT" in session.env:
            return None
        return checker.begin(self.env.get("TCPREMOTEIP", ""), session.helo, begin.sender,
                             session.databytes, begin.header_prefix)

    def _drop_inbound(self) -> None:
        if self.inbound is not None:
            self.inbound.close()
            self.inbound = None

    async def _check_password(self, action: A.CheckPassword) -> list[A.Action]:
        ip = self.env["TCPREMOTEIP"]
        who = f"{action.method} {_printable(action.user)} from {ip}{self.via}"
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
            log(f"qmail-smtpd: TLS handshake failed from {self.env['TCPREMOTEIP']}{self.via}: {why}")
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
        self._drop_inbound()
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


def _with_line(line: str, actions: list[A.Action], via: str = "") -> list[A.Action]:
    """``line`` logged with the session's first line about the message (its outcome) in
    one write: each write to the logger's pipe is a system call here and a wake-up of
    the logger, per message (bench/auth.sh, control/authcheck on).  ``via``: the
    balancer a PROXY-protocol session came through, as every session line ends."""
    if actions and isinstance(actions[0], A.Log):
        log_lines([line, actions[0].line + via])
        return actions[1:]
    log(line)
    return actions
