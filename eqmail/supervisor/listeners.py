"""The SMTP listeners as the supervisor sees them: sockets, processes, configuration.

Owns: the bound listening socket of each control/listen line (by ``ListenerSpec.key``),
making a line's listener workers (``processes`` of them sharing its socket, each with
the TLS context loaded here as root -- the private key reaches the worker through fork
-- and the shared per-client table), applying a reload's ``ListenerPlan`` (diff.py):
bind the added sockets, retire the replaced and removed processes, push the new
configuration to the kept ones over their channel (``eqmail.ipc.config.ConfigUpdate``;
a process the push cannot reach is replaced instead), start the new processes, close
removed sockets; and reading what listener processes tell the supervisor: their
session count and "closed" (status pipe), and the generation they applied
(``ConfigApplied``, which moves the worker to that generation).  Root, in the
supervisor's loop.

Failure modes: an address that cannot be bound on reload is logged and skipped; a
listener that breaks the channel protocol is logged and replaced.
"""

from __future__ import annotations

import os
import socket

from eqmail.connlimit import ClientTable
from eqmail.control import Controls, ListenerSpec
from eqmail.instance import Instance
from eqmail.ipc import ProtocolError
from eqmail.ipc.config import ConfigApplied, ConfigUpdate
from eqmail.ipc.worker import Closed, ListenerReportReader
from eqmail.log import log
from eqmail.supervisor.diff import ListenerPlan
from eqmail.supervisor.pool import WorkerPool
from eqmail.supervisor.sockets import bind_listener
from eqmail.supervisor.worker import Worker
from eqmail.workers.base import ListenerSettings, WorkerKind

PUSH_TIMEOUT = 5.0  # seconds to hand a configuration to one listener process


class Listeners:
    def __init__(self, instance: Instance, socks: dict[str, socket.socket], clients: ClientTable,
                 pool: WorkerPool) -> None:
        self.instance = instance
        self.socks = socks  # bound listening sockets by ListenerSpec.key
        self.clients = clients
        self.pool = pool

    def workers_for(self, spec: ListenerSpec, controls: Controls) -> list[Worker]:
        """``processes`` workers sharing the listener's socket (each accepts from it)."""
        from eqmail.tls import ServerTLS

        sock = self.socks[spec.key]
        # The TLS context (and so the private key) is loaded here, as root, and reaches
        # the worker through fork; a reload that changed a TLS file renews the processes.
        tls = ServerTLS.load(self.instance.control, env=dict(spec.env),
                             ciphers=controls.tlsserverciphers, client_cert=spec.clientcert)
        name = f"listener {spec.service} {spec.display_address}"
        settings = ListenerSettings(socket_fd=sock.fileno(), spec=spec, tls=tls, clients=self.clients)
        return [Worker(WorkerKind.LISTENER, name + (f" #{i + 1}" if spec.processes > 1 else ""),
                       settings, keep_fds=(sock.fileno(), self.clients.fd), spec=spec)
                for i in range(spec.processes)]

    def start(self, spec: ListenerSpec, controls: Controls, generation: int) -> list[Worker]:
        started = self.workers_for(spec, controls)
        for w in started:
            self.pool.workers.append(w)
            self.pool.start(w, controls, generation)
        return started

    def _of(self, spec: ListenerSpec) -> list[Worker]:
        return [w for w in self.pool.of_kind(WorkerKind.LISTENER)
                if not w.retired and w.spec is not None and w.spec.key == spec.key]

    # ------------------------------------------------------------ reload
    def apply(self, plan: ListenerPlan, controls: Controls, generation: int) -> None:
        # An added socket is bound now; so is a listed one whose bind failed before.
        bound_now: set[str] = set()
        for spec in (*plan.keep, *plan.start):
            if spec.key not in self.socks:
                try:
                    self.socks[spec.key] = bind_listener(spec)
                    bound_now.add(spec.key)
                except OSError as e:
                    log(f"alert: cannot bind {spec.display_address}: {e.strerror}")
        for spec in plan.replace + plan.remove:
            for w in self._of(spec):
                self._retire(w)
        update = ConfigUpdate(generation, controls).encode()
        for spec in plan.keep:
            for w in self._of(spec):
                if w.proc is not None and not self._push(w, update):
                    self._retire(w)
                    self._successor(w, controls, generation)
        for spec in (*plan.start, *(s for s in plan.keep if s.key in bound_now)):
            if spec.key in self.socks:
                self.start(spec, controls, generation)
        for spec in plan.remove:
            sock = self.socks.pop(spec.key, None)
            if sock is not None:
                sock.close()

    def _retire(self, w: Worker) -> None:
        """Old sessions finish under the old configuration; one waiting for its restart
        is simply dropped."""
        if w.proc is not None:
            self.pool.retire(w)
        else:
            self.pool.workers.remove(w)

    def _successor(self, w: Worker, controls: Controls, generation: int) -> None:
        new = Worker(w.kind, w.name, w.settings, keep_fds=w.keep_fds, spec=w.spec)
        self.pool.workers.append(new)
        self.pool.start(new, controls, generation)

    def _push(self, w: Worker, update: bytes) -> bool:
        """Hand ``update`` to one running listener; False when it cannot be delivered
        (the process is then replaced, as a reload always did)."""
        if w.channel is None:
            return False
        try:
            w.channel.settimeout(PUSH_TIMEOUT)
            w.channel.sendall(update)
        except OSError as e:
            log(f"warning: {w.name}: new configuration not delivered ({e}); replacing it")
            return False
        finally:
            if w.channel is not None:
                w.channel.setblocking(False)
        return True

    # ------------------------------------------------------------ what listeners say
    def on_sessions(self, w: Worker) -> None:
        if w.status_r < 0:  # a stale event: the worker exited earlier in this batch
            return
        try:
            data = os.read(w.status_r, 4096)
        except OSError:
            return
        try:
            reports = w.status_reader.feed(data)
        except ProtocolError as e:
            log(f"warning: {w.name}: status pipe: {e}")
            w.status_reader = ListenerReportReader()
            return
        for report in reports:
            if isinstance(report, Closed):
                w.accepting = False
            else:
                w.sessions = report.sessions

    def on_config(self, w: Worker, controls: Controls, generation: int) -> None:
        """A listener's answer on its channel: the generation it applied."""
        if w.channel is None:  # a stale event: the worker exited earlier in this batch
            return
        try:
            data = w.channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the process is exiting: its exit is handled by the pool
            self._close_channel(w)
            return
        try:
            answers = w.channel_reader.feed(data)
        except ProtocolError as e:
            self._close_channel(w)
            if w.proc is not None and not w.retired:
                log(f"alert: {w.name}: configuration channel: {e}; replacing it")
                self._retire(w)
                self._successor(w, controls, generation)
            return
        for answer in answers:
            if isinstance(answer, ConfigApplied):
                w.generation = max(w.generation, answer.generation)

    def _close_channel(self, w: Worker) -> None:
        if w.channel is not None:
            self.pool.sel.unregister(w.channel)
            w.channel.close()
            w.channel = None
