"""Status helpers: queue counts from the directories, process titles from /proc.

Used by the supervisor's status socket and by ``eqmailctl status`` when the daemon is
not running (queue counts only).
"""

from __future__ import annotations

from pathlib import Path

from eqmail.queue.layout import QueuePaths


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
