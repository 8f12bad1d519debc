"""What every worker receives from the supervisor: the worker context.

A worker module exposes ``run(ctx: WorkerContext) -> int``.  The supervisor's spawn
routine has already set the process title, closed what the worker must not have and
dropped privileges (checked) before calling it.  The worker signals readiness with
``ctx.ready()`` once it serves (sockets open, state recovered).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eqmail.control import Controls
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds


@dataclass
class WorkerContext:
    kind: str
    name: str  # unique name, e.g. "listener smtp 127.0.0.1:2525"
    instance: Instance
    controls: Controls
    ids: SystemIds
    generation: int
    ready_fd: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    on_ready: Callable[[], None] | None = None

    def ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()
        if self.ready_fd >= 0:
            try:
                os.write(self.ready_fd, b"R")
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
