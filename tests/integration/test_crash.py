"""Crash safety (DESIGN §5): kill -9 of the queue writer, the scanner, the local
delivery worker, a delivery child and the whole process group at random moments while
200 messages are injected; after a restart every acknowledged message is delivered at
least once, completely, and the queue ends empty.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from harness import ME, Instance, bin_path, proc_children, proc_dead, queue_files, worker_pids

from eqmail.queue.client import submit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TESTUSER = f"testuser@{ME}"
MESSAGES = 200
BODY = b"".join(b"%04d " % i + b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n" for i in range(60))
def worker_pid(inst: Instance, title: str) -> int | None:
    pids = worker_pids(inst, title)
    return pids[0] if pids else None


def message(tag: str) -> bytes:
    return f"Subject: crash {tag}\nMessage-ID: <{tag}@crash.test>\n\n".encode() + BODY + f"END {tag}\n".encode()


class Injector(threading.Thread):
    """Injects MESSAGES messages (mostly through the queue client, every tenth with
    eqmail-inject), remembering which were acknowledged."""

    def __init__(self, inst: Instance, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.inst = inst
        self.rng = rng
        self.acked: list[str] = []
        self.refused = 0

    def run(self) -> None:
        env = dict(os.environ, EQMAIL_ROOT=str(self.inst.root))
        for i in range(MESSAGES):
            tag = f"m{i:03d}x{uuid.uuid4().hex[:8]}"
            if i % 10 == 0:
                proc = subprocess.run([bin_path("eqmail-inject"), "-f", TESTUSER, TESTUSER], input=message(tag),
                                      capture_output=True, env=env, timeout=120)
                ok = proc.returncode == 0
            else:
                ok = submit(self.inst.root, TESTUSER, [TESTUSER], message(tag)).ok
            if ok:
                self.acked.append(tag)
            else:
                self.refused += 1
            time.sleep(self.rng.uniform(0, 0.03))


def kill_group_and_restart(inst: Instance) -> None:
    sup = inst.supervisor_pid()
    assert sup is not None
    members = [sup, *(p for p, _ in proc_children(sup))]
    os.killpg(sup, signal.SIGKILL)  # eqmailctl start made the supervisor a session leader
    deadline = time.monotonic() + 15
    while not all(proc_dead(p) for p in members):
        assert time.monotonic() < deadline, "process group survived kill -9"
        time.sleep(0.02)
    inst.ctl("start")


def test_kill_9_at_random_moments_loses_no_acknowledged_mail(running: Instance) -> None:
    inst = running
    rng = random.Random(os.environ.get("EQMAIL_CRASH_SEED", str(time.time_ns())))
    injector = Injector(inst, rng)
    injector.start()
    kills: list[str] = []
    victims = ["queue writer", "scanner", "local delivery", "delivery child", "group"]
    t0 = time.monotonic()
    while injector.is_alive():
        time.sleep(rng.uniform(0.15, 0.5))
        victim = victims[len(kills) % len(victims)] if len(kills) < len(victims) else rng.choice(victims)
        if victim == "group":
            kill_group_and_restart(inst)
        else:
            if victim == "delivery child":
                local = worker_pid(inst, "eqmail: local delivery")
                kids = [p for p, _ in proc_children(local)] if local else []
                pid = rng.choice(kids) if kids else None
            else:
                pid = worker_pid(inst, f"eqmail: {victim}")
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        kills.append(victim)
    injection_time = time.monotonic() - t0
    assert {"queue writer", "scanner", "local delivery", "group"} <= set(kills), kills
    assert len(injector.acked) >= MESSAGES // 2, (len(injector.acked), injector.refused)

    # everything acknowledged arrives; deferrals caused by the kills are retried on flush
    maildir_new = inst.home / "Maildir" / "new"
    delivered: dict[str, list[Path]] = {}
    deadline = time.monotonic() + 90
    next_flush = 0.0
    while True:
        delivered.clear()
        for f in maildir_new.iterdir():
            m = re.search(rb"\nSubject: crash (\w+)\n", f.read_bytes())
            assert m, f"{f} has no Subject"
            delivered.setdefault(m.group(1).decode(), []).append(f)
        missing = set(injector.acked) - set(delivered)
        if not missing and not queue_files(inst):
            break
        assert time.monotonic() < deadline, (
            f"after kills {kills}: {len(missing)} acknowledged messages not delivered "
            f"({sorted(missing)[:5]}...), queue leftovers {queue_files(inst)[:10]}\n--- log:\n"
            + inst.log()[-6000:])
        if time.monotonic() >= next_flush:
            inst.ctl("queue", "flush")
            next_flush = time.monotonic() + 2
        time.sleep(0.2)

    # nothing half-written: each delivered copy is the whole message
    for tag, files in delivered.items():
        for f in files:
            data = f.read_bytes()
            assert data.startswith(b"Return-Path: <testuser@mx.test.example>\nDelivered-To: testuser@")
            assert data.endswith(b"\n\n" + BODY + f"END {tag}\n".encode()), f"{f} is incomplete"
    duplicates = sum(len(v) - 1 for v in delivered.values())
    assert duplicates <= len(kills) * 10  # only deliveries cut short by a kill are repeated
    assert queue_files(inst) == []
    swept = sum(int(n) for n in re.findall(r"removed (\d+) orphaned message", inst.log()))
    print(f"\n{swept} orphans swept; injected {MESSAGES} in {injection_time:.1f}s: {len(injector.acked)} acked, "
          f"{injector.refused} refused; kills {kills}; {duplicates} duplicates")
