"""Per-destination back-off (eqmail.queue.backoff) and the scanner's use of it
(eqmail.queue.manager): the pure policy, then the queue manager driven by a simulated
clock and a simulated remote worker over a real queue directory.

What must hold: a dead destination gets about one connection attempt per back-off
period; a probe always comes; held messages keep qmail's schedule, so none bounces
before its queuelifetime, nor later than qmail's schedule would bounce it; when the
site comes back every held message goes out at once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.control import load_controls
from eqmail.ipc.delivery import Site, Verdict
from eqmail.ipc.queue import CleanAnswer, CleanRequest
from eqmail.queue.backoff import CAP, INITIAL, Admission, Backoff, domain_of
from eqmail.queue.layout import create_queue
from eqmail.queue.manager import QueueManager
from eqmail.queue.schedule import Channel, next_retry

# ---------------------------------------------------------------- the pure policy


def test_a_domain_is_held_then_probed_once_and_the_period_grows_to_the_cap() -> None:
    b = Backoff()
    assert b.admit("dead.test", 0) is Admission.GO
    assert b.report("dead.test", Site.UNREACHABLE, 10, "no connection\n") is True
    assert b.admit("dead.test", 11) is Admission.HOLD
    # deliveries started before the domain was marked change nothing
    assert b.report("dead.test", Site.UNREACHABLE, 12) is None
    assert b.admit("dead.test", 10 + INITIAL - 1) is Admission.HOLD
    assert b.admit("dead.test", 10 + INITIAL) is Admission.PROBE
    assert b.admit("dead.test", 10 + INITIAL) is Admission.HOLD  # one probe at a time
    assert b.expiries() == []
    periods = []
    now = 10 + INITIAL
    for _ in range(8):
        assert b.report("dead.test", Site.UNREACHABLE, now, probe=True) is True
        d = b.dead["dead.test"]
        periods.append(d.period)
        now = d.until
        assert b.admit("dead.test", now) is Admission.PROBE
    assert periods == [600, 1200, 2400, 4000, 4000, 4000, 4000, 4000]
    assert b.text("dead.test") == "no connection\n"
    # the probe reached the site: alive at once
    assert b.report("dead.test", Site.UNKNOWN, now) is False
    assert b.admit("dead.test", now) is Admission.GO and b.view() == ()


def test_an_abandoned_probe_lets_the_next_delivery_probe_and_clear_forgets_all() -> None:
    b = Backoff(initial=5, cap=20)
    b.report("a.test", Site.UNREACHABLE, 0)
    b.report("b.test", Site.UNREACHABLE, 0)
    assert b.admit("a.test", 5) is Admission.PROBE
    b.abandon("a.test")
    assert b.admit("a.test", 6) is Admission.PROBE
    assert sorted(b.clear()) == ["a.test", "b.test"]
    assert b.admit("b.test", 1) is Admission.GO


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5000), st.sampled_from(["admit", "probe-dies",
                                                              "unreachable", "reached"])),
                max_size=40))
def test_a_probe_always_comes_within_the_cap(events: list[tuple[float, str]]) -> None:
    """Whatever happened before, once the current period is over and the running probe
    (if any) has reported, the next delivery is let through: never a hold beyond CAP."""
    b = Backoff()
    now = 0.0
    probing = False
    for step, what in events:
        now += step
        if what == "admit":
            got = b.admit("d.test", now)
            probing = probing or got is Admission.PROBE
        elif probing:
            if what == "probe-dies":
                b.abandon("d.test")
            else:
                b.report("d.test", Site.UNREACHABLE if what == "unreachable" else Site.UNKNOWN,
                         now, probe=True)
            probing = False
        elif what == "unreachable":
            b.report("d.test", Site.UNREACHABLE, now)
    if probing:
        b.report("d.test", Site.UNREACHABLE, now, probe=True)
    assert b.admit("d.test", now + CAP) in (Admission.GO, Admission.PROBE)


def test_the_destination_is_the_domain_in_lower_case() -> None:
    assert domain_of("User@Dead.TEST") == "dead.test"
    assert domain_of("u@[10.0.0.1]") == "[10.0.0.1]"


# ---------------------------------------------------------------- the scanner's queue logic


class World:
    """A queue, a simulated clock and a simulated remote worker."""

    def __init__(self, root: Path, lifetime: int) -> None:
        (root / "control").mkdir()
        (root / "control" / "me").write_text("mx.test.example\n")
        (root / "control" / "queuelifetime").write_text(f"{lifetime}\n")
        paths = create_queue(root / "queue")
        self.now = 1_000_000.0
        self.bounced: dict[int, float] = {}
        self.heads: dict[int, bytes] = {}

        def cleaner(requests: list[CleanRequest]) -> list[CleanAnswer]:
            for r in requests:  # as the queue writer does: todo/ goes
                kind, _, msgid = str(r).partition("/")
                if kind == "todo":
                    paths.todo(int(msgid.rpartition("/")[2])).unlink()
            return [CleanAnswer.DONE] * len(requests)

        def inject(sender: str, rcpts: list[str], head: bytes, msgid: int, limit: int,
                   requiretls: bool = False) -> tuple[bool, str]:
            self.bounced[msgid] = self.now
            self.heads[msgid] = head
            return True, "1"

        self.m = QueueManager(load_controls(root), paths, cleaner, inject, lambda: self.now)

    def queue(self, msgid: int, rcpts: list[str]) -> None:
        p = self.m.paths
        p.mess(msgid).write_bytes(b"Subject: x\n\nbody\n")
        p.todo(msgid).write_bytes(b"u0\0p1\0Fs@x.test\0" + b"".join(
            b"T" + r.encode() + b"\0" for r in rcpts) + b"\0")

    def done(self, msgid: int) -> bool:
        return not self.m.paths.info(msgid).exists()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), lifetime=st.integers(1000, 60000),
       comes_back=st.one_of(st.none(), st.floats(1, 80000)), mixed=st.booleans())
def test_a_dead_site_costs_one_attempt_per_period_and_nothing_bounces_off_schedule(
        n: int, lifetime: int, comes_back: float | None, mixed: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        w = World(Path(tmp), lifetime)
        m = w.m
        birth = w.now
        ids = list(range(101, 101 + n))
        for msgid in ids:
            w.queue(msgid, ["u@dead.test"] + (["v@alive.test"] if mixed else []))
        assert m.process_todo() == n
        for msgid in ids:  # a later pass reads the birth from info/'s mtime
            os.utime(m.paths.info(msgid), (birth, birth))
        back = None if comes_back is None else birth + comes_back
        attempts: list[float] = []  # times of attempts at dead.test while it is dead
        delivered: dict[int, float] = {}
        idle = 0
        while not all(w.done(i) for i in ids):
            reqs = m.next_requests(Channel.REMOTE)
            for req in reqs:
                alive = req.recipient.endswith("@alive.test") or (back is not None and w.now >= back)
                if not alive:
                    attempts.append(w.now)
                    m.report(req, Verdict.DEFERRAL, "no connection (#4.4.1)\n", Site.UNREACHABLE)
                else:
                    m.report(req, Verdict.SUCCESS, "ok\n", Site.UNKNOWN)
            m.retry_done()
            m.flush_cleans()
            for msgid in ids:
                if w.done(msgid) and msgid not in delivered and msgid not in w.bounced:
                    delivered[msgid] = w.now
            if all(w.done(i) for i in ids):
                break
            nxt = m.next_wakeup()
            assert nxt is not None, "messages in the queue, nothing scheduled"
            idle = 0 if reqs else idle + 1
            assert idle < 5, "the manager wakes up without anything to do"
            w.now = max(w.now, nxt)
        # the first pass tries each message once; after that one probe per period
        later = [t for t in attempts if t > birth]
        assert attempts.count(birth) <= n
        assert len(later) == len(set(later))
        gaps = [b - a for a, b in zip([birth] + later, later, strict=False)]
        assert all(g >= INITIAL for g in gaps), gaps
        for when in w.bounced.values():
            # not before queuelifetime, and not later than qmail's schedule would
            assert birth + lifetime < when <= next_retry(birth, birth + lifetime, Channel.REMOTE)
        for when in delivered.values():
            assert back is not None and back <= when <= back + CAP
        assert set(delivered) | set(w.bounced) == set(ids)


def test_a_flush_clears_the_back_off_and_status_lists_the_dead_destination(tmp_path: Path) -> None:
    w = World(tmp_path, 604800)
    m = w.m
    for msgid in (11, 12, 13):
        w.queue(msgid, ["u@dead.test"])
    m.process_todo()
    reqs = m.next_requests(Channel.REMOTE)
    assert len(reqs) == 3
    for req in reqs:
        m.report(req, Verdict.DEFERRAL, "no connection\n", Site.UNREACHABLE)
    dead = m.activity().dead
    assert [(d.domain, d.until - w.now, d.held) for d in dead] == [("dead.test", INITIAL, 3)]
    m.flush()  # eqmailctl queue flush (SIGALRM)
    assert m.activity().dead == ()
    assert len(m.next_requests(Channel.REMOTE)) == 3


def test_a_held_recipient_on_its_last_pass_bounces_untried_with_the_sites_last_failure(
        tmp_path: Path) -> None:
    w = World(tmp_path, 100)  # queuelifetime 100 s, shorter than the 300 s back-off
    m = w.m
    w.queue(21, ["u@dead.test"])
    m.process_todo()
    (req,) = m.next_requests(Channel.REMOTE)
    m.report(req, Verdict.DEFERRAL, "Sorry, I wasn't able to establish an SMTP connection. "
             "(#4.4.1)\n", Site.UNREACHABLE)
    w.queue(22, ["v@dead.test"])
    m.process_todo()
    w.now += 200  # message 22's first pass comes after its lifetime, the site still held
    assert m.next_requests(Channel.REMOTE) == []  # not tried
    m.flush_cleans()
    head = w.heads[22].decode()
    assert "<v@dead.test>:\nSorry, I wasn't able to establish an SMTP connection." in head
    assert "Not tried again: dead.test was unreachable at the last attempt" in head
    assert "this message has been in the queue too long" in head
    assert 21 not in w.bounced  # its next try is later: qmail's schedule, not the back-off
