"""Write B deferred remote messages straight into a stopped eqmail's queue (bench/backlog.sh).

The documented format (docs/queue-format.md), as a scanner leaves a message it has
preprocessed and deferred: ``mess/<ino % 23>/<ino>`` (the message id is its inode),
``info/`` with ``F<sender>`` and the birth as its mtime, ``remote/`` with one
``T<recipient>`` record and the next try as its mtime.  Next tries are spread over the
coming hour, as qmail's schedule spreads messages that have been retried a few times.
Owners and modes are those of the directory each file goes into (setup made them).

    backlog_fill.py QUEUE_DIR COUNT RECIPIENT [SIZE]
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path


def _own(path: Path, st: os.stat_result, mode: int) -> None:
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, mode)


def fill(queue: Path, count: int, rcpt: str, size: int) -> None:
    now = time.time()
    rng = random.Random(15)
    owners = {name: [(queue / name / str(i)).stat() for i in range(23)]
              for name in ("mess", "info", "remote")}
    body = b"x" * max(0, size - 100) + b"\n"
    for i in range(count):
        tmp = queue / "pid" / f"backlog.{os.getpid()}.{i}"
        tmp.write_bytes(f"From: b@bench.test\nTo: {rcpt}\nSubject: backlog {i}\n\n".encode() + body)
        msgid = tmp.stat().st_ino
        split = str(msgid % 23)
        mess = queue / "mess" / split / str(msgid)
        os.link(tmp, mess)
        tmp.unlink()
        _own(mess, owners["mess"][msgid % 23], 0o644)
        birth = now - 7200
        info = queue / "info" / split / str(msgid)
        info.write_bytes(b"Fb@bench.test\0")
        _own(info, owners["info"][msgid % 23], 0o600)
        os.utime(info, (birth, birth))
        nxt = now + 60 + rng.random() * 3540
        chan = queue / "remote" / split / str(msgid)
        chan.write_bytes(f"T{rcpt}\0".encode())
        _own(chan, owners["remote"][msgid % 23], 0o600)
        os.utime(chan, (nxt, nxt))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    fill(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else 512)
