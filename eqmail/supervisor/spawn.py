"""Spawn mechanics: fork a worker, set it up, drop privileges, call its run().

Only system calls here; the decisions (which workers, as whom, when to restart) live in
kinds.py, policy.py, pool.py and reload.py.  A worker is a plain ``os.fork`` and the supervisor
selects on a pidfd (``os.pidfd_open``) to learn that it exited.  (The ``multiprocess``
library's fork Process was tried: its exit sentinel is a pipe whose write end the child must keep open,
which conflicts with closing every inherited fd — see docs/design-notes.md.)

In the child, before the worker's code runs: signal handlers back to defaults and the
supervisor's wakeup fd cleared; stdin from /dev/null; fds 1 and 2 pointed at the logger's
pipe (stdout too: a stray print is logged, and no worker keeps the supervisor's stdout
-- a log file logrotate has moved -- open);
every inherited fd closed except the ones the worker is given; the process title set;
privileges dropped and checked; the parent-death signal armed (after the drop, which
clears it) so that a kill -9 of the supervisor leaves no worker serving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eqmail.privsep.ids import Ids
from eqmail.privsep.privileges import PrivilegeError, drop_to
from eqmail.workers.base import WorkerContext

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
PR_SET_PDEATHSIG = 1
FORWARDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD,
                     signal.SIGUSR1}


@dataclass
class SpawnSpec:
    ctx: WorkerContext[Any]
    entry: Callable[[WorkerContext[Any]], int]
    ids: Ids | None  # None: keep the current ids (root for the local spawner)
    groups: list[int] | None
    keep_fds: tuple[int, ...]
    log_fd: int
    title: str
    nice: int = 0  # added to the worker's niceness (never lowered)


def _child_setup(spec: SpawnSpec, supervisor_pid: int, mask: set[signal.Signals | int]) -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM,
                signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # socket writes report EPIPE instead
    # The spare-inode pools hold a file lease for a moment (eqmail.queue.recycle); if
    # someone opens that file meanwhile, the kernel tells the holder with SIGIO, whose
    # default action would kill the worker.  The lease is released right away anyway.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    # Ctrl-C in a terminal reaches the whole process group: only the supervisor acts on
    # it (a graceful stop in order); a worker must not die mid-commit or mid-delivery.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM sent meanwhile acts now
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if spec.log_fd >= 0 and spec.log_fd != 2:
        os.dup2(spec.log_fd, 2)
    if spec.log_fd >= 0:
        os.dup2(spec.log_fd, 1)
    os.close(devnull)
    keep = {0, 1, 2, *spec.keep_fds}
    if spec.ctx.ready_fd >= 0:
        keep.add(spec.ctx.ready_fd)
    _close_other_fds(keep)
    try:
        from setproctitle import setproctitle

        setproctitle(spec.title)
    except ImportError:  # pragma: no cover
        pass
    if spec.nice > 0:
        os.nice(spec.nice)
    if spec.ids is not None:
        drop_to(spec.ids.uid, spec.ids.gid, spec.groups)
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise PrivilegeError("prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != supervisor_pid:  # the supervisor died before the signal was armed
        os._exit(111)


def _close_other_fds(keep: set[int]) -> None:
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _worker_main(spec: SpawnSpec, supervisor_pid: int, mask: set[signal.Signals | int]) -> None:
    try:
        _child_setup(spec, supervisor_pid, mask)
        code = spec.entry(spec.ctx)
    except PrivilegeError as e:
        os.write(2, f"alert: {spec.title}: {e}\n".encode())
        code = 111
    except BaseException as e:  # noqa: BLE001 - last resort: log and exit "temporary failure"
        import traceback

        os.write(2, f"alert: {spec.title} crashed: {e!r}\n".encode())
        for line in traceback.format_exc().splitlines():
            os.write(2, f"alert:   {line}\n".encode())
        code = 111
    sys.stdout.flush()
    os._exit(code)


@dataclass
class Spawned:
    pid: int
    pidfd: int  # readable once the worker exited


def spawn(spec: SpawnSpec) -> Spawned:
    supervisor = os.getpid()
    # Until the child has reset its handlers, a signal would run the supervisor's
    # handler in it: lost for the child, and written to the supervisor's wakeup pipe
    # as if the supervisor had been signalled.  Blocked across fork, it stays pending.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _worker_main(spec, supervisor, old)  # never returns
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return Spawned(pid, os.pidfd_open(pid))
