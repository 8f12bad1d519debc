"""Status: the supervisor's status socket and report, queue counts, /proc look-ups.

Owns: run/status.sock (``StatusSocket``: bound by the supervisor as root, mode 0666,
non-blocking; each connection sends a request line and gets one JSON line back, the
messages of eqmail.ipc.status), the
report it serves (``supervisor_report``: workers with pid, uid/gid, state, restarts,
generation and title; listeners with their bound port and session count; the last
reload; the log output and its reopen count; queue counts), the one-line summary
systemd shows as STATUS= (``summary_line``), and the helpers they are built from.  ``queue_counts`` is also used
by ``eqmailctl status`` when the daemon is not running.

Failure modes: a client that does not read or write within 2 s, goes away or asks
something else than ``status`` is dropped; a process that exited meanwhile shows uid/gid -1 and an empty title.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.status import MAX_STATUS_REQUEST, StatusAnswer, StatusRequest
from eqmail.queue.layout import QueuePaths
from eqmail.supervisor.sockets import bound_port
from eqmail.workers.base import WorkerKind

if TYPE_CHECKING:
    from eqmail.supervisor.main import Supervisor


def queue_counts(queue_root: Path) -> dict[str, int]:
    p = QueuePaths(queue_root)
    return {
        "messages": len(p.ids_in("mess")),
        "todo": len(p.ids_in("todo")),
        "local": len(p.ids_in("local")),
        "remote": len(p.ids_in("remote")),
        "bouncing": len(p.ids_in("bounce")),
    }


def read_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(512).replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def proc_ids(pid: int) -> tuple[int, int]:
    """The real uid and gid of ``pid`` from /proc; (-1, -1) if it is gone."""
    uid = gid = -1
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[1])
    except OSError:
        pass
    return uid, gid


def supervisor_report(sup: Supervisor) -> dict[str, Any]:
    """What ``eqmailctl status`` shows about a running instance."""
    workers = []
    for w in sup.workers:
        pid = w.proc.pid if w.proc else 0
        uid, gid = proc_ids(pid) if pid else (-1, -1)
        workers.append({"kind": w.kind, "name": w.name, "pid": pid, "uid": uid, "gid": gid,
                        "state": w.state, "restarts": w.restart.restarts,
                        "generation": w.generation, "title": read_title(pid) if pid else ""})
    listeners = [{"service": s.service, "address": s.address,
                  "port": bound_port(sup.listeners.socks.get(s.key)), "concurrency": s.concurrency,
                  "sessions": sum(w.sessions for w in sup.workers
                                  if w.kind is WorkerKind.LISTENER and w.spec is not None
                                  and w.spec.key == s.key and w.proc is not None)}
                 for s in sup.controls.listen]
    lo = sup.logout
    log_output = {"sink": str(lo.target.sink), "format": str(lo.target.fmt),
                  "path": str(lo.path) if lo.path else None, "reopens": lo.reopens, "error": lo.error}
    return {"running": True, "pid": os.getpid(), "uptime": round(time.time() - sup.started, 1),
            "generation": sup.generation, "last_reload": sup.reloads.last, "stopping": sup.stopping,
            "log": log_output,
            "workers": workers, "listeners": listeners,
            "queue": queue_counts(sup.instance.queue)}


def summary_line(sup: Supervisor) -> str:
    """systemd's STATUS=: ``7/7 workers up, 2 listeners, 3 sessions, queue 12 messages``."""
    up = sum(1 for w in sup.workers if w.proc is not None and w.ready)
    sessions = sum(w.sessions for w in sup.workers if w.kind is WorkerKind.LISTENER and w.proc is not None)
    listeners = len(sup.controls.listen)
    try:
        queued = len(QueuePaths(sup.instance.queue).ids_in("mess"))
    except OSError:
        queued = -1
    return (f"{up}/{len(sup.workers)} workers up, {listeners} listener{'' if listeners == 1 else 's'}, "
            f"{sessions} session{'' if sessions == 1 else 's'}, queue {queued} message{'' if queued == 1 else 's'}")


class StatusSocket:
    """run/status.sock; the supervisor registers ``sock`` with its selector and calls
    ``serve`` when it is readable."""

    def __init__(self, path: Path) -> None:
        name = str(path)
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(name)
        os.chmod(name, 0o666)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def serve(self, report: Callable[[], dict[str, Any]]) -> None:
        """Answer one waiting client with ``report()`` as a JSON line."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        try:
            conn.settimeout(2.0)
            # the request line, read first so the client's send succeeds
            StatusRequest.decode(_read_line(conn, MAX_STATUS_REQUEST))
            conn.sendall(StatusAnswer(report()).encode())
        except (OSError, ProtocolError):
            return  # the client gets nothing; not logged, as before: a probe is no event
        finally:
            conn.close()


def _read_line(conn: socket.socket, limit: int) -> bytes:
    """Bytes up to and including a LF, at most ``limit`` of them (fewer at EOF)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data
