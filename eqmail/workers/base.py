"""What every worker receives from the supervisor: its kind, its context and settings.

A worker module exposes ``run(ctx: WorkerContext[<Kind>Settings]) -> int``.  The
supervisor's spawn routine has already set the process title, closed what the worker
must not have and dropped privileges (checked) before calling it.  The worker signals
readiness with ``ctx.ready()`` once it serves (sockets open, state recovered).

``WorkerKind`` names every kind of worker; ``ctx.settings`` is the frozen settings
value of that kind (the fds and objects the supervisor made for it before the fork),
typed per kind, so a worker reads ``ctx.settings.socket_fd`` rather than a string key.
The supervisor's table of kinds (eqmail.supervisor.kinds) says which settings class
belongs to which kind.  Nothing here imports ``eqmail.supervisor``: workers never do.
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from eqmail.control import Controls, ListenerSpec
from eqmail.instance import Instance
from eqmail.ipc.logtarget import LogTarget
from eqmail.ipc.worker import Ready
from eqmail.privsep.ids import SystemIds

if TYPE_CHECKING:
    from eqmail.connlimit import ClientTable
    from eqmail.spp.runner import Limits
    from eqmail.tls import ServerTLS


class WorkerKind(enum.StrEnum):
    """Every kind of worker process; the value is what status and logs show."""

    LOGGER = "logger"
    QUEUEWRITER = "queuewriter"
    LOCAL = "local"
    REMOTE = "remote"
    SANDBOX = "sandbox"
    SCANNER = "scanner"
    WATCHER = "watcher"
    LISTENER = "listener"
    POLICY = "policy"  # the MTA-STS policy worker (issue 17)


@dataclass(frozen=True)
class Settings:
    """Base of the per-kind settings."""


@dataclass(frozen=True)
class LoggerSettings(Settings):
    log_read_fd: int  # the read end of the log pipe every process writes to
    out_fd: int       # where the lines go (a file, stdout, the journal's stream; -1: syslog)
    target: LogTarget
    control_fd: int   # the supervisor's socketpair end: a new output after a reopen


@dataclass(frozen=True)
class SocketSettings(Settings):
    """A worker that serves one Unix socket the supervisor bound (queue writer, local
    and remote delivery)."""

    socket_fd: int


@dataclass(frozen=True)
class QueueWriterSettings(SocketSettings):
    pass


@dataclass(frozen=True)
class LocalSettings(SocketSettings):
    pass


@dataclass(frozen=True)
class RemoteSettings(SocketSettings):
    pass


@dataclass(frozen=True)
class PolicySettings(SocketSettings):
    pass  # run/policy.sock: the remote worker's MTA-STS questions


@dataclass(frozen=True)
class SandboxSettings(Settings):
    socket_fd: int                   # run/sandbox.sock: the listeners' requests
    remote_socket_fd: int | None = None  # run/sandbox-remote.sock: before-remote commands
    limits: Limits | None = None     # plugin rlimits (default: eqmail.spp.runner's)


@dataclass(frozen=True)
class ScannerSettings(Settings):
    control_fd: int | None           # run/scanner.sock: eqmailctl's queue requests
    remote_socket: str | None        # run/remote.sock; None: no remote delivery worker


@dataclass(frozen=True)
class WatcherSettings(Settings):
    notify_fd: int                   # one byte here: control/ or users/ changed


@dataclass(frozen=True)
class ListenerSettings(Settings):
    socket_fd: int                   # the listening TCP socket (shared by its processes)
    spec: ListenerSpec
    tls: ServerTLS | None            # loaded as root before the fork (the key)
    clients: ClientTable | None      # control/concurrencyperclient, shared
    status_fd: int = -1              # session counts and "closed" to the supervisor
    config_fd: int = -1              # the supervisor's channel: new configuration (ipc.config)


S = TypeVar("S", bound=Settings)


@dataclass
class WorkerContext(Generic[S]):
    kind: WorkerKind
    name: str  # unique name, e.g. "listener smtp 127.0.0.1:2525"
    instance: Instance
    controls: Controls
    ids: SystemIds
    generation: int
    settings: S
    ready_fd: int = -1
    on_ready: Callable[[], None] | None = None

    def ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()
        if self.ready_fd >= 0:
            try:
                os.write(self.ready_fd, Ready().encode())
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = -1


def stop_on_sigterm(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM sets ``stop`` — also a SIGTERM that arrives before ``loop`` runs.

    uvloop arms its signal wake-up only while the loop runs: a signal that comes between
    ``add_signal_handler`` and ``run_until_complete`` is taken by its no-op Python handler
    and lost, and the supervisor then waits for this worker forever (a reload retiring a
    listener that had just started did exactly that).  So SIGTERM is blocked here and
    unblocked by the loop's first callback, where a pending one is delivered and handled.
    Threads started in between inherit the block, which keeps the signal the main
    thread's; a program started in between would inherit it too, so start none.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, {signal.SIGTERM})


def drain_wake_pipe(fd: int) -> None:
    """Empty a non-blocking self-pipe whose bytes only mean "look again" (a signal, a
    finished thread, a changed control file): what is pending is read and dropped."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # EAGAIN: empty now
        pass
