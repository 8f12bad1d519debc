"""Spawning and restarting: the supervisor's worker processes.

Owns: the list of ``Worker`` records and their processes -- starting one (its
readiness pipe, and for a listener its session-count pipe and configuration channel;
then spawn.py's fork and privilege drop, as the user kinds.py names), readiness,
reaping an exit (pidfd), and restarting a worker that exited unasked after
policy.RestartState's back-off.  Runs as root in the supervisor's single-threaded loop;
every fd it opens for a worker it registers with the loop's selector and closes when
the worker exits.

Failure modes: a worker not ready within its kind's timeout, or one that exits during
start-up, raises ``StartError`` from ``wait_ready``; a fork that fails raises OSError.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from eqmail.control import Controls
from eqmail.instance import Instance
from eqmail.ipc.config import ConfigReader
from eqmail.ipc.worker import Ready
from eqmail.log import log
from eqmail.privsep.ids import SystemIds
from eqmail.supervisor.kinds import entry_point
from eqmail.supervisor.plant import StartError
from eqmail.supervisor.spawn import SpawnSpec, spawn
from eqmail.supervisor.worker import Worker, WorkerState
from eqmail.workers.base import ListenerSettings, Settings, WorkerContext, WorkerKind


class Exit(enum.Enum):
    """What became of a worker that exited."""

    RESTART = "restart"  # unasked: restarted after its back-off
    STOPPED = "stopped"  # asked to, by a stop
    RETIRED = "retired"  # asked to, by a reload: a successor may be due


class WorkerPool:
    def __init__(self, instance: Instance, ids: SystemIds, sel: selectors.BaseSelector,
                 log_w: int, on_reap: Callable[[Worker, int], None]) -> None:
        self.instance = instance
        self.ids = ids
        self.sel = sel
        self.log_w = log_w  # every worker's stdout and stderr
        self.on_reap = on_reap  # called with each reaped worker and its pid, before the verdict
        self.workers: list[Worker] = []

    def of_kind(self, *kinds: WorkerKind) -> list[Worker]:
        return [w for w in self.workers if w.kind in kinds]

    def alive(self, *kinds: WorkerKind) -> list[Worker]:
        return [w for w in self.workers if w.kind in kinds and w.proc is not None]

    def signal(self, kind: WorkerKind, sig: signal.Signals) -> None:
        for w in self.alive(kind):
            os.kill(w.proc.pid, sig)  # type: ignore[union-attr]

    # ------------------------------------------------------------ starting
    def start(self, w: Worker, controls: Controls, generation: int) -> None:
        ready_r, ready_w = os.pipe()
        settings, keep_fds, child_fds = self._per_start_fds(w)
        ctx = WorkerContext(kind=w.kind, name=w.name, instance=self.instance, controls=controls,
                            ids=self.ids, generation=generation, ready_fd=ready_w,
                            settings=settings)
        row = w.policy
        ids = None if row.role is None or not self.ids.privileged else self.ids[row.role]
        spec = SpawnSpec(ctx=ctx, entry=entry_point(w.kind), ids=ids,
                         groups=None if ids is None else [ids.gid], keep_fds=keep_fds,
                         log_fd=self.log_w, title=w.title, nice=row.nice)
        try:
            w.proc = spawn(spec)
        finally:
            os.close(ready_w)
            for fd in child_fds:
                os.close(fd)
        if w.status_r >= 0:
            w.sessions = 0
            self.sel.register(w.status_r, selectors.EVENT_READ, ("sessions", w))
        if w.channel is not None:
            self.sel.register(w.channel, selectors.EVENT_READ, ("config", w))
        w.ready_r = ready_r
        w.ready = False
        w.state = WorkerState.STARTING
        w.generation = generation
        w.restart.on_start(time.time())
        w.restart_at = None
        self.sel.register(ready_r, selectors.EVENT_READ, ("ready", w))
        self.sel.register(w.proc.pidfd, selectors.EVENT_READ, ("exit", w))

    def _per_start_fds(self, w: Worker) -> tuple[Settings, tuple[int, ...], tuple[int, ...]]:
        """The settings and fds of this start: a listener reports its session count on
        a pipe and takes new configurations on a socketpair (eqmail.ipc.config), both
        made afresh for each process.  Returns (settings, fds to keep, the child's ends
        to close here after the fork)."""
        if not isinstance(w.settings, ListenerSettings):
            return w.settings, w.keep_fds, ()
        w.status_r, status_w = os.pipe()
        os.set_blocking(w.status_r, False)
        os.set_blocking(status_w, False)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.setblocking(False)
        w.channel, w.channel_reader = mine, ConfigReader(b"u")
        w.accepting = True
        settings = dataclasses.replace(w.settings, status_fd=status_w, config_fd=theirs.fileno())
        child = (status_w, theirs.detach())
        return settings, (*w.keep_fds, *child), child

    def wait_ready(self, workers: list[Worker], poll: Callable[[float], None]) -> None:
        timeout = max(w.policy.ready_timeout for w in workers)
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in workers):
            if time.monotonic() > deadline:
                names = ", ".join(w.name for w in workers if not w.ready)
                raise StartError(f"workers not ready after {timeout:.0f}s: {names}")
            poll(0.5)
            for w in workers:
                if w.proc is None and not w.ready:
                    w.restart_at = time.time() + 1.0  # keep trying in the background
                    raise StartError(f"{w.name} exited during start-up (see the log)")

    def on_ready(self, w: Worker) -> None:
        if w.ready_r < 0:  # a stale event: the worker exited earlier in this batch
            return
        try:
            data = os.read(w.ready_r, 16)
        except OSError:
            data = b""
        self._close_ready(w)
        if data[:1] == Ready().encode():
            w.ready = True
            w.state = WorkerState.RUNNING

    # ------------------------------------------------------------ exits and restarts
    def on_exit(self, w: Worker, stopping: bool) -> tuple[Exit, int, int]:
        """Reap ``w``; returns what became of it, its pid and exit code."""
        assert w.proc is not None
        self.sel.unregister(w.proc.pidfd)
        os.close(w.proc.pidfd)
        try:
            _, status = os.waitpid(w.proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        self._close_ready(w)
        self._close_listener_fds(w)
        pid = w.proc.pid
        w.proc = None
        w.ready = False
        self.on_reap(w, pid)
        if stopping or w.retired:
            w.state = WorkerState.STOPPED
            log(f"status: {w.name} (pid {pid}) exited with {code}")
            return (Exit.STOPPED if stopping else Exit.RETIRED), pid, code
        delay = w.restart.on_exit(time.time())
        w.state = WorkerState.BACKOFF
        w.restart_at = time.time() + delay
        log(f"alert: {w.name} (pid {pid}) exited with {code}; restarting in {delay:.0f}s")
        return Exit.RESTART, pid, code

    def restart_due(self, controls: Controls, generation: int) -> None:
        now = time.time()
        for w in self.workers:
            if w.proc is None and w.restart_at is not None and w.restart_at <= now and not w.retired:
                self.start(w, controls, generation)

    def retire(self, w: Worker) -> None:
        """Ask ``w`` to make way (a reload): it is not restarted when it exits."""
        assert w.proc is not None
        w.retired = True
        w.state = WorkerState.STOPPING
        os.kill(w.proc.pid, w.policy.handover)

    def _close_ready(self, w: Worker) -> None:
        if w.ready_r >= 0:
            self.sel.unregister(w.ready_r)
            os.close(w.ready_r)
            w.ready_r = -1

    def _close_listener_fds(self, w: Worker) -> None:
        if w.status_r >= 0:
            self.sel.unregister(w.status_r)
            os.close(w.status_r)
            w.status_r = -1
            w.sessions = 0
        if w.channel is not None:
            self.sel.unregister(w.channel)
            w.channel.close()
            w.channel = None
