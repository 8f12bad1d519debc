"""Small file helpers shared by the scanner's queue modules (manager and preprocess).

Plain system calls on paths or fds the caller already opened; no privilege of their
own (they run as the scanner, eqmails).  Reads are bounded, writes are complete or
raise OSError; nothing here syncs: durability is the caller's barrier.
"""

from __future__ import annotations

import os


def read_bounded(path: os.PathLike[str] | str, limit: int) -> bytes:
    """At most ``limit`` bytes of a file.  Not ``open(...).read(limit)``: that allocates
    (mmap) a buffer of ``limit`` bytes for every small todo/ or channel file, and
    ``open`` asks whether the file is a terminal."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        total = 0
        while total < limit:
            chunk = os.read(fd, min(65536, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unlink_quiet(path: os.PathLike[str] | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
