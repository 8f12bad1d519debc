"""The on-disk queue layout: qmail's directories, split names and modes.

Owns: the names of every queue path (qmail-core §1.1, with big-todo: intd/ and todo/
split like mess/).  Pure functions plus :func:`create_queue`, which makes the tree
(run by ``eqmailctl setup`` as root, or as the invoking user for a private instance).

Message number = inode number of ``mess/<id % 23>/<id>``.  Split directories use
``<dir>/<id % SPLIT>/<id>``; unsplit ones (pid/, bounce/) use ``<dir>/<id>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SPLIT = 23  # conf-split

# directory -> (split?, owner role, mode); roles map to users at set-up time.
QUEUE_DIRS: dict[str, tuple[bool, str, int]] = {
    "pid": (False, "queue", 0o700),
    "mess": (True, "queue", 0o750),
    "intd": (True, "queue", 0o700),
    "todo": (True, "queue", 0o750),
    "info": (True, "send", 0o700),
    "local": (True, "send", 0o700),
    "remote": (True, "send", 0o700),
    "bounce": (False, "send", 0o700),
    "lock": (False, "queue", 0o750),
    # eqmail's own: recycled inodes of the queue writer and of the scanner (queue/recycle.py)
    "spare-queue": (False, "queue", 0o700),
    "spare-send": (False, "send", 0o700),
}
SPLIT_DIRS = tuple(name for name, (split, _, _) in QUEUE_DIRS.items() if split)


def split_of(msgid: int) -> int:
    return msgid % SPLIT


@dataclass(frozen=True)
class QueuePaths:
    """Every path of one queue, relative to nothing: absolute paths under ``root``."""

    root: Path  # the queue/ directory itself

    def dir(self, name: str) -> Path:
        return self.root / name

    def split_file(self, name: str, msgid: int) -> Path:
        return self.root / name / str(msgid % SPLIT) / str(msgid)

    def mess(self, msgid: int) -> Path:
        return self.split_file("mess", msgid)

    def intd(self, msgid: int) -> Path:
        return self.split_file("intd", msgid)

    def todo(self, msgid: int) -> Path:
        return self.split_file("todo", msgid)

    def info(self, msgid: int) -> Path:
        return self.split_file("info", msgid)

    def local(self, msgid: int) -> Path:
        return self.split_file("local", msgid)

    def remote(self, msgid: int) -> Path:
        return self.split_file("remote", msgid)

    def bounce(self, msgid: int) -> Path:
        return self.root / "bounce" / str(msgid)

    def pid(self, name: str) -> Path:
        return self.root / "pid" / name

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    def ids_in(self, name: str) -> list[int]:
        """Message ids present in a (split or unsplit) queue directory; non-numeric names skipped."""
        split, _, _ = QUEUE_DIRS[name]
        base = self.root / name
        dirs = [base / str(i) for i in range(SPLIT)] if split else [base]
        ids: list[int] = []
        for d in dirs:
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            ids.extend(int(n) for n in names if n.isdigit())
        return ids


def create_queue(root: Path, owners: dict[str, tuple[int, int]] | None = None) -> QueuePaths:
    """Create queue/ with qmail's layout.  ``owners`` maps a role ("queue", "send",
    "remote") to (uid, gid); None means "leave ownership to the invoking user"."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o750)
    paths = QueuePaths(root)
    for name, (split, role, mode) in QUEUE_DIRS.items():
        d = root / name
        subdirs = [d] + ([d / str(i) for i in range(SPLIT)] if split else [])
        for sub in subdirs:
            sub.mkdir(exist_ok=True)
            os.chmod(sub, mode)
            if owners is not None:
                uid, gid = owners[role]
                os.chown(sub, uid, gid)
    if owners is not None:
        os.chown(root, *owners["queue"])
    return paths
