"""What the supervisor sets up as root before any worker starts: the plant.

Owns: the pid file and its lock (run/eqmail.pid), the queue's lock files and spare
pools when missing, the log pipe and the log output (logoutput.py), the control
watcher's pipe, every listening socket (TCP per control/listen line, and the Unix
sockets in run/, each with its owner and mode), the shared per-client session table
(eqmail.connlimit), and the settings of the base workers built from them.  Runs as
root, once, in ``prepare``; ``Plant`` then holds the results for the supervisor's
parts (main.py, pool.py, listeners.py, reload.py).

Failure modes: another supervisor holding the lock, an unusable log output, or a
socket that cannot be bound raise ``StartError`` or ``OSError`` (start-up fails).
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass

from eqmail.connlimit import ClientTable, capacity_for
from eqmail.control import Controls, load_controls
from eqmail.errors import ControlFileError
from eqmail.instance import Instance
from eqmail.privsep.ids import Role, SystemIds
from eqmail.queue.layout import QUEUE_DIRS
from eqmail.supervisor.kinds import KINDS, has_worker
from eqmail.supervisor.logoutput import LogOutput
from eqmail.supervisor.sockets import bind_listener, bind_unix
from eqmail.supervisor.worker import Worker
from eqmail.workers.base import (
    LocalSettings,
    LoggerSettings,
    PolicySettings,
    QueueWriterSettings,
    RemoteSettings,
    SandboxSettings,
    ScannerSettings,
    Settings,
    WatcherSettings,
    WorkerKind,
)


class StartError(Exception):
    pass


@dataclass
class UnixSockets:
    queue: socket.socket            # run/queue.sock (anyone: the queue writer's clients)
    local: socket.socket            # run/local.sock (the scanner, as eqmails)
    sandbox: socket.socket          # run/sandbox.sock (the listeners, as eqmaild)
    sandbox_remote: socket.socket   # run/sandbox-remote.sock (the remote worker, eqmailr)
    scanner: socket.socket          # run/scanner.sock (eqmailctl, root)
    remote: socket.socket | None    # run/remote.sock; None without a remote worker
    policy: socket.socket | None = None  # run/policy.sock (the remote worker, eqmailr)


@dataclass
class Plant:
    instance: Instance
    controls: Controls              # as parsed at start
    ids: SystemIds
    pid_fd: int
    log_r: int                      # the logger reads every process's lines here
    log_w: int
    watch_r: int                    # the control watcher writes a byte here on a change
    watch_w: int
    logout: LogOutput
    unix: UnixSockets
    listen_socks: dict[str, socket.socket]
    clients: ClientTable

    def logger_settings(self) -> LoggerSettings:
        return LoggerSettings(log_read_fd=self.log_r, out_fd=self.logout.fd, target=self.logout.target,
                              control_fd=self.logout.logger_end.fileno())

    def logger_fds(self) -> tuple[int, ...]:
        return (self.log_r, self.logout.fd, self.logout.logger_end.fileno())

    def base_workers(self) -> list[Worker]:
        """Every worker but the listeners, in start order."""
        u = self.unix

        def worker(kind: WorkerKind, settings: Settings, *fds: int) -> Worker:
            return Worker(kind, KINDS[kind].title, settings, keep_fds=fds)

        remote: list[Worker] = []
        if u.policy is not None:  # before remote delivery, which asks it
            remote.append(worker(WorkerKind.POLICY, PolicySettings(u.policy.fileno()), u.policy.fileno()))
        if u.remote is not None:
            remote.append(worker(WorkerKind.REMOTE, RemoteSettings(u.remote.fileno()), u.remote.fileno()))
        return [
            worker(WorkerKind.LOGGER, self.logger_settings(), *self.logger_fds()),
            worker(WorkerKind.QUEUEWRITER, QueueWriterSettings(u.queue.fileno()), u.queue.fileno()),
            worker(WorkerKind.LOCAL, LocalSettings(u.local.fileno()), u.local.fileno()),
            *remote,
            worker(WorkerKind.SANDBOX, SandboxSettings(u.sandbox.fileno(), u.sandbox_remote.fileno()),
                   u.sandbox.fileno(), u.sandbox_remote.fileno()),
            worker(WorkerKind.SCANNER,
                   ScannerSettings(control_fd=u.scanner.fileno(),
                                   remote_socket=None if u.remote is None
                                   else str(self.instance.run / "remote.sock")),
                   u.scanner.fileno()),
            worker(WorkerKind.WATCHER, WatcherSettings(self.watch_w), self.watch_w),
        ]


def prepare(instance: Instance, foreground: bool) -> Plant:
    controls = load_controls(instance.root)
    ids = SystemIds.lookup()
    run = instance.run
    run.mkdir(exist_ok=True)
    os.chmod(run, 0o755)
    pid_fd = os.open(instance.pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartError("eqmail is already running for this instance") from None
    os.ftruncate(pid_fd, 0)
    os.write(pid_fd, f"{os.getpid()}\n".encode())
    _ensure_queue_files(instance, ids)
    log_r, log_w = os.pipe()
    watch_r, watch_w = os.pipe()
    os.set_blocking(watch_r, False)
    log_owner = (ids[Role.LOG].uid, ids[Role.LOG].gid) if ids.privileged else None
    logout = LogOutput(instance, foreground, log_owner)
    try:
        logout.install(*logout.open(controls))
    except ControlFileError as e:
        raise StartError(str(e)) from None
    listen_socks = {spec.key: bind_listener(spec) for spec in controls.listen}
    # control/concurrencyperclient: one table shared by every listener process of
    # every generation (eqmail.connlimit), so it is made before any of them forks
    clients = ClientTable.create(capacity_for(sum(s.concurrency for s in controls.listen)))
    plant = Plant(instance, controls, ids, pid_fd, log_r, log_w, watch_r, watch_w, logout,
                  _bind_unix_sockets(instance, ids), listen_socks, clients)
    spp = instance.root / "spp"  # state the shipped plugins keep (greylisting)
    spp.mkdir(exist_ok=True)
    os.chmod(spp, 0o700)
    if ids.privileged:
        os.chown(spp, ids[Role.PLUGIN].uid, ids[Role.PLUGIN].gid)
    sts = instance.root / "sts"  # the MTA-STS policy cache (eqmail.workers.stscache)
    sts.mkdir(exist_ok=True)
    os.chmod(sts, 0o700)
    if ids.privileged:
        os.chown(sts, ids[Role.POLICY].uid, ids[Role.POLICY].gid)
    return plant


def _bind_unix_sockets(instance: Instance, ids: SystemIds) -> UnixSockets:
    """Bound here, like the TCP ones, so a worker never needs write access to run/ and
    a restarted worker serves the same socket."""

    def owner(role: Role) -> tuple[int, int] | None:
        return (ids[role].uid, ids[role].gid) if ids.privileged else None

    run = instance.run
    return UnixSockets(
        queue=bind_unix(instance.queue_socket, 0o777, None),
        local=bind_unix(instance.local_socket, 0o600, owner(Role.SEND)),
        # the plugin sandbox: only the listeners (eqmaild) may ask it to run plugins
        sandbox=bind_unix(run / "sandbox.sock", 0o600, owner(Role.DAEMON)),
        # ... and only the remote delivery worker (eqmailr) may ask it for before-remote
        # commands, on a socket of their own (the sandbox tells requests apart by socket)
        sandbox_remote=bind_unix(run / "sandbox-remote.sock", 0o600, owner(Role.REMOTE)),
        # eqmailctl (root) asks the scanner to delete/bounce messages and for deliveries
        scanner=bind_unix(run / "scanner.sock", 0o600, None),
        remote=bind_unix(run / "remote.sock", 0o600, owner(Role.SEND))
        if has_worker(WorkerKind.REMOTE) else None,
        # MTA-STS policies: only the remote delivery worker (eqmailr) may ask
        policy=bind_unix(run / "policy.sock", 0o600, owner(Role.REMOTE))
        if has_worker(WorkerKind.REMOTE) and has_worker(WorkerKind.POLICY) else None,
    )


def _ensure_queue_files(instance: Instance, ids: SystemIds) -> None:
    # the spare-inode pools are newer than some queues (an older setup, an imported
    # qmail queue): make whichever is missing, owned as setup would
    for name, (_split, role, mode) in QUEUE_DIRS.items():
        d = instance.queue / name
        if name.startswith("spare-") and not d.exists():
            d.mkdir()
            os.chmod(d, mode)
            if ids.privileged:
                os.chown(d, ids[role].uid, ids[role].gid)
    lock = instance.queue / "lock"
    trigger = lock / "trigger"
    if not trigger.exists():
        os.mkfifo(trigger, 0o622)
    for name in ("sendmutex",):
        p = lock / name
        if not p.exists():
            p.touch(0o600)
    if ids.privileged:
        send = ids[Role.SEND]
        os.chown(trigger, send.uid, send.gid)
        os.chown(lock / "sendmutex", send.uid, send.gid)
