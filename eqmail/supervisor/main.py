"""The supervisor: qmail-start and tcpserver in one root process.

Owns: the pid file and its lock (run/eqmail.pid), the log pipe, every listening socket,
the status socket (run/status.sock), and the worker processes.  Single-threaded; signal
handlers only record the signal (``signal.set_wakeup_fd``) and the loop acts on it
through an explicit table.

Start order: logger, queue writer, local delivery, scanner, then the listeners; a
background start returns (through the readiness pipe of ``eqmailctl start``) only when
each is ready.  A worker that exits is restarted with back-off (policy.py).  SIGHUP
reparses control/ and, when it is valid, applies it as a diff; when it is not, the old
configuration keeps running and status shows the errors.  SIGUSR1 reopens the log
output (logrotate), and so does every accepted reload.  SIGTERM stops the listeners
first, then the scanner (which finishes or defers its deliveries), then the rest.
Under systemd each step is told through sd_notify (sockets.Notifier).

Split across the package: socket binding and sd_notify in sockets.py, the log output
and its rotation in logoutput.py, the worker record
and entry table in worker.py, the status socket and its report in status.py, the reload
diff in reload.py (a mixin of ``Supervisor``), fork and privilege drop in spawn.py.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import socket
import time
from typing import Any

from eqmail.connlimit import ClientTable, capacity_for
from eqmail.control import ListenerSpec, load_controls
from eqmail.errors import ControlFileError
from eqmail.instance import Instance
from eqmail.log import log, write_directly
from eqmail.privsep.ids import Ids, SystemIds
from eqmail.queue.layout import QUEUE_DIRS
from eqmail.supervisor.logoutput import LogOutput
from eqmail.supervisor.reload import ReloadMixin
from eqmail.supervisor.sockets import Notifier, bind_listener, bind_unix
from eqmail.supervisor.spawn import SpawnSpec, spawn
from eqmail.supervisor.status import StatusSocket, summary_line, supervisor_report
from eqmail.supervisor.worker import Worker, has_worker, worker_entry
from eqmail.workers.base import WorkerContext

READY_TIMEOUT = 30.0
STATUS_EVERY = 5.0  # seconds between refreshes of systemd's STATUS= line


class StartError(Exception):
    pass


# Receiving comes first: an SMTP client holds its connection open while the listener
# and the queue writer work, a queued message can wait a moment for delivery.  So the
# delivery side (and the local delivery children and programs it starts) runs at a
# lower CPU priority; on an idle machine this changes nothing.  Measured under a burst
# on 2 cores: acceptance +15 %, end to end within the noise (bench/PROFILE.md).
DELIVERY_NICE = {"scanner": 5, "local": 5, "remote": 5}


class Supervisor(ReloadMixin):
    def __init__(self, root: Any, foreground: bool = True, notify_fd: int = -1) -> None:
        self.instance = Instance(root)
        self.foreground = foreground
        self.notify_fd = notify_fd
        self.sel = selectors.DefaultSelector()
        self.workers: list[Worker] = []
        self.listen_socks: dict[str, socket.socket] = {}
        self.started = time.time()
        self.generation = 1
        self.last_reload: dict[str, Any] = {"time": None, "ok": True, "errors": [], "seq": 0}
        self.reload_seq = 0  # reload attempts so far (eqmailctl reload waits for its own)
        self.notifier = Notifier()
        self.status_due = 0.0
        self.stopping = False
        self.reload_pending: int | None = None  # generation whose listeners are not all up yet
        self.pending_signals: list[int] = []

    # ------------------------------------------------------------ set-up
    def prepare(self) -> None:
        self.controls = load_controls(self.instance.root)
        self.ids = SystemIds.lookup()
        run = self.instance.run
        run.mkdir(exist_ok=True)
        os.chmod(run, 0o755)
        self.pid_fd = os.open(self.instance.pidfile, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartError("eqmail is already running for this instance") from None
        os.ftruncate(self.pid_fd, 0)
        os.write(self.pid_fd, f"{os.getpid()}\n".encode())
        self._ensure_queue_files()
        self.log_r, self.log_w = os.pipe()
        # the control watcher writes a byte here when control/ or users/ changed
        self.watch_r, self.watch_w = os.pipe()
        os.set_blocking(self.watch_r, False)
        self.logout = LogOutput(self.instance, self.foreground,
                                (self.ids["log"].uid, self.ids["log"].gid) if self.ids.privileged else None)
        try:
            self.logout.install(*self.logout.open(self.controls))
        except ControlFileError as e:
            raise StartError(str(e)) from None
        for spec in self.controls.listen:
            self.listen_socks[spec.key] = bind_listener(spec)
        # control/concurrencyperclient: one table shared by every listener process of
        # every generation (eqmail.connlimit), so it is made before any of them forks
        self.clients = ClientTable.create(capacity_for(sum(s.concurrency for s in self.controls.listen)))
        # Unix sockets are bound here, like the TCP ones, so a worker never needs write
        # access to run/ and a restarted worker serves the same socket.
        self.queue_sock = bind_unix(self.instance.queue_socket, 0o777, None)
        send = self.ids["send"]
        self.local_sock = bind_unix(self.instance.local_socket, 0o600,
                                    (send.uid, send.gid) if self.ids.privileged else None)
        # the plugin sandbox: only the listeners (eqmaild) may ask it to run plugins
        d = self.ids["daemon"]
        self.sandbox_sock = bind_unix(self.instance.run / "sandbox.sock", 0o600,
                                      (d.uid, d.gid) if self.ids.privileged else None)
        # ... and only the remote delivery worker (eqmailr) may ask it for before-remote
        # commands, on a socket of their own (the sandbox tells requests apart by socket)
        r = self.ids["remote"]
        self.sandbox_remote_sock = bind_unix(self.instance.run / "sandbox-remote.sock", 0o600,
                                             (r.uid, r.gid) if self.ids.privileged else None)
        spp = self.instance.root / "spp"  # state the shipped plugins keep (greylisting)
        spp.mkdir(exist_ok=True)
        os.chmod(spp, 0o700)
        if self.ids.privileged:
            os.chown(spp, self.ids["plugin"].uid, self.ids["plugin"].gid)
        # eqmailctl (root) asks the scanner to delete/bounce messages and for deliveries
        self.scanner_sock = bind_unix(self.instance.run / "scanner.sock", 0o600, None)
        self.remote_sock = None
        if has_worker("remote"):
            self.remote_sock = bind_unix(self.instance.run / "remote.sock", 0o600,
                                         (send.uid, send.gid) if self.ids.privileged else None)

    def _ensure_queue_files(self) -> None:
        # the spare-inode pools are newer than some queues (an older setup, an imported
        # qmail queue): make whichever is missing, owned as setup would
        for name, (_split, role, mode) in QUEUE_DIRS.items():
            d = self.instance.queue / name
            if name.startswith("spare-") and not d.exists():
                d.mkdir()
                os.chmod(d, mode)
                if self.ids.privileged:
                    os.chown(d, self.ids[role].uid, self.ids[role].gid)
        lock = self.instance.queue / "lock"
        trigger = lock / "trigger"
        if not trigger.exists():
            os.mkfifo(trigger, 0o622)
        for name in ("sendmutex",):
            p = lock / name
            if not p.exists():
                p.touch(0o600)
        if self.ids.privileged:
            send = self.ids["send"]
            os.chown(trigger, send.uid, send.gid)
            os.chown(lock / "sendmutex", send.uid, send.gid)

    def _base_workers(self) -> list[Worker]:
        scanner_extra: dict[str, Any] = {}
        remote: list[Worker] = []
        if self.remote_sock is not None:
            scanner_extra["remote_socket"] = str(self.instance.run / "remote.sock")
            remote.append(Worker("remote", "remote delivery", worker_entry("remote"), "remote",
                                 extra={"socket_fd": self.remote_sock.fileno()},
                                 keep_fds=(self.remote_sock.fileno(),)))
        return [
            Worker("logger", "logger", worker_entry("logger"), "log",
                   extra=self._logger_extra(), keep_fds=self._logger_fds()),
            Worker("queuewriter", "queue writer", worker_entry("queuewriter"), "queue",
                   extra={"socket_fd": self.queue_sock.fileno()},
                   keep_fds=(self.queue_sock.fileno(),)),
            Worker("local", "local delivery", worker_entry("local"), None,
                   extra={"socket_fd": self.local_sock.fileno()},
                   keep_fds=(self.local_sock.fileno(),)),
            *remote,
            Worker("sandbox", "plugin sandbox", worker_entry("sandbox"), "plugin",
                   extra={"socket_fd": self.sandbox_sock.fileno(),
                          "remote_socket_fd": self.sandbox_remote_sock.fileno()},
                   keep_fds=(self.sandbox_sock.fileno(), self.sandbox_remote_sock.fileno())),
            Worker("scanner", "scanner", worker_entry("scanner"), "send",
                   extra={**scanner_extra, "control_fd": self.scanner_sock.fileno()},
                   keep_fds=(self.scanner_sock.fileno(),)),
            Worker("watcher", "control watcher", worker_entry("watcher"), "log",
                   extra={"notify_fd": self.watch_w}, keep_fds=(self.watch_w,)),
        ]

    def _logger_extra(self) -> dict[str, Any]:
        return {"log_read_fd": self.log_r, "out_fd": self.logout.fd, "target": self.logout.target,
                "control_fd": self.logout.logger_end.fileno()}

    def _logger_fds(self) -> tuple[int, ...]:
        return (self.log_r, self.logout.fd, self.logout.logger_end.fileno())

    def _listener_workers(self, spec: ListenerSpec) -> list[Worker]:
        """``processes`` workers sharing the listener's socket (each accepts from it)."""
        from eqmail.tls import ServerTLS

        sock = self.listen_socks[spec.key]
        # The TLS context (and so the private key) is loaded here, as root, and reaches
        # the worker through fork; a reload loads a swapped certificate.
        tls = ServerTLS.load(self.instance.control, env=dict(spec.env),
                             ciphers=self.controls.tlsserverciphers, client_cert=spec.clientcert)
        name = f"listener {spec.service} {spec.display_address}"
        return [Worker("listener", name + (f" #{i + 1}" if spec.processes > 1 else ""),
                       worker_entry("listener"), "daemon",
                       extra={"socket_fd": sock.fileno(), "spec": spec, "tls": tls,
                              "clients": self.clients},
                       keep_fds=(sock.fileno(), self.clients.fd), spec=spec)
                for i in range(spec.processes)]

    # ------------------------------------------------------------ spawning
    def start_worker(self, w: Worker) -> None:
        ready_r, ready_w = os.pipe()
        controls = w.controls or self.controls
        extra = dict(w.extra)
        keep_fds = w.keep_fds
        status_w = -1
        if w.kind == "listener":  # the listener reports its session count here
            w.status_r, status_w = os.pipe()
            os.set_blocking(w.status_r, False)
            os.set_blocking(status_w, False)
            extra["status_fd"] = status_w
            keep_fds = (*keep_fds, status_w)
        ctx = WorkerContext(kind=w.kind, name=w.name, instance=self.instance, controls=controls,
                            ids=self.ids, generation=w.generation or self.generation,
                            ready_fd=ready_w, extra=extra)
        ids: Ids | None = None if w.role is None else self.ids[w.role]
        groups = None
        if ids is not None and self.ids.privileged:
            groups = [ids.gid]
        if not self.ids.privileged:
            ids = None
        spec = SpawnSpec(ctx=ctx, entry=w.entry, ids=ids, groups=groups, keep_fds=keep_fds,
                         log_fd=self.log_w, title=w.title, nice=DELIVERY_NICE.get(w.kind, 0))
        w.proc = spawn(spec)
        os.close(ready_w)
        if status_w >= 0:
            os.close(status_w)
            w.sessions = 0
            self.sel.register(w.status_r, selectors.EVENT_READ, ("sessions", w))
        w.ready_r = ready_r
        w.ready = False
        w.state = "starting"
        w.generation = ctx.generation
        w.restart.on_start(time.time())
        w.restart_at = None
        self.sel.register(ready_r, selectors.EVENT_READ, ("ready", w))
        self.sel.register(w.proc.pidfd, selectors.EVENT_READ, ("exit", w))

    def wait_ready(self, workers: list[Worker]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in workers):
            if time.monotonic() > deadline:
                names = ", ".join(w.name for w in workers if not w.ready)
                raise StartError(f"workers not ready after {READY_TIMEOUT:.0f}s: {names}")
            self.poll(0.5)
            for w in workers:
                if w.proc is None and not w.ready:
                    w.restart_at = time.time() + 1.0  # keep trying in the background
                    raise StartError(f"{w.name} exited during start-up (see the log)")

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        try:
            from setproctitle import setproctitle

            setproctitle(f"eqmail: supervisor {self.instance.root}")
        except ImportError:  # pragma: no cover
            pass
        self.prepare()
        self._install_signals()
        os.dup2(self.log_w, 2)  # from here on the supervisor's own lines go to the logger too
        self.workers = self._base_workers()
        for w in self.workers:
            self.start_worker(w)
            try:
                self.wait_ready([w])
            except StartError as e:
                if w.kind != "remote":
                    raise
                # Remote mail can wait in the queue: start anyway, restart it with back-off.
                log(f"alert: {e}; remote deliveries wait until it runs")
        for spec in self.controls.listen:
            for lw in self._listener_workers(spec):
                self.workers.append(lw)
                self.start_worker(lw)
        self.wait_ready([w for w in self.workers if w.kind != "remote"])
        self.status_server = StatusSocket(self.instance.status_socket)
        self.sel.register(self.status_server.sock, selectors.EVENT_READ, ("status", None))
        self.sel.register(self.watch_r, selectors.EVENT_READ, ("watch", None))
        log(f"status: eqmail started, pid {os.getpid()}, generation {self.generation}")
        self._notify(b"ok\n")
        while not self.stopping or any(w.proc for w in self.workers):
            self.poll(1.0)
            self._refresh_status()
            self._restart_due()
            self._check_reload_complete()
            if self.stopping:
                self._stop_step()
        log("status: eqmail stopped")
        return 0

    def poll(self, timeout: float) -> None:
        # the watchdog ping rides on the loop: it stops when the loop stops turning
        events = self.sel.select(min(timeout, self.notifier.watchdog()))
        # Signals first: a worker that exits because the whole group got a signal must
        # be seen as stopping, not as a crash to restart.
        events.sort(key=lambda ev: ev[0].data[0] != "signal")
        for key, _ in events:
            kind, obj = key.data
            if kind == "signal":
                self._drain_signals()
                self._handle_signals()
            elif kind == "ready":
                self._on_ready(obj)
            elif kind == "exit":
                self._on_exit(obj)
            elif kind == "status":
                self.status_server.serve(self.status)
            elif kind == "watch":
                self._on_control_change()
            elif kind == "sessions":
                self._on_sessions(obj)
        self._handle_signals()

    def _on_sessions(self, w: Worker) -> None:
        if w.status_r < 0:  # a stale event: the worker exited earlier in this batch
            return
        try:
            data = os.read(w.status_r, 4096)
        except OSError:
            return
        lines = data.split()
        if b"closed" in lines:
            w.accepting = False
        numbers = [ln for ln in lines if ln.isdigit()]
        if numbers:
            w.sessions = int(numbers[-1])

    def _on_ready(self, w: Worker) -> None:
        if w.ready_r < 0:  # a stale event: the worker exited earlier in this batch
            return
        try:
            data = os.read(w.ready_r, 16)
        except OSError:
            data = b""
        self.sel.unregister(w.ready_r)
        os.close(w.ready_r)
        w.ready_r = -1
        if data.startswith(b"R"):
            w.ready = True
            w.state = "running"

    def _on_exit(self, w: Worker) -> None:
        if w.proc is None:  # a stale event for a worker already handled
            return
        self.sel.unregister(w.proc.pidfd)
        os.close(w.proc.pidfd)
        try:
            _, status = os.waitpid(w.proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        if w.ready_r >= 0:
            self.sel.unregister(w.ready_r)
            os.close(w.ready_r)
            w.ready_r = -1
        if w.status_r >= 0:
            self.sel.unregister(w.status_r)
            os.close(w.status_r)
            w.status_r = -1
            w.sessions = 0
        pid = w.proc.pid
        w.proc = None
        w.ready = False
        if w.kind == "listener":  # sessions a killed listener never released
            dropped = self.clients.purge(pid)
            if dropped:
                log(f"status: {w.name} (pid {pid}) left {dropped} client session(s) counted; forgotten")
        if self.stopping or w.retired:
            w.state = "stopped"
            log(f"status: {w.name} (pid {pid}) exited with {code}")
            if w.retired and not self.stopping:
                self._retired_exit(w)
            return
        delay = w.restart.on_exit(time.time())
        w.state = "backoff"
        w.restart_at = time.time() + delay
        log(f"alert: {w.name} (pid {pid}) exited with {code}; restarting in {delay:.0f}s")

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.time()
        for w in self.workers:
            if w.proc is None and w.restart_at is not None and w.restart_at <= now and not w.retired:
                self.start_worker(w)

    # ------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)
        signal.set_wakeup_fd(self.sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD,
                    signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)
        self.sel.register(self.sig_r, selectors.EVENT_READ, ("signal", None))

    def _drain_signals(self) -> None:
        try:
            data = os.read(self.sig_r, 512)
        except BlockingIOError:
            return
        self.pending_signals.extend(data)

    def _handle_signals(self) -> None:
        sigs, self.pending_signals = self.pending_signals, []
        actions = {
            signal.SIGTERM: self.begin_stop,
            signal.SIGINT: self.begin_stop,
            signal.SIGHUP: self.reload,
            signal.SIGALRM: self.flush,
            signal.SIGUSR1: self.reopen_logs,
        }
        seen: set[int] = set()
        for s in sigs:
            if s in actions and s not in seen:  # a storm of HUPs is one reload
                seen.add(s)
                actions[signal.Signals(s)]()

    def flush(self) -> None:
        for w in self.workers:
            if w.kind == "scanner" and w.proc is not None:
                os.kill(w.proc.pid, signal.SIGALRM)

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
            self.switch_log(*opened)
            self.logout.error = ""
        self.logout.reopens += 1

    def switch_log(self, *opened: Any) -> None:
        """Install an opened output and hand it to the logger (and to its successors)."""
        self.logout.install(*opened)
        self.logout.send()
        for w in self.workers:
            if w.kind == "logger":
                w.extra = self._logger_extra()
                w.keep_fds = self._logger_fds()

    # ------------------------------------------------------------ stop
    def begin_stop(self) -> None:
        if self.stopping:
            return
        log("status: stopping")
        self.notifier.stopping("stopping")
        self.stopping = True
        self.stop_phase = 0
        self._stop_step()

    # The sandbox stops after the remote worker, whose deliveries may still need it.
    STOP_ORDER = (("listener", "watcher"), ("scanner",),
                  ("local", "remote", "queuewriter"), ("sandbox",), ("logger",))

    def _stop_step(self) -> None:
        while self.stop_phase < len(self.STOP_ORDER):
            kinds = self.STOP_ORDER[self.stop_phase]
            alive = [w for w in self.workers if w.kind in kinds and w.proc is not None]
            if alive:
                for w in alive:
                    if w.state != "stopping":
                        w.state = "stopping"
                        os.kill(w.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
                return
            self.stop_phase += 1
            if self.stop_phase == len(self.STOP_ORDER) - 1:
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
        if self.notifier.enabled and not self.stopping and self.reload_pending is None \
                and time.monotonic() >= self.status_due:
            self.notifier.set_status(self.summary())
            self.status_due = time.monotonic() + STATUS_EVERY

