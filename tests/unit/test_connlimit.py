"""eqmail.connlimit: the per-client session count shared by every listener process.

Real processes (fork) share one table as listeners do; a kill -9'd holder is purged the
way the supervisor does when it reaps a listener."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from eqmail.connlimit import MIN_CAPACITY, ClientTable, Verdict, capacity_for, client_key


def test_client_key_ipv4_address_ipv6_slash64() -> None:
    assert client_key("192.0.2.1") != client_key("192.0.2.2")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1")
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("fe80::1%eth0") == client_key("fe80::2")
    assert client_key("::1") == client_key("::") != client_key("127.0.0.1")  # ::/64


def test_capacity() -> None:
    assert capacity_for(0) == MIN_CAPACITY
    assert capacity_for(1000) == 2048
    assert capacity_for(10**9) == 1 << 18


def test_limit_counts_every_process_and_release_frees() -> None:
    t = ClientTable.create(MIN_CAPACITY)
    k = client_key("192.0.2.7")
    assert [t.admit(k, 3, 100 + i) for i in range(4)] == [Verdict.ADMITTED] * 3 + [Verdict.OVER]
    assert t.admit(client_key("192.0.2.8"), 3, 100) is Verdict.ADMITTED  # another client
    t.release(k, 101)
    assert t.count(k) == 2
    assert t.admit(k, 3, 103) is Verdict.ADMITTED
    assert t.admit(k, 0, 103) is Verdict.UNTRACKED  # 0 = no limit: not counted at all
    assert t.count(k) == 3


def test_full_table_admits_untracked_rather_than_refusing() -> None:
    t = ClientTable.create(MIN_CAPACITY)
    verdicts = [t.admit(client_key(f"10.0.{i // 256}.{i % 256}"), 5, 1) for i in range(MIN_CAPACITY)]
    assert verdicts.count(Verdict.ADMITTED) == MIN_CAPACITY * 3 // 4
    assert set(verdicts[MIN_CAPACITY * 3 // 4:]) == {Verdict.UNTRACKED}


def test_random_operations_match_a_model() -> None:
    """Insertions, deletions (backward shift) and purges against a dict."""
    t = ClientTable.create(MIN_CAPACITY)
    rng = random.Random(12)
    keys = [client_key(f"10.1.{i // 256}.{i % 256}") for i in range(500)]
    model: dict[bytes, int] = {}
    live: list[tuple[bytes, int]] = []
    for step in range(30000):
        if live and rng.random() < 0.5:
            k, p = live.pop(rng.randrange(len(live)))
            t.release(k, p)
            model[k] -= 1
        else:
            k, p = rng.choice(keys), rng.choice((1, 2, 3))
            v = t.admit(k, 4, p)
            assert (v is Verdict.OVER) == (model.get(k, 0) >= 4)
            if v is Verdict.ADMITTED:
                live.append((k, p))
                model[k] = model.get(k, 0) + 1
        if step % 7000 == 6999:
            for k, p in live:
                if p == 2:
                    model[k] -= 1
            live = [x for x in live if x[1] != 2]
            t.purge(2)
    assert all(t.count(k) == model.get(k, 0) for k in keys)


def _child(t: ClientTable, fn: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            code = fn()  # type: ignore[operator]
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_concurrent_processes_never_exceed_the_limit() -> None:
    t = ClientTable.create(MIN_CAPACITY)
    k = client_key("2001:db8::1")
    r, w = os.pipe()

    def grab() -> int:
        got = sum(t.admit(k, 10, os.getpid()) is Verdict.ADMITTED for _ in range(10))
        os.write(w, bytes([got]))
        time.sleep(0.5)  # hold them while the others try
        return 0

    pids = [_child(t, grab) for _ in range(4)]
    got = sum(os.read(r, 1)[0] for _ in pids)
    assert got == 10
    assert [_wait(p) for p in pids] == [0] * 4
    # the children exited without releasing: the supervisor's purge of each reaped pid
    for p in pids:
        t.purge(p)
    assert t.count(k) == 0


def test_concurrent_updates_keep_the_table_consistent() -> None:
    t = ClientTable.create(MIN_CAPACITY)
    keys = [client_key(f"198.51.100.{i}") for i in range(64)]

    def churn() -> int:
        rng = random.Random(os.getpid())
        held: list[bytes] = []
        for _ in range(3000):
            if held and rng.random() < 0.5:
                t.release(held.pop(rng.randrange(len(held))), os.getpid())
            else:
                k = rng.choice(keys)
                if t.admit(k, 1000, os.getpid()) is Verdict.ADMITTED:
                    held.append(k)
        for k in held:
            t.release(k, os.getpid())
        return 0

    pids = [_child(t, churn) for _ in range(4)]
    assert [_wait(p) for p in pids] == [0] * 4
    assert [t.count(k) for k in keys] == [0] * 64
    assert t._used() == 0


@pytest.mark.timeout(30)
def test_kill_9_holder_is_purged_and_the_lock_is_not_wedged() -> None:
    t = ClientTable.create(MIN_CAPACITY)
    k = client_key("127.0.0.9")
    r, w = os.pipe()

    def hold_and_hammer() -> int:
        for _ in range(3):
            t.admit(k, 5, os.getpid())
        os.write(w, b"x")
        while True:  # killed mid-update, sooner or later holding the lock
            t.admit(client_key("127.0.0.10"), 5, os.getpid())
            t.release(client_key("127.0.0.10"), os.getpid())

    pid = _child(t, hold_and_hammer)
    os.read(r, 1)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    _wait(pid)
    assert t.admit(k, 5, os.getpid()) is Verdict.ADMITTED  # the lock died with its holder
    assert t.count(k) == 4
    assert t.purge(pid) >= 3
    assert t.count(k) == 1 and t.count(client_key("127.0.0.10")) == 0
