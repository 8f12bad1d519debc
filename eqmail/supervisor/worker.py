"""The supervisor's record of one worker process.

Owns: the ``Worker`` dataclass -- what to start (kind, name, settings, fds to keep) and
what the supervisor knows about the running process: pid, readiness, ``WorkerState``,
restart back-off, generation, and for a listener its spec, session count and the
supervisor's end of its configuration channel.  What a kind *is* (entry point, user,
restart policy) is the table in kinds.py.  Pure data; no system calls.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field

from eqmail.control import ListenerSpec
from eqmail.ipc.config import ConfigReader
from eqmail.ipc.worker import ListenerReportReader
from eqmail.supervisor.kinds import KINDS, KindSpec
from eqmail.supervisor.policy import RestartState
from eqmail.supervisor.spawn import Spawned
from eqmail.workers.base import Settings, WorkerKind


class WorkerState(enum.StrEnum):
    """What status shows for a worker."""

    STARTING = "starting"   # forked, not ready yet
    RUNNING = "running"     # said it is ready
    BACKOFF = "backoff"     # exited unasked: restarted when its delay is over
    STOPPING = "stopping"   # asked to stop (a stop, or retired by a reload)
    STOPPED = "stopped"     # exited after being asked to


@dataclass
class Worker:
    kind: WorkerKind
    name: str
    settings: Settings
    keep_fds: tuple[int, ...] = ()
    proc: Spawned | None = None
    ready: bool = False
    state: WorkerState = WorkerState.STARTING
    restart: RestartState = field(default_factory=RestartState)
    restart_at: float | None = None
    ready_r: int = -1
    retired: bool = False  # stopped on purpose (reload diff or shutdown): do not restart
    generation: int = 0    # the configuration it serves (a kept listener's rises on reload)
    spec: ListenerSpec | None = None
    status_r: int = -1  # listener: its session count arrives here
    status_reader: ListenerReportReader = field(default_factory=ListenerReportReader)
    sessions: int = 0
    accepting: bool = True  # listener: False once it said it closed its socket
    channel: socket.socket | None = None  # listener: the configuration push (ipc.config)
    channel_reader: ConfigReader = field(default_factory=lambda: ConfigReader(b"u"))

    def __post_init__(self) -> None:
        if not isinstance(self.settings, self.policy.settings):
            raise TypeError(f"{self.kind} needs {self.policy.settings.__name__}, "
                            f"not {type(self.settings).__name__}")

    @property
    def policy(self) -> KindSpec:
        return KINDS[self.kind]

    @property
    def title(self) -> str:
        return f"eqmail: {self.name}"
