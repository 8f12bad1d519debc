"""The delivery-worker skeleton: what the local and the remote delivery worker share.

Owns: the listening Unix socket the supervisor bound for the worker (run/local.sock or
run/remote.sock, mode 0600, owner eqmails), accepting only root, the worker's own uid
and the scanner's uid (SO_PEERCRED); the framing and decoding of the scanner's frames
(eqmail.ipc.delivery: ``D`` request, ``A`` attach, ``Q`` detach); the deliveries asked
for and their reports, kept across scanner restarts (eqmail.workers.jobs.JobBoard);
the event loop with its self-pipe for signals and for pool threads; SIGTERM, a graceful
stop that lets running deliveries finish.  Privilege: that of the worker (the local
spawner as root, the remote worker as eqmailr); no threads of its own.

The worker kind plugs in a :class:`DeliveryHandler` (Postfix's single_server calling
its service function): ``submit(request)`` either answers at once with an
:class:`~eqmail.ipc.delivery.Outcome` or starts the delivery and later calls
:meth:`DeliveryServer.finish` (from the loop: a watched fd's callback, or a pool
thread's completion passed through :meth:`DeliveryServer.call_from_thread`).

Failure modes: a scanner that breaks the framing is logged and dropped (its
deliveries go on and report to the next scanner); a request whose message id is not a
number is answered with the handler's permanent failure, as qmail-lspawn does.
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import socket
from collections.abc import Callable
from functools import partial
from typing import Protocol

from eqmail.ipc import ProtocolError, accept_from, read_frames
from eqmail.ipc.delivery import (
    TO_WORKER_KINDS,
    Attach,
    BadMessageId,
    Channel,
    DeliveryRequest,
    Outcome,
    decode_to_worker,
)
from eqmail.log import log
from eqmail.workers.base import LocalSettings, RemoteSettings, WorkerContext, drain_wake_pipe
from eqmail.workers.jobs import JobBoard

Callback = Callable[[], None]


class DeliveryHandler(Protocol):
    """One delivery worker kind's service, driven by :class:`DeliveryServer`."""

    role: str  # "local delivery" / "remote delivery", for log lines
    channel: Channel
    bad_msgid: Outcome  # the answer to a request whose message id is not valid

    def begin(self) -> None:
        """Before the worker says it is ready: signals, files to set up."""

    def submit(self, request: DeliveryRequest) -> Outcome | None:
        """A new delivery: its outcome now, or None when it runs and reports later
        through ``server.finish``."""

    def timeout(self) -> float:
        """How long the loop may wait for events now."""

    def turn(self) -> None:
        """After each loop turn: start what waits, expire what idles."""

    def busy(self) -> bool:
        """Deliveries still waiting or running (a graceful stop waits for them)."""

    def close(self) -> None:
        """After the loop, before the worker exits."""


class DeliveryServer:
    """Accept, frame, dispatch, report, stop: the loop around a :class:`DeliveryHandler`,
    which ``make_handler`` builds with this server (for finish, watch, call_from_thread)."""

    def __init__(self, ctx: WorkerContext[LocalSettings] | WorkerContext[RemoteSettings], listen_fd: int,
                 make_handler: Callable[[DeliveryServer], DeliveryHandler]) -> None:
        self.ctx = ctx
        self.listener = socket.socket(fileno=listen_fd)  # bound by the supervisor
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.clients: dict[socket.socket, bytearray] = {}
        self.board = JobBoard()
        self.stopping = False
        self.calls: queue.SimpleQueue[Callback] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.handler = make_handler(self)

    # ------------------------------------------------------------ for handlers
    def finish(self, slot: bytes, outcome: Outcome) -> None:
        """The delivery ``slot`` ended (call from the loop only)."""
        self.board.finish(slot, outcome)

    def watch(self, fileobj: socket.socket, callback: Callback) -> None:
        self.sel.register(fileobj, selectors.EVENT_READ, callback)

    def unwatch(self, fileobj: socket.socket) -> None:
        self.sel.unregister(fileobj)

    def call_from_thread(self, callback: Callback) -> None:
        """Run ``callback`` in the loop soon (thread-safe)."""
        self.calls.put(callback)
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")  # end the select() now, not at its timeout
        except OSError:
            pass

    def close_in_child(self) -> None:
        """In a forked child: drop every fd of the loop (the handler drops its own)."""
        signal.set_wakeup_fd(-1)
        os.close(self.wake_r)
        os.close(self.wake_w)
        for client in self.clients:
            client.close()
        self.listener.close()
        self.sel.close()

    # ------------------------------------------------------------ loop
    def serve(self) -> int:
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        # Signals wake the select through the self-pipe: a handler alone does not
        # interrupt it (PEP 475), which made every stop wait out the timeout.
        signal.set_wakeup_fd(self.wake_w)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._woken)
        signal.signal(signal.SIGTERM, self._on_term)
        self.handler.begin()
        self.ctx.ready()
        while not (self.stopping and not self.handler.busy()):
            for key, _ in self.sel.select(self.handler.timeout()):
                key.data()
            self.handler.turn()
        self.handler.close()
        return 0

    def _on_term(self, *_: object) -> None:
        self.stopping = True

    def _woken(self) -> None:
        drain_wake_pipe(self.wake_r)
        while True:
            try:
                callback = self.calls.get_nowait()
            except queue.Empty:
                return
            callback()

    def _accept(self) -> None:
        conn = accept_from(self.listener, {0, os.getuid(), self.ctx.ids["send"].uid})
        if conn is not None:
            self.clients[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, partial(self._client_data, conn))

    # ------------------------------------------------------------ the scanner's frames
    def _client_data(self, conn: socket.socket) -> None:
        buf = self.clients.get(conn)
        try:
            frames = read_frames(conn, buf, TO_WORKER_KINDS) if buf is not None else None
            for kind, payload in frames or ():
                if conn not in self.clients:
                    break  # superseded by another scanner's A
                self._frame(conn, kind, payload)
        except ProtocolError as e:
            log(f"warning: {self.handler.role}: {e}")
            frames = None
        if frames is None and conn in self.clients:
            self._drop_client(conn)

    def _frame(self, conn: socket.socket, kind: bytes, payload: bytes) -> None:
        try:
            msg = decode_to_worker(kind, payload, self.handler.channel)
        except BadMessageId as e:
            if self.board.start(conn, e.slot):
                self.board.finish(e.slot, self.handler.bad_msgid)
            return
        if isinstance(msg, DeliveryRequest):
            if not self.board.start(conn, msg.slot):
                return  # running already (a restarted scanner asked again), or just reported
            outcome = self.handler.submit(msg)
            if outcome is not None:
                self.board.finish(msg.slot, outcome)
        elif isinstance(msg, Attach):
            superseded = self.board.attach(conn)
            if superseded is not None and superseded in self.clients:
                self._drop_client(superseded)
        else:
            self.board.detach(conn)

    def _drop_client(self, conn: socket.socket) -> None:
        """Requests it made still run (or wait): their reports go to the next scanner."""
        self.sel.unregister(conn)
        self.clients.pop(conn, None)
        self.board.dropped(conn)
        conn.close()
