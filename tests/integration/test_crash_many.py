"""kill -9, many times, of every worker kind under mixed load (issue 8, part 2).

Instance A (the one killed) takes mail by SMTP (its listener, with a qmail-spp plugin
so that every MAIL goes through the plugin sandbox) and by injection (the queue client
and eqmail-inject), for local recipients and for ``remote.example``, which A's
smtproutes sends to instance B on loopback.  While that runs, a killer sends SIGKILL to
a worker every ~0.7 s, going round every kind in a shuffled order: queue writer,
scanner, local delivery, a local delivery child, remote delivery, listener, plugin
sandbox, logger, control watcher, the supervisor alone (its workers get SIGTERM from
the parent-death signal) and the whole process group; after the last two it restarts A
with ``eqmailctl start``.  At least MIN_KILLS kills, the load phase bounded to LOAD_TIME.

Then, with A left alone (queue flushes every 2 s, as an admin would), the test proves
DESIGN.md §5: every message that was acknowledged (250 after DATA, queue client ok,
eqmail-inject exit 0) is delivered at least once to each of its recipients, complete;
nothing bounced; the duplicates are no more than the deliveries a kill can cut between
"delivered" and "marked done" (qmail's design); A's and B's queues end empty (no pid/,
intd/, todo/, mess/, info/, local/, remote/ or bounce/ file left).

Seed: EQMAIL_CRASH_SEED (printed on failure), to replay a run's choice of victims.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import (
    ME,
    Instance,
    bin_path,
    free_port,
    proc_children,
    proc_dead,
    queue_files,
    worker_pids,
)

from eqmail.queue.client import submit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOAD_TIME = 70.0      # seconds of load and kills at most
MIN_KILLS = 55
KILL_GAP = (0.35, 0.9)
DRAIN_TIME = 90.0
LOCAL = f"testuser@{ME}"
REMOTE = "testuser@remote.example"
CONCURRENCY_LOCAL = 5
CONCURRENCY_REMOTE = 5
BODY = b"".join(b"%04d " % i + b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n" for i in range(40))
WORKERS = {  # victim -> process title prefix
    "queue writer": "eqmail: queue writer",
    "scanner": "eqmail: scanner",
    "local delivery": "eqmail: local delivery",
    "remote delivery": "eqmail: remote delivery",
    "listener": "eqmail: listener",
    "plugin sandbox": "eqmail: plugin sandbox",
    "logger": "eqmail: logger",
    "control watcher": "eqmail: control watcher",
}
VICTIMS = [*WORKERS, "delivery child", "supervisor", "group"]
# kills that can cut a local / a remote delivery between its success and the done mark
CUTS_LOCAL = {"scanner", "local delivery", "delivery child", "supervisor", "group"}
CUTS_REMOTE = {"scanner", "remote delivery", "supervisor", "group"}


# A bug this test found: right after a listener was killed under SMTP load the
# supervisor could handle a stale ('sessions'/'ready', w) event of the same select()
# batch after _on_exit had closed the worker's pipes, and die on EBADF.  The run still
# restarts A and makes every loss assertion before checking this.
SUPERVISOR_DIES = "the supervisor exited on its own after a worker was killed"


def message(tag: str, crlf: bool = False) -> bytes:
    text = f"Subject: crash {tag}\nMessage-ID: <{tag}@crash.test>\n\n".encode() + BODY + f"END {tag}\n".encode()
    return text.replace(b"\n", b"\r\n") if crlf else text


@dataclass
class Ledger:
    """What was acknowledged, for whom (thread-safe)."""

    acked: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, tag: str, rcpts: tuple[str, ...]) -> None:
        with self.lock:
            self.acked[tag] = rcpts

    def refuse(self) -> None:
        with self.lock:
            self.refused += 1


def pick_rcpts(rng: random.Random) -> tuple[str, ...]:
    return rng.choice([(LOCAL,), (REMOTE,), (LOCAL, REMOTE)])


class SmtpLoad(threading.Thread):
    """SMTP clients: one to three messages per session; 250 after DATA = acknowledged."""

    def __init__(self, port: int, ledger: Ledger, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.port, self.ledger, self.stop, self.rng = port, ledger, stop, random.Random(seed)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as s:
                    s.ehlo("load.test")
                    for _ in range(self.rng.randint(1, 3)):
                        self.one(s)
            except (OSError, smtplib.SMTPException):
                self.ledger.refuse()
                self.stop.wait(0.05)  # the listener is being restarted

    def one(self, s: smtplib.SMTP) -> None:
        tag = f"s{uuid.uuid4().hex[:12]}"
        rcpts = pick_rcpts(self.rng)
        try:
            refused = s.sendmail(LOCAL, list(rcpts), message(tag, crlf=True))
        except smtplib.SMTPRecipientsRefused:
            self.ledger.refuse()
            s.rset()
            return
        except smtplib.SMTPResponseException:
            self.ledger.refuse()  # 451 from the queue or the plugin sandbox
            s.rset()
            return
        self.ledger.ack(tag, tuple(r for r in rcpts if r not in refused))
        self.stop.wait(self.rng.uniform(0, 0.02))


class InjectLoad(threading.Thread):
    """The queue client (qmail-queue's protocol) and every 15th message eqmail-inject."""

    def __init__(self, inst: Instance, ledger: Ledger, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.inst, self.ledger, self.stop, self.rng = inst, ledger, stop, random.Random(seed)

    def run(self) -> None:
        env = dict(os.environ, EQMAIL_ROOT=str(self.inst.root))
        n = 0
        while not self.stop.is_set():
            n += 1
            tag = f"i{uuid.uuid4().hex[:12]}"
            rcpts = pick_rcpts(self.rng)
            if n % 15 == 0:
                proc = subprocess.run([bin_path("eqmail-inject"), "-f", LOCAL, *rcpts], input=message(tag),
                                      capture_output=True, env=env, timeout=60)
                ok = proc.returncode == 0
            else:
                try:
                    ok = submit(self.inst.root, LOCAL, list(rcpts), message(tag)).ok
                except OSError:
                    ok = False
            if ok:
                self.ledger.ack(tag, rcpts)
            else:
                self.ledger.refuse()
                self.stop.wait(0.05)
            self.stop.wait(self.rng.uniform(0, 0.03))


class Killer:
    """kill -9 of one victim at a time; restarts A after the supervisor's death."""

    def __init__(self, inst: Instance, rng: random.Random) -> None:
        self.inst, self.rng = inst, rng
        self.kills: list[str] = []
        self.skipped: list[str] = []
        self.round: list[str] = []
        self.self_deaths: list[str] = []  # the supervisor was found dead, not by us

    def next_victim(self) -> str:
        if not self.round:
            self.round = list(VICTIMS)
            self.rng.shuffle(self.round)
        return self.round.pop()

    def kill_one(self) -> None:
        victim = self.next_victim()
        if victim in ("supervisor", "group"):
            self.kill_supervisor(group=victim == "group")
        else:
            pid = self.find(victim)
            if pid is None:
                self.skipped.append(victim)
                self.round.insert(0, victim)  # try it again later in this round
                return
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                self.skipped.append(victim)
                return
        self.kills.append(victim)

    def find(self, victim: str) -> int | None:
        if victim == "delivery child":
            deadline = time.monotonic() + 0.5  # children come and go with deliveries
            while time.monotonic() < deadline:
                for local in worker_pids(self.inst, WORKERS["local delivery"]):
                    kids = [p for p, _ in proc_children(local)]
                    if kids:
                        return self.rng.choice(kids)
                time.sleep(0.005)
            return None
        pids = worker_pids(self.inst, WORKERS[victim])
        return self.rng.choice(pids) if pids else None

    def kill_supervisor(self, group: bool) -> None:
        sup = self.inst.supervisor_pid()
        assert sup is not None
        members = [sup, *(p for p, _ in proc_children(sup))]
        for p, _ in proc_children(sup):
            members += [c for c, _ in proc_children(p)]
        try:
            if proc_dead(sup):
                raise ProcessLookupError
            if group:
                os.killpg(sup, signal.SIGKILL)  # eqmailctl start made it a session leader
            else:
                os.kill(sup, signal.SIGKILL)    # the workers get SIGTERM (parent-death signal)
        except ProcessLookupError:
            # Nobody killed it: see SUPERVISOR_DIES.  Restart and go on testing for loss.
            self.self_deaths.append(f"after kills {self.kills[-3:]}:\n{self.inst.log()[-1500:]}")
            self.start()
            return
        deadline = time.monotonic() + 30
        while not all(proc_dead(p) for p in members):
            assert time.monotonic() < deadline, (
                f"after kill -9 of the {'group' if group else 'supervisor'}, still alive: "
                f"{[p for p in members if not proc_dead(p)]}")
            time.sleep(0.01)
        self.start()

    def start(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            proc = self.inst.ctl("start", check=False)
            if proc.returncode == 0:
                return
            assert time.monotonic() < deadline, f"restart failed: {proc.stdout}{proc.stderr}"
            time.sleep(0.2)


@pytest.fixture
def pair() -> Iterator[tuple[Instance, Instance, int]]:
    pa, pb = free_port(("127.0.0.1",)), free_port(("127.0.0.1",))
    receiver = Instance.create(
        listen=f"smtp 127.0.0.1:{pb}\n",
        extra_controls={"locals": f"{ME}\nremote.example\n", "rcpthosts": "remote.example\n"})
    sender = Instance.create(
        listen=f"smtp 127.0.0.1:{pa}\n",
        extra_controls={"smtproutes": f"remote.example:[127.0.0.1]:{pb}\n",
                        "tcp.smtp": '127.:allow,RELAYCLIENT=""\n',
                        "smtpplugins": "[mail]\n:true\n",
                        "concurrencylocal": str(CONCURRENCY_LOCAL),
                        "concurrencyremote": str(CONCURRENCY_REMOTE),
                        "timeoutsmtpd": "20", "timeoutremote": "20"})
    try:
        receiver.start()
        sender.start()
        yield sender, receiver, pa
    finally:
        sender.destroy()
        receiver.destroy()


def delivered(maildir: Path) -> dict[str, list[bytes]]:
    """tag -> the contents of every copy in ``maildir``/new."""
    out: dict[str, list[bytes]] = {}
    new = maildir / "new"
    for f in new.iterdir() if new.exists() else []:
        data = f.read_bytes()
        m = re.search(rb"\nSubject: (crash|failure) ?(\w*)\n", data)
        key = m.group(2).decode() if m and m.group(1) == b"crash" else f"<other {f.name}>"
        out.setdefault(key, []).append(data)
    return out


def test_kill_9_of_every_worker_kind_many_times_under_load(
        pair: tuple[Instance, Instance, int]) -> None:
    a, b, port = pair
    seed = int(os.environ.get("EQMAIL_CRASH_SEED", str(time.time_ns() % 2**32)))
    rng = random.Random(seed)
    ledger = Ledger()
    stop = threading.Event()
    loads = [SmtpLoad(port, ledger, stop, seed + 1), SmtpLoad(port, ledger, stop, seed + 2),
             InjectLoad(a, ledger, stop, seed + 3)]
    for t in loads:
        t.start()
    killer = Killer(a, rng)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < LOAD_TIME and (len(killer.kills) < MIN_KILLS
                                                     or not set(VICTIMS) <= set(killer.kills)):
            time.sleep(rng.uniform(*KILL_GAP))
            killer.kill_one()
    finally:
        stop.set()
        for t in loads:
            t.join(60)
    load_time = time.monotonic() - t0
    context = f"seed {seed}; kills {killer.kills}; skipped {killer.skipped}"
    assert len(killer.kills) >= MIN_KILLS, context
    assert set(VICTIMS) <= set(killer.kills), context
    assert len(ledger.acked) >= 300, (len(ledger.acked), ledger.refused, context)

    if a.ctl("status", check=False).returncode != 0:  # died after the last kill
        killer.self_deaths.append(f"after the last kill {killer.kills[-1]}:\n{a.log()[-1500:]}")
        killer.start()
    # A is left alone now; deferrals caused by the kills are retried on flush
    want_local = {t for t, r in ledger.acked.items() if LOCAL in r}
    want_remote = {t for t, r in ledger.acked.items() if REMOTE in r}
    deadline = time.monotonic() + DRAIN_TIME
    next_flush = 0.0
    while True:
        got_a, got_b = delivered(a.home / "Maildir"), delivered(b.home / "Maildir")
        missing = (want_local - set(got_a)) | (want_remote - set(got_b))
        left = queue_files(a) + queue_files(b)
        if not missing and not left:
            break
        assert time.monotonic() < deadline, (
            f"{context}\n{len(missing)} acknowledged deliveries missing ({sorted(missing)[:5]}...), "
            f"queue leftovers {left[:10]}\n--- A's log:\n{a.log()[-6000:]}")
        if time.monotonic() >= next_flush:
            a.ctl("queue", "flush")
            next_flush = time.monotonic() + 2
        time.sleep(0.2)
    drain_time = time.monotonic() - t0 - load_time

    # every copy is whole, and only what was submitted arrived
    for got in (got_a, got_b):
        for tag, datas in got.items():
            assert not tag.startswith("<other"), f"unexpected message (a bounce?): {datas[0][:600]!r}"
            for data in datas:
                assert data.endswith(b"\n\n" + BODY + f"END {tag}\n".encode()), f"{tag} is incomplete"
    # duplicates only where a kill cut a delivery between success and the done mark
    dup_local = sum(len(v) - 1 for v in got_a.values())
    dup_remote = sum(len(v) - 1 for v in got_b.values())
    cuts_local = sum(k in CUTS_LOCAL for k in killer.kills)
    cuts_remote = sum(k in CUTS_REMOTE for k in killer.kills)
    assert dup_local <= cuts_local * CONCURRENCY_LOCAL, (dup_local, context)
    # remote: also a drop after the final dot ("Possible duplicate!") when A dies mid-reply
    assert dup_remote <= cuts_remote * CONCURRENCY_REMOTE, (dup_remote, context)
    # nothing bounced, nothing left
    assert queue_files(a) == [] and queue_files(b) == []
    print(f"\n{context}\n{len(killer.kills)} kills in {load_time:.0f}s; {len(ledger.acked)} acknowledged, "
          f"{ledger.refused} refused; drained in {drain_time:.1f}s; duplicates local {dup_local}, "
          f"remote {dup_remote}")
    # the supervisor itself must never die from a worker's death
    assert not killer.self_deaths, f"{SUPERVISOR_DIES}\n{len(killer.self_deaths)} time(s); first: {killer.self_deaths[0]}"
