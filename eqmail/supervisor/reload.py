"""Reload: reparse control/ and apply it to the running workers as a diff.

Owns: the supervisor's reaction to SIGHUP and to the control watcher's byte -- parse
everything, validate, then swap (qmail-send's regetcontrols); the ``Configuration`` in
force (controls, TLS file stamps, generation) that every worker start uses; the
listener diff (diff.py, applied by listeners.py: unchanged listeners keep running and
get the new configuration pushed, changed ones are replaced, added ones bound and
started, removed ones retired); the graceful replacement of another long-running worker
whose controls changed (kinds.py's ``reload_controls``); the successor of a retired
worker; and deciding when a reload is complete.  Root, in the supervisor's
single-threaded loop; its state is the ``Configuration`` and ``ReloadState`` objects it
is given, nothing else.

Every reload also reopens the log output (a changed control/logfile or logformat takes
effect; logoutput.py) and is told to systemd: RELOADING=1 when it starts, READY=1 when
it is complete or refused.  ``ReloadState.last["seq"]`` numbers the attempts, so that
``eqmailctl reload`` can wait for the verdict on its own request.

Failure modes: invalid control files, or a log file that cannot be opened, leave the
old configuration running and are recorded in ``ReloadState.last`` (shown by status);
a listener address that cannot be bound is logged and skipped.  Old generations finish
their sessions before they exit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eqmail.control import Controls, load_controls
from eqmail.errors import ControlErrors, ControlFileError
from eqmail.instance import Instance
from eqmail.log import log
from eqmail.supervisor.diff import listener_diff
from eqmail.supervisor.kinds import controls_changed
from eqmail.supervisor.listeners import Listeners
from eqmail.supervisor.logoutput import LogOutput, Opened
from eqmail.supervisor.pool import WorkerPool
from eqmail.supervisor.sockets import Notifier
from eqmail.supervisor.worker import Worker
from eqmail.workers.base import WorkerKind, drain_wake_pipe


@dataclass
class Configuration:
    """The configuration in force: what every worker starts with."""

    controls: Controls
    generation: int = 1


def _never() -> dict[str, Any]:
    return {"time": None, "ok": True, "errors": [], "seq": 0}


@dataclass
class ReloadState:
    seq: int = 0                  # reload attempts so far (eqmailctl reload waits for its own)
    pending: int | None = None    # generation not yet served by every listener
    last: dict[str, Any] = field(default_factory=_never)  # the last attempt, for status


class Reloader:
    def __init__(self, instance: Instance, config: Configuration, state: ReloadState,
                 pool: WorkerPool, listeners: Listeners, logout: LogOutput, notifier: Notifier,
                 switch_log: Callable[[Opened], None], summary: Callable[[], str],
                 stopping: Callable[[], bool]) -> None:
        self.instance = instance
        self.config = config
        self.state = state
        self.pool = pool
        self.listeners = listeners
        self.logout = logout
        self.notifier = notifier
        self.switch_log = switch_log  # install a new log output (main.py)
        self.summary = summary        # systemd's STATUS= line (status.py)
        self.stopping = stopping

    def on_control_change(self, watch_r: int) -> None:
        drain_wake_pipe(watch_r)
        if self.stopping() or self._nothing_new():
            return
        log("status: control files changed")
        self.reload()

    def _nothing_new(self) -> bool:
        """The watcher's notice comes a debounce after the last edit: an admin's
        ``eqmailctl reload`` in that second has already taken the edits, and another
        reload would only start a new generation of the same configuration.  Only when
        the last reload was accepted: after a refused one, a file edited back to what
        runs must still clear the refusal that status shows."""
        if not self.state.last.get("ok", True):
            return False
        try:
            return load_controls(self.instance.root) == self.config.controls
        except (ControlErrors, ControlFileError):
            return False  # the reload says why

    def reload(self) -> None:
        if self.stopping():  # a HUP racing a stop: new workers now would never be stopped
            log("status: reload ignored: stopping")
            return
        st, cfg = self.state, self.config
        st.seq += 1
        self.notifier.reloading("reloading control files")
        try:
            new = load_controls(self.instance.root)
            opened = self.logout.open(new)
        except (ControlErrors, ControlFileError) as e:
            errors = e.errors if isinstance(e, ControlErrors) else [e]
            st.last = {"time": time.time(), "ok": False, "errors": [str(x) for x in errors],
                       "seq": st.seq}
            for err in errors:
                log(f"alert: reload refused: {err}")
            if st.pending is None:  # else the pending one's completion says READY
                self.notifier.ready(f"reload refused: {errors[0]}")
            return
        old = cfg.controls
        cfg.controls = new
        cfg.generation += 1
        st.last = {"time": time.time(), "ok": True, "errors": [], "complete": False, "seq": st.seq}
        st.pending = cfg.generation
        log(f"status: reloading control files, generation {cfg.generation}")
        self.switch_log(opened)
        self.listeners.apply(listener_diff(old, new), new, cfg.generation)
        for w in self.pool.workers:
            if w.proc is not None and not w.retired and controls_changed(w.kind, old, new):
                # Stopped gracefully; its successor starts when it has exited (the
                # scanner must never run twice at once, and hands over: kinds.py).
                self.pool.retire(w)

    def retired_exit(self, w: Worker) -> None:
        """A worker retired by a reload exited: a listener is gone for good (its
        successors started with the reload); any other kind gets its successor now."""
        if w.kind is WorkerKind.LISTENER:
            self.pool.workers.remove(w)
            return
        successor = Worker(w.kind, w.name, w.settings, keep_fds=w.keep_fds, restart=w.restart)
        self.pool.workers[self.pool.workers.index(w)] = successor
        self.pool.start(successor, self.config.controls, self.config.generation)

    def check_complete(self) -> None:
        """A reload is complete when every listener serves its generation (a new
        process is ready, a kept one applied the pushed configuration) and no retired
        one accepts any more: from then on a new connection sees the new configuration
        (logged, and shown by status)."""
        pending = self.state.pending
        if pending is None:
            return
        listeners = self.pool.of_kind(WorkerKind.LISTENER)
        current = all(w.ready and w.generation >= pending for w in listeners if not w.retired)
        old_closed = all(not w.accepting or w.proc is None for w in listeners if w.retired)
        if current and old_closed:
            log(f"status: reload complete, generation {pending}")
            self.state.last["complete"] = True
            self.state.pending = None
            self.notifier.ready(self.summary())
