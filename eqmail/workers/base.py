"""What every worker receives from the supervisor: the worker context.

A worker module exposes ``run(ctx: WorkerContext) -> int``.  The supervisor's spawn
routine has already set the process title, closed what the worker must not have and
dropped privileges (checked) before calling it.  The worker signals readiness with
``ctx.ready()`` once it serves (sockets open, state recovered).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eqmail.control import Controls
from eqmail.instance import Instance
from eqmail.supervisor.ids import SystemIds


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
