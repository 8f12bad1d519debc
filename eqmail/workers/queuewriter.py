"""The queue-writer worker (qmail-queue + qmail-clean), running as eqmailq.

Serves ``run/queue.sock`` (mode 0777: any local user may inject, as with setuid
qmail-queue).  The client's uid comes from SO_PEERCRED, never from the client: it goes
into the ``u`` record and picks the ``invoked ...`` text of the Received line.  With
the hello's role it also decides which origin the client's ``Xorigin=`` claim is worth
(eqmail.queue.origin), recorded in the todo/ file for the signer (issue 16).
Clean requests (``C`` frames) are honoured only from the scanner's uid (or root).

An asyncio loop (uvloop when available) reads frames and streams body chunks into the
mess file as they arrive; complete messages are handed to one committer thread, which
commits whatever is pending when it becomes free (group commit, see
eqmail.queue.writer).  Answers go back through the loop.  A client that disconnects
before its envelope arrived gets nothing queued: its mess file is removed.
"""

from __future__ import annotations

import asyncio
import os
import queue as queue_mod
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from eqmail.ipc.framing import ProtocolError, next_frame, peer_uid
from eqmail.ipc.queue import (
    BODY,
    CLEAN,
    ENVELOPE,
    HELLO,
    PREPEND,
    BodyChunk,
    CleanAnswer,
    CleanRequest,
    EnvelopeRefused,
    QQExit,
    QueueAnswer,
    QueueEnvelope,
    QueueHello,
    QueuePrepend,
    QueueRole,
)
from eqmail.log import log
from eqmail.queue.envelope import Envelope
from eqmail.queue.origin import believed_origin, peer_role
from eqmail.queue.writer import (
    PendingMessage,
    QueueFailure,
    QueueStore,
    failure_code,
    received_line,
)
from eqmail.workers.base import QueueWriterSettings, WorkerContext, stop_on_sigterm


class QPCounter:
    """The ``qp`` trace number of each message (qmail used qmail-queue's pid; one
    long-lived writer has one pid, so eqmail numbers messages instead)."""

    def __init__(self) -> None:
        self._next = (os.getpid() * 1000 + int(time.time()) % 1000) % 2_000_000_000 + 1

    def take(self) -> int:
        n = self._next
        self._next = n + 1 if n < 2_000_000_000 else 1
        return n


class Committer(threading.Thread):
    """Commits batches of complete messages; calls ``done(msg)`` in the loop thread.

    After a batch with a queued message it pulls qmail's trigger (lock/trigger), as
    qmail-queue does after each message: that is how the scanner learns of new todo/
    entries."""

    def __init__(self, store: QueueStore, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="committer", daemon=True)
        self.store = store
        self.loop = loop
        self.pending: queue_mod.SimpleQueue[tuple[PendingMessage, Callable[[PendingMessage], None]]] = (
            queue_mod.SimpleQueue()
        )
        self.trigger = store.paths.lock / "trigger"
        self._trigger_fd = -1

    def pull_trigger(self) -> None:
        """One byte into the FIFO, never blocking; nobody reading (ENXIO) or a full pipe
        is fine: the scanner is then down (it rescans at start) or already awake."""
        for _ in range(2):
            if self._trigger_fd < 0:
                try:
                    self._trigger_fd = os.open(self.trigger, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    return
            try:
                os.write(self._trigger_fd, b"x")
                return
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the scanner that had it open is gone; reopen once
                os.close(self._trigger_fd)
                self._trigger_fd = -1

    def submit(self, msg: PendingMessage, done: Callable[[PendingMessage], None]) -> None:
        self.pending.put((msg, done))

    def run(self) -> None:
        # messages whose files the last barrier made durable: linked by the next step
        durable: list[tuple[PendingMessage, Callable[[PendingMessage], None]]] = []
        while True:
            # with messages waiting for their links, take what is ready and go on
            batch = [] if durable else [self.pending.get()]
            while True:
                try:
                    batch.append(self.pending.get_nowait())
                except queue_mod.Empty:
                    break
            waiting = {id(m): done for m, done in durable + batch}
            try:
                live = self.store.commit_step([m for m, _ in durable], [m for m, _ in batch])
            except BaseException as e:  # never leave a client without an answer
                log(f"alert: queue commit failed: {e!r}")
                live = []
                for m, _ in durable + batch:
                    if m.result is None:
                        m.result = failure_code(e)
                        self.store.abort(m)
            finished = [(m, done) for m, done in durable + batch if m.result is not None]
            durable = [(m, waiting[id(m)]) for m in live]
            if any(m.result is QQExit.OK for m, _ in finished):
                self.pull_trigger()
            if finished:
                # one wake-up of the loop for all of them, not one per message
                self.loop.call_soon_threadsafe(_answer_batch, finished)


def _clean_all(store: QueueStore, requests: list[CleanRequest | None]) -> list[CleanAnswer]:
    """The answers, in order; None stands for a request qmail-clean does not understand."""
    answers = []
    for request in requests:
        if request is None:
            answers.append(CleanAnswer.BAD)
            continue
        try:
            answers.append(store.clean(request))
        except Exception as e:  # an answer for every request, whatever happens
            log(f"warning: qmail-clean {request}: {e}")
            answers.append(CleanAnswer.REFUSED)
    return answers


def _answer_batch(batch: list[tuple[PendingMessage, Callable[[PendingMessage], None]]]) -> None:
    for m, done in batch:
        try:
            done(m)
        except Exception as e:  # one client's trouble must not keep the others unanswered
            log(f"warning: answering queue client for msg {m.msgid}: {e!r}")


class QueueProtocol(asyncio.Protocol):
    def __init__(self, server: QueueServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.uid = -1
        self.who = ""
        self.role: QueueRole | None = None  # the client's role: its uid's, or a trusted hello's
        self.msg: PendingMessage | None = None
        self.failed: QQExit | None = None  # a write failed: swallow the rest, answer at E
        self.waiting = False
        self.clean_answers: deque[Future[list[CleanAnswer]]] = deque()
        self.clean_requests: list[CleanRequest | None] = []  # of the frames read now, run as one job

    # -- connection -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        sock = transport.get_extra_info("socket")
        self.uid = peer_uid(sock) if sock is not None else -1
        self.who = self.server.ids.who_for_uid(self.uid)
        self.role = peer_role(None, self.uid, os.getuid(), self.server.role_uids)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.msg is not None and not self.waiting:
            self.server.store.abort(self.msg)
        self.msg = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._drain()
        except ProtocolError as e:
            log(f"warning: queue client uid {self.uid}: {e}")
            self._drop()

    def _drain(self) -> None:
        buf = self.buf
        pos = 0
        while not self.waiting and (got := next_frame(buf, pos)) is not None:
            kind, payload, pos = got
            self._frame(kind, payload)
        del buf[:pos]
        if self.clean_requests:
            self._run_cleans()

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- frames ---------------------------------------------------------------
    def _frame(self, kind: bytes, payload: bytes) -> None:
        if kind == BODY:
            self._body(BodyChunk.decode(payload))
        elif kind == ENVELOPE:
            self._envelope(payload)
        elif kind == HELLO:
            self._hello(payload)
        elif kind == CLEAN:
            self._clean(payload)
        elif kind == PREPEND:
            self._prepend(QueuePrepend.decode(payload))
        else:
            raise ProtocolError(f"unexpected frame {kind!r}")

    def _hello(self, payload: bytes) -> None:
        if self.uid not in (0, os.getuid()):
            return  # only eqmail's own workers may say who they are
        try:
            hello = QueueHello.decode(payload)
        except ProtocolError:
            return  # a role this writer does not know: labelled by uid, as without hello
        self.who = hello.role.invoked
        self.role = hello.role

    def _ensure_message(self) -> PendingMessage | None:
        if self.msg is None and self.failed is None:
            qp = self.server.qp.take()
            try:
                self.msg = self.server.store.start(qp, self.uid, received_line(qp, self.who))
            except (QueueFailure, OSError) as e:
                self.failed = failure_code(e)
                log(f"warning: cannot create message in queue: {e}")
        return self.msg

    def _body(self, chunk: BodyChunk) -> None:
        msg = self._ensure_message()
        if msg is None:
            return
        try:
            self.server.store.write(msg, chunk.data)
        except QueueFailure as e:
            self.failed = e.code
            self.server.store.abort(msg)
            self.msg = None

    def _prepend(self, prepend: QueuePrepend) -> None:
        """The listener's Authentication-Results (issue 16), after the body: only from
        the listener (its uid, or its role in a one-user instance); from anyone else a
        protocol error.  A failure is answered at E, as a failed body write is."""
        if self.role is not QueueRole.NETWORK:
            raise ProtocolError("prepended fields from a client that is not the listener")
        msg = self._ensure_message()
        if msg is None:
            return
        try:
            self.server.store.prepend(msg, prepend.fields)
        except QueueFailure as e:
            self.failed = e.code
            self.msg = None  # prepend removed its files

    def _envelope(self, payload: bytes) -> None:
        msg = self._ensure_message()
        if msg is None or self.failed is not None:
            self._answer(QueueAnswer(self.failed or QQExit.BUG, 0, 0))
            return
        try:
            env = QueueEnvelope.decode(payload)
        except EnvelopeRefused as e:
            self.server.store.abort(msg)
            self.msg = None
            self._answer(QueueAnswer(e.code, msg.qp, 0))
            return
        msg.envelope = Envelope(env.sender, env.recipients, believed_origin(self.role, env.origin),
                                env.requiretls)
        self.waiting = True
        self.server.committer.submit(msg, self._committed)

    def _committed(self, msg: PendingMessage) -> None:
        self.waiting = False
        self.msg = None
        code = msg.result if msg.result is not None else QQExit.BUG
        self._answer(QueueAnswer(code, msg.qp, msg.msgid if code is QQExit.OK else 0))
        if self.buf:
            self.data_received(b"")

    def _answer(self, ans: QueueAnswer) -> None:
        self.failed = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ans.frame())

    def _clean(self, payload: bytes) -> None:
        allowed = {0, os.getuid(), self.server.ids["send"].uid}
        if self.uid not in allowed:
            raise ProtocolError("clean request from a uid that is not the scanner's")
        try:
            self.clean_requests.append(CleanRequest.decode(payload))
        except ProtocolError:
            self.clean_requests.append(None)  # qmail-clean answers "x" and reads on

    def _run_cleans(self) -> None:
        # The unlinks run on the cleaner thread, not on this loop that every listener's
        # DATA passes through: the requests of one read (the scanner pipelines a slice's
        # worth) as one job, answered in request order.
        requests, self.clean_requests = self.clean_requests, []
        store = self.server.store
        future = self.server.cleaner.submit(_clean_all, store, requests)
        self.clean_answers.append(future)
        future.add_done_callback(lambda _f: self.server.loop.call_soon_threadsafe(self._send_cleans))
        # then, on the same thread while the answers go out, empty the files the
        # requests gave to the spare pool (truncating may wait for write-back)
        self.server.cleaner.submit(store.spares.empty_given)

    def _send_cleans(self) -> None:
        while self.clean_answers and self.clean_answers[0].done():
            answers = self.clean_answers.popleft().result()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(a.frame() for a in answers))


class QueueServer:
    def __init__(self, ctx: WorkerContext[QueueWriterSettings], loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.ids = ctx.ids
        self.store = QueueStore(ctx.instance.queue)
        self.qp = QPCounter()
        # the uids whose role is known without a hello (a privileged instance's listener
        # and scanner), for what their origin claims are worth
        self.role_uids: dict[QueueRole, int] | None = (
            {QueueRole.NETWORK: self.ids["daemon"].uid, QueueRole.BOUNCE: self.ids["send"].uid,
             QueueRole.ALIAS: self.ids["alias"].uid} if self.ids.privileged else None)
        self.loop = loop
        self.committer = Committer(self.store, loop)
        self.cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cleaner")


def run(ctx: WorkerContext[QueueWriterSettings]) -> int:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    stop_on_sigterm(loop, stop)  # before the committer thread starts: it inherits the block
    os.umask(0o033)
    server = QueueServer(ctx, loop)
    # a writer that was killed may have left pid/ names; none is in use now (one writer)
    removed = server.store.clean_pid_dir(older_than=0)
    if removed:
        log(f"queue writer: removed {removed} stale pid/ files")
    server.committer.start()
    sock = socket.socket(fileno=ctx.settings.socket_fd)  # bound by the supervisor

    async def main() -> None:
        # uvloop re-listens with its own default backlog (100) unless told: every
        # listener's sessions that reach DATA together must find room to connect.
        srv = await loop.create_unix_server(lambda: QueueProtocol(server), sock=sock, backlog=4096)
        ctx.ready()
        await stop.wait()
        srv.close()
        # let committed answers and in-flight commits go out before exiting
        await asyncio.sleep(0.2)

    loop.run_until_complete(main())
    return 0
