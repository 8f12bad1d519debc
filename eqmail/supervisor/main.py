"""The supervisor: qmail-start and tcpserver in one root process.

Owns: the start order, the main loop and its event table, and the ordered stop.
Single-threaded; signal handlers only record the signal and the loop acts on it
through an explicit table (signals.py).

Start order: logger, queue writer, local delivery, scanner, then the listeners; a
background start returns (through the readiness pipe of ``eqmailctl start``) only when
each is ready.  A worker that exits is restarted with back-off (pool.py, policy.py).
SIGHUP reparses control/ and, when it is valid, applies it as a diff (reload.py); when
it is not, the old configuration keeps running and status shows the errors.  SIGUSR1
reopens the log output (logrotate), and so does every accepted reload.  SIGTERM stops
the listeners first, then the scanner (which finishes or defers its deliveries), then
the rest (kinds.py's stop phases).  Under systemd each step is told through sd_notify
(sockets.Notifier).

The parts, each with its own state, composed here: plant.py (what is set up as root
before any worker: pid lock, sockets, pipes, log output), kinds.py (the table of worker
kinds), pool.py (spawning, readiness, exits, restart back-off), listeners.py (listener
sockets and processes, the configuration push), reload.py (the reload diff),
status.py (the status socket and report), signals.py (signal dispatch), logoutput.py
(the log output and its rotation), spawn.py (fork and privilege drop).
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from typing import Any

from eqmail.control import Controls
from eqmail.errors import ControlFileError
from eqmail.instance import Instance
from eqmail.log import log, write_directly
from eqmail.supervisor.kinds import STOP_PHASES, StartFailure
from eqmail.supervisor.listeners import Listeners
from eqmail.supervisor.logoutput import Opened
from eqmail.supervisor.plant import StartError, prepare
from eqmail.supervisor.pool import Exit, WorkerPool
from eqmail.supervisor.reload import Configuration, Reloader, ReloadState
from eqmail.supervisor.signals import SignalDispatch
from eqmail.supervisor.sockets import Notifier
from eqmail.supervisor.status import StatusSocket, summary_line, supervisor_report
from eqmail.supervisor.worker import Worker, WorkerState
from eqmail.workers.base import WorkerKind

__all__ = ["StartError", "Supervisor"]

STATUS_EVERY = 5.0  # seconds between refreshes of systemd's STATUS= line


class Supervisor:
    """Prepared (as root: pid lock, sockets, log output) when made; ``run`` starts the
    workers and turns the loop until a stop is complete."""

    def __init__(self, root: Any, foreground: bool = True, notify_fd: int = -1) -> None:
        self.instance = Instance(root)
        self.notify_fd = notify_fd  # eqmailctl start's readiness pipe
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.status_due = 0.0
        self.stopping = False
        self.stop_phase = 0
        self.status_server: StatusSocket | None = None  # bound once every worker is ready
        self.plant = prepare(self.instance, foreground)
        self.logout = self.plant.logout
        self.config = Configuration(self.plant.controls)
        self.reloads = ReloadState()
        self.pool = WorkerPool(self.instance, self.plant.ids, self.sel, self.plant.log_w,
                               self._forget_sessions)
        self.listeners = Listeners(self.instance, self.plant.listen_socks, self.plant.clients, self.pool)
        self.reloader = Reloader(self.instance, self.config, self.reloads, self.pool, self.listeners,
                                 self.logout, self.notifier, self.switch_log, self.summary,
                                 lambda: self.stopping)
        self.signals = SignalDispatch({
            signal.SIGTERM: self.begin_stop,
            signal.SIGINT: self.begin_stop,
            signal.SIGHUP: self.reloader.reload,
            signal.SIGALRM: self.flush,
            signal.SIGUSR1: self.reopen_logs,
        })

    @property
    def controls(self) -> Controls:
        return self.config.controls

    @property
    def generation(self) -> int:
        return self.config.generation

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        try:
            from setproctitle import setproctitle

            setproctitle(f"eqmail: supervisor {self.instance.root}")
        except ImportError:  # pragma: no cover
            pass
        self.signals.install(self.sel)
        os.dup2(self.plant.log_w, 2)  # from here on the supervisor's own lines go to the logger too
        self._start_workers()
        self.status_server = StatusSocket(self.instance.status_socket)
        self.sel.register(self.status_server.sock, selectors.EVENT_READ, ("status", None))
        self.sel.register(self.plant.watch_r, selectors.EVENT_READ, ("watch", None))
        log(f"status: eqmail started, pid {os.getpid()}, generation {self.generation}")
        self._notify(b"ok\n")
        while not self.stopping or any(w.proc for w in self.workers):
            self.poll(1.0)
            self._refresh_status()
            if not self.stopping:
                self.pool.restart_due(self.controls, self.generation)
            self.reloader.check_complete()
            if self.stopping:
                self._stop_step()
        log("status: eqmail stopped")
        return 0

    def _start_workers(self) -> None:
        self.pool.workers.extend(self.plant.base_workers())
        for w in list(self.workers):
            self.pool.start(w, self.controls, self.generation)
            try:
                self.pool.wait_ready([w], self.poll)
            except StartError as e:
                if w.policy.start_failure is StartFailure.FATAL:
                    raise
                # Remote mail can wait in the queue: start anyway, restart it with back-off.
                log(f"alert: {e}; remote deliveries wait until it runs")
        for spec in self.controls.listen:
            self.listeners.start(spec, self.controls, self.generation)
        self.pool.wait_ready([w for w in self.workers
                              if w.policy.start_failure is StartFailure.FATAL], self.poll)

    def poll(self, timeout: float) -> None:
        # the watchdog ping rides on the loop: it stops when the loop stops turning
        events = self.sel.select(min(timeout, self.notifier.watchdog()))
        # Signals first: a worker that exits because the whole group got a signal must
        # be seen as stopping, not as a crash to restart.
        events.sort(key=lambda ev: ev[0].data[0] != "signal")
        for key, _ in events:
            kind, w = key.data
            if kind == "signal":
                self.signals.drain()
                self.signals.dispatch()
            elif kind == "ready":
                self.pool.on_ready(w)
            elif kind == "exit":
                self._on_exit(w)
            elif kind == "status" and self.status_server is not None:
                self.status_server.serve(self.status)
            elif kind == "watch":
                self.reloader.on_control_change(self.plant.watch_r)
            elif kind == "sessions":
                self.listeners.on_sessions(w)
            elif kind == "config":
                self.listeners.on_config(w, self.controls, self.generation)
        self.signals.dispatch()

    def _on_exit(self, w: Worker) -> None:
        if w.proc is None:  # a stale event for a worker already handled
            return
        outcome, _pid, _code = self.pool.on_exit(w, self.stopping)
        if outcome is Exit.RETIRED:
            self.reloader.retired_exit(w)

    def _forget_sessions(self, w: Worker, pid: int) -> None:
        if w.kind is WorkerKind.LISTENER:  # sessions a killed listener never released
            dropped = self.plant.clients.purge(pid)
            if dropped:
                log(f"status: {w.name} (pid {pid}) left {dropped} client session(s) counted; forgotten")

    def flush(self) -> None:
        self.pool.signal(WorkerKind.SCANNER, signal.SIGALRM)

    # ------------------------------------------------------------ log output
    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the log file (logrotate has renamed it) with the running
        controls."""
        try:
            opened = self.logout.open(self.controls)
        except ControlFileError as e:
            log(f"alert: cannot reopen the log: {e}")
            self.logout.error = str(e)
        else:
            self.switch_log(opened)
            self.logout.error = ""
        self.logout.reopens += 1

    def switch_log(self, opened: Opened) -> None:
        """Install an opened output and hand it to the logger (and to its successors)."""
        self.logout.install(*opened)
        self.logout.send()
        for w in self.pool.of_kind(WorkerKind.LOGGER):
            w.settings = self.plant.logger_settings()
            w.keep_fds = self.plant.logger_fds()

    # ------------------------------------------------------------ stop
    def begin_stop(self) -> None:
        if self.stopping:
            return
        log("status: stopping")
        self.notifier.stopping("stopping")
        self.stopping = True
        self.stop_phase = 0
        self._stop_step()

    def _stop_step(self) -> None:
        while self.stop_phase < STOP_PHASES:
            alive = [w for w in self.workers
                     if w.policy.stop_phase == self.stop_phase and w.proc is not None]
            if alive:
                for w in alive:
                    if w.state is not WorkerState.STOPPING:
                        w.state = WorkerState.STOPPING
                        os.kill(w.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
                return
            self.stop_phase += 1
            if self.stop_phase == STOP_PHASES - 1:
                # the logger goes last; keep our own lines visible, in the log's format
                os.dup2(self.logout.fd, 2)
                write_directly(self.logout.shape)

    # ------------------------------------------------------------ status, readiness
    def status(self) -> dict[str, Any]:
        return supervisor_report(self)

    def _notify(self, data: bytes) -> None:
        if self.notify_fd >= 0:
            try:
                os.write(self.notify_fd, data)
                os.close(self.notify_fd)
            except OSError:
                pass
            self.notify_fd = -1
        self.notifier.ready(self.summary())
        self.status_due = time.monotonic() + STATUS_EVERY

    def summary(self) -> str:
        return summary_line(self)

    def _refresh_status(self) -> None:
        if self.notifier.enabled and not self.stopping and self.reloads.pending is None \
                and time.monotonic() >= self.status_due:
            self.notifier.set_status(self.summary())
            self.status_due = time.monotonic() + STATUS_EVERY
