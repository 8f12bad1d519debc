"""Signal dispatch: signals become events of the supervisor's loop.

Owns: the self-pipe the handlers write to (``signal.set_wakeup_fd``: a handler only
records the signal, no work in signal context) and the dispatch of the recorded
signals through an explicit table given by the supervisor (main.py): SIGTERM and
SIGINT stop, SIGHUP reloads, SIGALRM flushes the queue, SIGUSR1 reopens the log.
Several of one signal in one batch act once (a storm of HUPs is one reload).  Root, in
the supervisor only; SIGCHLD is caught just to wake the loop (exits arrive by pidfd).
"""

from __future__ import annotations

import os
import selectors
import signal
from collections.abc import Callable, Mapping

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD,
           signal.SIGUSR1)


class SignalDispatch:
    def __init__(self, actions: Mapping[signal.Signals, Callable[[], None]]) -> None:
        self.actions = dict(actions)
        self.pending: list[int] = []
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def install(self, sel: selectors.BaseSelector) -> None:
        signal.set_wakeup_fd(self.w)
        for sig in HANDLED:
            signal.signal(sig, lambda *_: None)
        sel.register(self.r, selectors.EVENT_READ, ("signal", None))

    def drain(self) -> None:
        try:
            data = os.read(self.r, 512)
        except BlockingIOError:
            return
        self.pending.extend(data)

    def dispatch(self) -> None:
        sigs, self.pending = self.pending, []
        seen: set[int] = set()
        for s in sigs:
            if s in self.actions and s not in seen:
                seen.add(s)
                self.actions[signal.Signals(s)]()
