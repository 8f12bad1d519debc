"""The table of worker kinds: what each kind runs, as whom, and how it is restarted.

One row per ``WorkerKind`` (``KINDS``): its entry module (``eqmail.workers.<module>``,
whose ``run(ctx)`` the spawn routine calls), its settings class, the role whose user it
drops to (``None``: stays root -- only the local spawner, which forks and switches to
each recipient's user), its restart policy, its readiness timeout, whether a failed
start stops the whole start, its CPU niceness, the controls a reload compares to decide
whether to replace it, the signal that asks it to make way for a successor, and its
phase in the ordered stop.

The table is checked when this module is imported -- every kind has a row, every
control named is a field of ``Controls``, only the local spawner stays root -- and a
``Worker`` record refuses settings of another kind (worker.py), so a typo cannot
silently mean "never restart", "never replaced on reload" or "runs as root".  Pure data
plus the lazy import of entry points; no system calls.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eqmail.control import Controls
from eqmail.privsep.ids import Role
from eqmail.workers.base import (
    ListenerSettings,
    LocalSettings,
    LoggerSettings,
    PolicySettings,
    QueueWriterSettings,
    RemoteSettings,
    SandboxSettings,
    ScannerSettings,
    Settings,
    WatcherSettings,
    WorkerContext,
    WorkerKind,
)


class Restart(enum.Enum):
    BACKOFF = "backoff"  # restarted when it exits, after policy.RestartState's delay


class StartFailure(enum.Enum):
    FATAL = "fatal"  # the whole start fails (eqmailctl start reports it)
    WAIT = "wait"    # start anyway and keep restarting it (remote mail waits in the queue)


class OnReload(enum.Enum):
    KEEP = "keep"              # runs on (reads no controls a reload could change)
    REPLACE = "replace"        # replaced gracefully when one of ``reload_controls`` changed
    LISTENER_DIFF = "diff"     # kept (new configuration pushed) or replaced: supervisor.diff


@dataclass(frozen=True)
class KindSpec:
    kind: WorkerKind
    module: str                      # eqmail.workers.<module>.run
    settings: type[Settings]
    title: str                       # the process title's name (listeners add their address)
    role: Role | None                # None: stays root (the local spawner only)
    restart: Restart
    ready_timeout: float             # seconds to become ready at start
    start_failure: StartFailure
    on_reload: OnReload
    stop_phase: int                  # STOP: phase 0 first; the next when all of one exited
    nice: int = 0                    # added to the niceness (delivery runs below receiving)
    reload_controls: tuple[str, ...] = ()
    handover: signal.Signals = signal.SIGTERM  # asks it to make way for its successor


READY_TIMEOUT = 30.0

# Receiving comes first: an SMTP client holds its connection open while the listener
# and the queue writer work, a queued message can wait a moment for delivery.  So the
# delivery side (and the local delivery children and programs it starts) runs at a
# lower CPU priority; on an idle machine this changes nothing.  Measured under a burst
# on 2 cores: acceptance +15 %, end to end within the noise (bench/PROFILE.md).
DELIVERY_NICE = 5

# Stop order: the sandbox stops after the remote worker, whose deliveries may still
# need it; the logger goes last.
_ROWS = (
    KindSpec(WorkerKind.LOGGER, "logger", LoggerSettings, "logger", Role.LOG, Restart.BACKOFF,
             READY_TIMEOUT, StartFailure.FATAL, OnReload.KEEP, stop_phase=4),
    KindSpec(WorkerKind.QUEUEWRITER, "queuewriter", QueueWriterSettings, "queue writer", Role.QUEUE,
             Restart.BACKOFF, READY_TIMEOUT, StartFailure.FATAL, OnReload.KEEP, stop_phase=2),
    KindSpec(WorkerKind.LOCAL, "local", LocalSettings, "local delivery", None, Restart.BACKOFF,
             READY_TIMEOUT, StartFailure.FATAL, OnReload.REPLACE, stop_phase=2, nice=DELIVERY_NICE,
             reload_controls=("me", "assign", "defaultdelivery", "concurrencylocal",
                              "timeoutprogram")),
    KindSpec(WorkerKind.REMOTE, "remote", RemoteSettings, "remote delivery", Role.REMOTE,
             Restart.BACKOFF, READY_TIMEOUT, StartFailure.WAIT, OnReload.REPLACE, stop_phase=2,
             nice=DELIVERY_NICE,
             reload_controls=("me", "helohost", "smtproutes", "timeoutconnect", "timeoutremote",
                              "dnsservers", "concurrencyremote", "locals", "beforemote",
                              "tlsclientciphers", "clientcert", "tlshosts", "tlshosts_exhaustive",
                              "notlshosts", "dkimsign", "virtualdomains", "srs", "srsdomain",
                              "srssecrets", "srsexclude", "dnssec", "mtasts", "tlsca")),
    KindSpec(WorkerKind.SANDBOX, "sandbox", SandboxSettings, "plugin sandbox", Role.PLUGIN,
             Restart.BACKOFF, READY_TIMEOUT, StartFailure.FATAL, OnReload.REPLACE, stop_phase=3,
             reload_controls=("spptimeout",)),
    # The scanner is asked to hand over rather than to stop: it exits at once and its
    # successor takes over the deliveries still running (eqmail.workers.scanner).
    KindSpec(WorkerKind.SCANNER, "scanner", ScannerSettings, "scanner", Role.SEND, Restart.BACKOFF,
             READY_TIMEOUT, StartFailure.FATAL, OnReload.REPLACE, stop_phase=1, nice=DELIVERY_NICE,
             reload_controls=("me", "locals", "virtualdomains", "percenthack", "envnoathost",
                              "bouncefrom", "bouncehost", "doublebouncehost", "doublebounceto",
                              "concurrencylocal", "concurrencyremote", "queuelifetime",
                              "srs", "srsdomain", "srssecrets"),
             handover=signal.SIGUSR1),
    KindSpec(WorkerKind.WATCHER, "watcher", WatcherSettings, "control watcher", Role.LOG,
             Restart.BACKOFF, READY_TIMEOUT, StartFailure.FATAL, OnReload.KEEP, stop_phase=0),
    # MTA-STS policies for the remote worker (and the TLS-RPT mail): stops after it
    KindSpec(WorkerKind.POLICY, "policy", PolicySettings, "mta-sts policy", Role.POLICY,
             Restart.BACKOFF, READY_TIMEOUT, StartFailure.WAIT, OnReload.REPLACE, stop_phase=3,
             reload_controls=("me", "dnsservers", "mtasts", "tlsca")),
    KindSpec(WorkerKind.LISTENER, "listener", ListenerSettings, "listener", Role.DAEMON,
             Restart.BACKOFF, READY_TIMEOUT, StartFailure.FATAL, OnReload.LISTENER_DIFF,
             stop_phase=0),
)

CONTROL_FIELDS = frozenset(f.name for f in dataclasses.fields(Controls))


def check_table(rows: tuple[KindSpec, ...]) -> dict[WorkerKind, KindSpec]:
    """The table by kind; ValueError when a kind is missing or doubled, a control name
    is not a field of Controls, or a reload rule contradicts the row."""
    table: dict[WorkerKind, KindSpec] = {}
    for row in rows:
        if row.kind in table:
            raise ValueError(f"worker kind {row.kind} listed twice")
        unknown = set(row.reload_controls) - CONTROL_FIELDS
        if unknown:
            raise ValueError(f"{row.kind}: no such control: {', '.join(sorted(unknown))}")
        if (row.on_reload is OnReload.REPLACE) != bool(row.reload_controls):
            raise ValueError(f"{row.kind}: replaced on reload exactly when it names controls")
        if row.role is None and row.kind is not WorkerKind.LOCAL:
            raise ValueError(f"{row.kind}: only the local spawner may stay root")
        if row.ready_timeout <= 0 or row.stop_phase < 0 or row.nice < 0:
            raise ValueError(f"{row.kind}: bad timeout, stop phase or niceness")
        table[row.kind] = row
    missing = set(WorkerKind) - set(table)
    if missing:
        raise ValueError(f"worker kinds without a row: {', '.join(sorted(missing))}")
    return table


KINDS: dict[WorkerKind, KindSpec] = check_table(_ROWS)
STOP_PHASES = 1 + max(row.stop_phase for row in _ROWS)


def controls_changed(kind: WorkerKind, old: Controls, new: Controls) -> bool:
    """Does a reload from ``old`` to ``new`` replace a worker of ``kind``?  (Only for
    OnReload.REPLACE kinds; listeners go through the listener diff.)"""
    row = KINDS[kind]
    return row.on_reload is OnReload.REPLACE and any(
        getattr(old, name) != getattr(new, name) for name in row.reload_controls)


def has_worker(kind: WorkerKind) -> bool:
    """Is the worker's module installed (a build may leave remote delivery out)?"""
    return importlib.util.find_spec(f"eqmail.workers.{KINDS[kind].module}") is not None


def entry_point(kind: WorkerKind) -> Callable[[WorkerContext[Any]], int]:
    """The kind's ``run``.  Called in the supervisor before any fork: a worker that
    dropped privileges may not be able to read the package files any more."""
    module = importlib.import_module(f"eqmail.workers.{KINDS[kind].module}")
    run: Callable[[WorkerContext[Any]], int] = module.run
    return run
