"""Reload: reparse control/ and apply it to the running workers as a diff.

Owns: the supervisor's reaction to SIGHUP and to the control watcher's byte — parse
everything, validate, then swap (qmail-send's regetcontrols); the listener diff
(bind added sockets, renew every listener worker, close removed sockets); the graceful
replacement of a long-running worker whose controls changed (``WORKER_CONTROLS``); and
deciding when a reload is complete.  Runs as root, inside the supervisor's
single-threaded loop, as a mixin of ``Supervisor`` (main.py), whose state it uses.

Every reload also reopens the log output (a changed control/logfile or logformat takes
effect; logoutput.py) and is told to systemd: RELOADING=1 when it starts, READY=1 when
it is complete or refused.  ``last_reload["seq"]`` numbers the attempts, so that
``eqmailctl reload`` can wait for the verdict on its own request.

Failure modes: invalid control files, or a log file that cannot be opened, leave the
old configuration running and are recorded in ``last_reload`` (shown by status); a
listener address that cannot be bound is logged and skipped.  Old generations finish
their sessions before they exit.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from eqmail.control import Controls, ListenerSpec, load_controls
from eqmail.errors import ControlErrors, ControlFileError
from eqmail.instance import Instance
from eqmail.log import log
from eqmail.supervisor.logoutput import LogOutput
from eqmail.supervisor.sockets import Notifier, bind_listener
from eqmail.supervisor.worker import Worker
from eqmail.workers.base import drain_wake_pipe

# The control values each long-running worker was built from: a reload restarts a
# worker (gracefully) only when one of its values changed.  Listeners are always
# renewed: they are cheap to replace and old sessions finish under the old generation.
WORKER_CONTROLS: dict[str, tuple[str, ...]] = {
    "scanner": ("me", "locals", "virtualdomains", "percenthack", "envnoathost", "bouncefrom",
                "bouncehost", "doublebouncehost", "doublebounceto", "concurrencylocal",
                "concurrencyremote", "queuelifetime"),
    "local": ("me", "assign", "defaultdelivery", "concurrencylocal", "timeoutprogram"),
    "remote": ("me", "helohost", "smtproutes", "timeoutconnect", "timeoutremote", "dnsservers",
               "concurrencyremote", "locals", "beforemote", "tlsclientciphers", "clientcert",
               "tlshosts", "tlshosts_exhaustive", "notlshosts"),
    "sandbox": ("spptimeout",),
}

# Workers that a reload replaces with a signal other than SIGTERM (a stop).
HANDOVER_SIGNAL: dict[str, signal.Signals] = {"scanner": signal.SIGUSR1}


def _differs(old: Controls, new: Controls, fields: tuple[str, ...]) -> bool:
    return any(getattr(old, f, None) != getattr(new, f, None) for f in fields)


class ReloadMixin:
    """The reload half of ``Supervisor``; the attributes below are set up there."""

    instance: Instance
    controls: Controls
    workers: list[Worker]
    listen_socks: dict[str, socket.socket]
    generation: int
    last_reload: dict[str, Any]
    stopping: bool
    reload_pending: int | None  # generation whose listeners are not all up yet
    watch_r: int
    reload_seq: int
    notifier: Notifier
    logout: LogOutput

    if TYPE_CHECKING:  # provided by Supervisor
        def start_worker(self, w: Worker) -> None: ...
        def switch_log(self, *opened: Any) -> None: ...
        def _listener_workers(self, spec: ListenerSpec) -> list[Worker]: ...
        def summary(self) -> str: ...

    def _on_control_change(self) -> None:
        drain_wake_pipe(self.watch_r)
        if not self.stopping:
            log("status: control files changed")
            self.reload()

    def reload(self) -> None:
        if self.stopping:  # a HUP racing a stop: new workers now would never be stopped
            log("status: reload ignored: stopping")
            return
        self.reload_seq += 1
        self.notifier.reloading("reloading control files")
        try:
            new = load_controls(self.instance.root)
            opened = self.logout.open(new)
        except (ControlErrors, ControlFileError) as e:
            errors = e.errors if isinstance(e, ControlErrors) else [e]
            self.last_reload = {"time": time.time(), "ok": False, "errors": [str(x) for x in errors],
                                "seq": self.reload_seq}
            for err in errors:
                log(f"alert: reload refused: {err}")
            if self.reload_pending is None:  # else the pending one's completion says READY
                self.notifier.ready(f"reload refused: {errors[0]}")
            return
        self.generation += 1
        self.last_reload = {"time": time.time(), "ok": True, "errors": [], "complete": False,
                            "seq": self.reload_seq}
        self.reload_pending = self.generation
        old = self.controls
        self.controls = new
        log(f"status: reloading control files, generation {self.generation}")
        self.switch_log(*opened)
        self._apply_listener_diff(old, new)
        for w in self.workers:
            if w.proc is not None and _differs(old, new, WORKER_CONTROLS.get(w.kind, ())):
                self._replace(w)

    def _replace(self, w: Worker) -> None:
        """Stop ``w`` gracefully and start its successor with the new controls when it
        has exited (the scanner must never run twice at once).  The scanner is asked to
        hand over (HANDOVER_SIGNAL) rather than to stop: it exits at once and its
        successor takes over the deliveries still running, instead of holding every
        delivery back until they end."""
        w.retired = True
        w.state = "stopping"
        assert w.proc is not None
        os.kill(w.proc.pid, HANDOVER_SIGNAL.get(w.kind, signal.SIGTERM))

    def _retired_exit(self, w: Worker) -> None:
        if w.kind == "listener":
            self.workers.remove(w)
            return
        successor = Worker(w.kind, w.name, w.entry, w.role, extra=w.extra, keep_fds=w.keep_fds,
                           restart=w.restart)
        self.workers[self.workers.index(w)] = successor
        self.start_worker(successor)

    def _check_reload_complete(self) -> None:
        """A reload is complete when every listener of the new generation serves and no
        retired one accepts any more: from then on a new connection sees the new
        configuration (logged, and shown by status)."""
        if self.reload_pending is None:
            return
        listeners = [w for w in self.workers if w.kind == "listener"]
        new_ready = all(w.ready for w in listeners if not w.retired)
        old_closed = all(not w.accepting or w.proc is None for w in listeners if w.retired)
        if new_ready and old_closed:
            log(f"status: reload complete, generation {self.reload_pending}")
            self.last_reload["complete"] = True
            self.reload_pending = None
            self.notifier.ready(self.summary())

    def _apply_listener_diff(self, old: Controls, new: Controls) -> None:
        old_specs = {s.key: s for s in old.listen}
        new_specs = {s.key: s for s in new.listen}
        for key, spec in new_specs.items():
            if key in old_specs and old_specs[key] == spec:
                # unchanged socket and options: a fresh generation picks up other controls
                pass
            if key not in self.listen_socks:
                try:
                    self.listen_socks[key] = bind_listener(spec)
                except OSError as e:
                    log(f"alert: cannot bind {spec.display_address}: {e.strerror}")
                    continue
        for w in [w for w in self.workers if w.kind == "listener" and w.proc is not None]:
            w.retired = True
            w.state = "stopping"
            os.kill(w.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        for key, spec in new_specs.items():
            if key in self.listen_socks:
                for lw in self._listener_workers(spec):
                    self.workers.append(lw)
                    self.start_worker(lw)
        for key in set(old_specs) - set(new_specs):
            sock = self.listen_socks.pop(key, None)
            if sock is not None:
                sock.close()
