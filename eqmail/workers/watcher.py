"""The control-directory watcher: drop-in edits become reloads.

Watches control/ (recursively: tlshosts/, notlshosts/) and users/ with watchdog
(inotify) and, once the files have been quiet for DEBOUNCE seconds, writes one byte to
the pipe the supervisor gave it.  The supervisor then reloads exactly as on SIGHUP:
parse everything, refuse the whole change if anything is wrong, else apply it.  An
editor's several writes (temporary file, rename, chmod) make one reload.

Runs as the log user: it needs no file contents, only the directory events; watchdog's
observer is a thread, which is why this is a worker and not part of the supervisor.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from eqmail.ipc.worker import ControlChanged
from eqmail.log import log
from eqmail.workers.base import WatcherSettings, WorkerContext

DEBOUNCE = 1.0
IGNORED_SUFFIXES = (".swp", ".swx", "~", ".tmp")


def _interesting(path: str) -> bool:
    name = os.path.basename(path)
    return not (name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name.startswith("#"))


def run(ctx: WorkerContext[WatcherSettings]) -> int:
    from watchdog import events
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    # Reads are not edits, and the kernel should not even report them: the remote
    # worker opens its DKIM keys and lists control/dkim/ for every delivery, the
    # supervisor reads every file at a reload.  Asking inotify for everything but
    # "opened" and "closed without writing" keeps those off this process's CPU.
    edits = [c for c in vars(events).values()
             if isinstance(c, type) and issubclass(c, FileSystemEvent)
             and getattr(c, "event_type", "") not in ("", "opened", "closed_no_write")]

    notify_fd = ctx.settings.notify_fd
    changed = threading.Event()
    stop = threading.Event()
    last_event = [0.0]

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("opened", "closed_no_write"):
                return  # reads (the supervisor parsing control/) are not edits
            paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
            if any(p and _interesting(p) for p in paths):
                last_event[0] = time.monotonic()
                changed.set()

    observer = Observer()
    for d in (ctx.instance.control, ctx.instance.users):
        if d.is_dir():
            observer.schedule(Handler(), str(d), recursive=True, event_filter=edits)
    observer.daemon = True
    observer.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ctx.ready()
    while not stop.is_set():
        if not changed.wait(0.5):
            continue
        # debounce: wait until the directory has been quiet for DEBOUNCE seconds
        while time.monotonic() - last_event[0] < DEBOUNCE and not stop.is_set():
            time.sleep(0.1)
        changed.clear()
        if stop.is_set():
            break
        try:
            os.write(notify_fd, ControlChanged().encode())
        except OSError as e:
            log(f"warning: control watcher cannot notify the supervisor: {e.strerror}")
    observer.stop()
    return 0
