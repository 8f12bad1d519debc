"""The supervisor's record of one worker process, and the table of worker entry points.

Owns: the ``Worker`` dataclass (what to start — kind, entry point, role, fds — and what
the supervisor knows about the running process: pid, readiness, state, restart
back-off, generation, a listener's session count) and the mapping from a worker kind
to its ``run(ctx)``.  Pure data plus imports; no system calls.  Used by main.py
(spawning, the loop, status) and reload.py (successors of retired workers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eqmail.control import Controls, ListenerSpec
from eqmail.supervisor.policy import RestartState
from eqmail.supervisor.spawn import Spawned
from eqmail.workers.base import WorkerContext


@dataclass
class Worker:
    kind: str
    name: str
    entry: Callable[[WorkerContext], int]
    role: str | None  # None: stays root (the local spawner)
    extra: dict[str, Any] = field(default_factory=dict)
    keep_fds: tuple[int, ...] = ()
    proc: Spawned | None = None
    ready: bool = False
    state: str = "starting"
    restart: RestartState = field(default_factory=RestartState)
    restart_at: float | None = None
    ready_r: int = -1
    retired: bool = False  # stopped on purpose (reload diff or shutdown): do not restart
    generation: int = 0
    controls: Controls | None = None
    spec: ListenerSpec | None = None
    status_r: int = -1  # listener: its session count arrives here
    sessions: int = 0
    accepting: bool = True  # listener: False once it said it closed its socket

    @property
    def title(self) -> str:
        return f"eqmail: {self.name}"


def worker_entry(kind: str) -> Callable[[WorkerContext], int]:
    # Imported in the supervisor before any fork: a worker that dropped privileges
    # may not be able to read the package files any more.
    from eqmail.workers import local, logger, queuewriter, sandbox, scanner, watcher

    table: dict[str, Callable[[WorkerContext], int]] = {
        "logger": logger.run,
        "sandbox": sandbox.run,
        "watcher": watcher.run,
        "queuewriter": queuewriter.run,
        "local": local.run,
        "scanner": scanner.run,
    }
    if kind == "listener":
        from eqmail.workers import listener

        return listener.run
    if kind == "remote":
        from eqmail.workers import remote

        return remote.run
    return table[kind]


def has_worker(kind: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"eqmail.workers.{kind}") is not None
