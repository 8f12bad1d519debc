"""Issue 15, a backlog: a dead destination costs nearly nothing (per-destination
back-off), and a large queue does not delay readiness (pqstart after ``ctx.ready()``).

The queues are written directly in the documented format (docs/queue-format.md:
mess/ named by its inode, info/ ``F<sender>``, remote/ or local/ ``T<address>``, the
channel file's mtime the next try), as a stopped eqmail would have left them, then
the instance is started.  What a user sees is asserted: delivery attempts in the log,
``eqmailctl status``, the scanner's CPU time, files in the Maildirs."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Instance, free_port, worker_pids

DEAD = "dead.example"
NOCONN = "wasn't able to establish an SMTP connection"


def _own_like_parent(path: Path, mode: int) -> None:
    st = path.parent.stat()
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, mode)


def fill_queue(inst: Instance, n: int, channel: str, rcpt: str, birth: float,
               next_try: float) -> list[int]:
    """``n`` preprocessed messages to ``rcpt`` on ``channel``, each with a unique subject."""
    q = inst.root / "queue"
    ids = []
    for i in range(n):
        tmp = q / "pid" / f"backlog.{os.getpid()}.{i}"
        tmp.write_bytes(f"From: a@mx.test.example\nTo: {rcpt}\nSubject: backlog {i}\n\n"
                        f"body {i}\n".encode())
        msgid = tmp.stat().st_ino
        mess = q / "mess" / str(msgid % 23) / str(msgid)
        os.link(tmp, mess)
        tmp.unlink()
        _own_like_parent(mess, 0o644)
        info = q / "info" / str(msgid % 23) / str(msgid)
        info.write_bytes(b"Fa@mx.test.example\0")
        _own_like_parent(info, 0o600)
        os.utime(info, (birth, birth))
        chan = q / channel / str(msgid % 23) / str(msgid)
        chan.write_bytes(f"T{rcpt}\0".encode())
        _own_like_parent(chan, 0o600)
        os.utime(chan, (next_try, next_try))
        ids.append(msgid)
    return ids


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attempts(inst: Instance) -> int:
    """Remote deliveries to the dead site that ended without a connection."""
    return sum(1 for line in inst.log().splitlines() if "delivery" in line and NOCONN in line)


@pytest.fixture
def dead_site() -> Iterator[tuple[Instance, Instance]]:
    port = free_port(("127.0.0.1",))  # nothing listens there yet: connections are refused
    receiver = Instance.create(listen=f"smtp 127.0.0.1:{port}\n",
                               extra_controls={"locals": f"mx.test.example\n{DEAD}\n",
                                               "rcpthosts": f"{DEAD}\n"})
    sender = Instance.create(extra_controls={"smtproutes": f"{DEAD}:[127.0.0.1]:{port}\n"})
    try:
        yield sender, receiver
    finally:
        sender.destroy()
        receiver.destroy()


def test_a_dead_destination_gets_one_attempt_per_period_and_mail_goes_once_it_is_back(
        dead_site: tuple[Instance, Instance]) -> None:
    sender, receiver = dead_site
    n = 400
    now = time.time()
    fill_queue(sender, n, "remote", f"testuser@{DEAD}", now - 60, now - 1)  # all due
    sender.start()
    sender.wait_log(r"destination dead\.example unreachable", timeout=30)
    # the first wave: what was handed out before the first report came back
    time.sleep(2)
    first_wave = attempts(sender)
    concurrency = 20  # control/concurrencyremote's default; the scanner keeps 2x queued
    assert 1 <= first_wave <= 2 * concurrency + 5, first_wave
    (scanner,) = worker_pids(sender, "eqmail: scanner")
    cpu0 = cpu_seconds(scanner)
    time.sleep(8)
    assert attempts(sender) == first_wave  # held: no attempt until the period is over
    assert cpu_seconds(scanner) - cpu0 < 0.5  # a dead site costs nearly nothing
    status = sender.ctl("status").stdout
    m = re.search(rf"destination {re.escape(DEAD)} unreachable: (\d+) message\(s\) held until", status)
    assert m and int(m.group(1)) >= n - first_wave, status
    # the site comes back; a flush clears the back-off (as qmail-tcpok clears tcpto)
    receiver.start()
    sender.ctl("queue", "flush")
    files = receiver.wait_for_mail(n, timeout=120)
    subjects = sorted(re.search(rb"Subject: (backlog \d+)", f.read_bytes()).group(1)  # type: ignore[union-attr]
                      for f in files)
    assert subjects == sorted(f"backlog {i}".encode() for i in range(n))  # each once
    sender.wait_queue_empty(timeout=30)
    assert "unreachable" not in sender.ctl("status").stdout


def test_a_large_queue_does_not_delay_readiness_and_every_message_is_delivered_once() -> None:
    inst = Instance.create(listen=None)
    n = 20000
    try:
        now = time.time()
        fill_queue(inst, n, "local", "testuser@mx.test.example", now - 60, now - 1)
        t0 = time.monotonic()
        inst.start()  # returns once every worker said it is ready
        started = time.monotonic() - t0
        log = inst.wait_log(r"status: queue read in", timeout=120)
        assert started < 5.0, started
        # readiness came before the queue was read, and deliveries flowed meanwhile
        ready_at = log.index("status: ready; reading the queue in the background")
        read_at = log.index("status: queue read in")
        first_delivery = log.index("starting delivery 1:")
        assert ready_at < first_delivery < read_at
        files = inst.wait_for_mail(n, timeout=600)
        assert len(files) == n
        inst.wait_queue_empty(timeout=60)
        log = inst.log()
        assert len(re.findall(r"end msg \d+", log)) == n  # every message once
        assert len(set(re.findall(r"end msg (\d+)", log))) == n
    finally:
        inst.destroy()
