"""qmail-send's queue logic: passes, done markers, bounces, completion.

Owns info/, local/, remote/ and bounce/ (as eqmails).  Creating info/ and the channel
files from todo/ (qmail-send's todo_do) is eqmail.queue.preprocess: this manager owns
its Preprocessor and delegates process_todo / preprocess to it.
Deletions in todo/, intd/ and mess/ go through the queue writer's clean requests
(qmail-clean), because the scanner cannot write there.  No sockets or event loop here:
the scanner worker (eqmail.workers.scanner) calls these methods and moves delivery
requests and reports.

The files are the truth: everything in memory can be rebuilt from info/, local/,
remote/, todo/ (and the mtimes of local/remote files, where a graceful stop saved the
next retry time), so a crash at any point loses nothing; at worst a recipient whose
delivery finished but whose done marker was not written is delivered again, as in qmail.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from eqmail.control import Controls
from eqmail.ipc.admin import DeadDestination, QueueActivity
from eqmail.ipc.admin import Delivery as AdminDelivery
from eqmail.ipc.delivery import Site, Verdict
from eqmail.ipc.queue import CleanAnswer, CleanRequest, Origin
from eqmail.log import log, sanitize
from eqmail.queue.backoff import Admission, Backoff, domain_of
from eqmail.queue.bounce import BounceRate, Excerpt, bounce_note, bounce_target, compose_bounce
from eqmail.queue.envelope import (
    ChannelRecord,
    origin_of,
    parse_channel,
    parse_records,
    requiretls_of,
)
from eqmail.queue.fileio import read_bounded, unlink_quiet, write_all
from eqmail.queue.layout import SPLIT, QueuePaths
from eqmail.queue.preprocess import Cleaner, Preprocessor
from eqmail.queue.recycle import InodePool
from eqmail.queue.rewrite import RewriteRules, rewrite, strip_virtual_prepend, verp_sender
from eqmail.queue.schedule import Channel, is_dying, next_retry
from eqmail.textio import encode

DYING_TEXT = "I'm not going to try again; this message has been in the queue too long.\n"
ADMIN_BOUNCE_TEXT = "This message was removed from the queue by the postmaster. (#5.0.0)\n"
HELD_TEXT = ("Not tried again: {domain} was unreachable at the last attempt "
             "(per-destination back-off). (#4.4.1)\n")
STATUS_DEAD_MAX = 200  # dead destinations listed by eqmailctl status (the answer is bounded)
HOLD_SLICE = 2048  # held messages per next_requests call: the loop turns between slices


@dataclass
class Pass:
    """One pass over one message's channel file (qmail-send's job + pass)."""

    msgid: int
    channel: Channel
    sender: str
    birth: float
    started: float
    dying: bool
    todo: list[ChannelRecord]
    origin: Origin | None = None  # info/'s Xorigin= record (eqmail.queue.origin)
    requiretls: bool = False  # info/'s Xrequiretls=1 record (RFC 8689)
    outstanding: int = 0
    deferred: bool = False  # some recipient got a temporary failure (or was held)
    left: set[str] = field(default_factory=set)  # remote: domains of deferred/held recipients
    fd: int = -1  # the channel file, opened at the first done marker, closed at the end

    @property
    def finished(self) -> bool:
        return not self.todo and self.outstanding == 0


@dataclass(frozen=True)
class Delivery:
    """One recipient's delivery: its record at ``offset`` in the channel file."""

    msgid: int
    channel: Channel
    offset: int
    sender: str  # VERP-expanded
    recipient: str
    origin: Origin | None = None  # where the message came from: whether it is signed
    requiretls: bool = False  # the sender demanded REQUIRETLS: validated TLS or a bounce


@dataclass
class ChannelState:
    channel: Channel
    concurrency: int
    schedule: list[tuple[float, int]] = field(default_factory=list)  # heap (due, msgid)
    scheduled: dict[int, float] = field(default_factory=dict)  # msgid -> due (the live entry)
    passes: dict[int, Pass] = field(default_factory=dict)
    active: int = 0
    enabled: bool = True

    def schedule_at(self, msgid: int, due: float) -> None:
        self.scheduled[msgid] = due
        heapq.heappush(self.schedule, (due, msgid))

    def next_due(self) -> float | None:
        while self.schedule:
            due, msgid = self.schedule[0]
            if self.scheduled.get(msgid) != due:
                heapq.heappop(self.schedule)  # stale entry
                continue
            return due
        return None


class Injector(Protocol):
    """(envelope sender, recipients, bounce head, msgid, bouncemaxbytes[, requiretls])
    -> (ok, qp or error): queues head + the mess file of msgid, or at most
    bouncemaxbytes of it (0 = all).  ``requiretls`` (passed only when True): the
    bounce of a REQUIRETLS message — only the header of the mess file, and the bounce
    queued as a REQUIRETLS message itself (RFC 8689 §5, eqmail.queue.bounce)."""

    def __call__(self, sender: str, recipients: list[str], head: bytes, msgid: int,
                 limit: int, requiretls: bool = ..., /) -> tuple[bool, str]: ...


class QueueManager:
    def __init__(self, controls: Controls, paths: QueuePaths, cleaner: Cleaner, injector: Injector,
                 clock: Callable[[], float] = time.time) -> None:
        self.paths = paths
        self.clean = cleaner
        self.inject = injector
        self.clock = clock
        self.channels = {
            Channel.LOCAL: ChannelState(Channel.LOCAL, controls.concurrencylocal),
            Channel.REMOTE: ChannelState(Channel.REMOTE, controls.concurrencyremote),
        }
        self.done_retry: dict[int, float] = {}  # messages whose completion must be retried
        self.foop_retry: dict[int, float] = {}  # finished messages whose mess file is still there
        self.pending_foop: list[int] = []  # finished messages whose foop/ is not sent yet
        self.bounce_rate = BounceRate(controls.bouncelimit)  # in memory only, see BounceRate
        # per-destination back-off (eqmail.queue.backoff), in memory only: a restart
        # probes every destination again, with one round of deliveries
        self.backoff = Backoff()
        # remote messages whose last pass deferred (or held) recipients: (birth, their
        # domains), so that a due message whose domains are all held is rescheduled by
        # qmail's schedule without opening its files (a dead site costs a heap push)
        self.waiting: dict[int, tuple[float, frozenset[str]]] = {}
        self._domain_sets: dict[frozenset[str], frozenset[str]] = {}  # interned
        self.released: set[str] = set()  # dead domains whose probe message was made due
        self.probes: dict[str, tuple[int, int]] = {}  # dead domain -> its probe (msgid, offset)
        self.root_fd = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY)
        # info/ and channel files are recycled, not unlinked and re-created (eqmail.queue.recycle)
        self.spares = InodePool(paths.dir("spare-send"))
        # todo/ -> info/, local/, remote/; also remembers each split for its first pass
        self.preprocessor = Preprocessor(paths, cleaner, self.spares, self.root_fd,
                                         self._rewrite, self._schedule_new, clock)
        # the incremental pqstart (start_recovery): info/ split directories and ids still
        # to read, and the ids preprocessed meanwhile (never recovered a second time)
        self.recovery: list[int] = []
        self.recovery_ids: list[int] = []
        self.fresh_ids: set[int] = set()
        self.configure(controls)

    def configure(self, controls: Controls) -> None:
        """(Re)read the values qmail-send rereads on HUP, plus eqmail's reloadable ones."""
        self.controls = controls
        self.rules = RewriteRules.from_controls(controls)
        self.vmap = self.rules.vmap()
        self.preprocessor.srs = controls.srs_keys  # SRS reversal of recipients (issue 16)
        self.bounce_rate.limit = controls.bouncelimit
        self.channels[Channel.LOCAL].concurrency = controls.concurrencylocal
        self.channels[Channel.REMOTE].concurrency = controls.concurrencyremote

    # ------------------------------------------------------------ start-up
    def recover(self) -> None:
        """pqstart: rebuild schedules from info/ and the channel files' mtimes, all at once."""
        self.start_recovery()
        while self.recover_step(1 << 30):
            pass

    def start_recovery(self) -> None:
        """pqstart, done incrementally while the scanner already serves (issue 15: a
        large queue, or one read cold after a reboot, must not delay readiness).

        info/ is read one split directory at a time (:meth:`recover_step`).  Exactly
        once: an id read from info/ is skipped when this manager already knows it — it
        was preprocessed since the start (its info/ is this process's: ``fresh_ids``),
        a taken-over delivery opened a pass for it, or it is scheduled or waiting for
        completion — and when its todo/ is back (preprocessed again from scratch, as
        before); a message that finished meanwhile has no info/ any more.  Every other
        id is scheduled from its channel files' mtimes, or completed when it has none,
        exactly as pqstart does.  A split directory is listed once, when its turn
        comes: an entry created in it later is one this process made (fresh)."""
        self.recovery = list(range(SPLIT))
        self.recovery_ids = []
        self.fresh_ids = set()

    @property
    def recovering(self) -> bool:
        return bool(self.recovery or self.recovery_ids)

    def recover_step(self, limit: int) -> bool:
        """Recover at most ``limit`` ids; True while more remains."""
        done = 0
        while done < limit:
            if not self.recovery_ids:
                if not self.recovery:
                    break
                d = self.paths.dir("info") / str(self.recovery.pop(0))
                try:
                    names = os.listdir(d)
                except FileNotFoundError:
                    names = []
                self.recovery_ids = [int(n) for n in names if n.isdigit()]
                continue
            self._recover_one(self.recovery_ids.pop())
            done += 1
        if not self.recovering:
            self.fresh_ids.clear()
        return self.recovering

    def _known(self, msgid: int) -> bool:
        return (msgid in self.fresh_ids or msgid in self.done_retry
                or any(msgid in s.scheduled or msgid in s.passes for s in self.channels.values()))

    def _recover_one(self, msgid: int) -> None:
        if self._known(msgid) or os.path.exists(self.paths.todo(msgid)):
            return  # live here already, or preprocessed again from scratch
        found = False
        for ch, state in self.channels.items():
            try:
                st = os.stat(self._chan_path(ch, msgid))
            except FileNotFoundError:
                continue
            found = True
            state.schedule_at(msgid, st.st_mtime)
        if not found and os.path.exists(self.paths.info(msgid)):
            self.message_done(msgid)

    def save_schedule(self) -> None:
        """On a graceful stop: store each next try time as the channel file's mtime."""
        for ch, state in self.channels.items():
            for msgid, due in state.scheduled.items():
                try:
                    os.utime(self._chan_path(ch, msgid), (due, due))
                except OSError:
                    pass

    # ------------------------------------------------------------ todo (eqmail.queue.preprocess)
    def process_todo(self, limit: int | None = None) -> int:
        """Preprocess todo entries (all, or at most ``limit``); returns how many."""
        return self.preprocessor.process_todo(limit)

    def preprocess(self, msgid: int) -> bool:
        return self.preprocessor.preprocess(msgid)

    @property
    def todo_trouble(self) -> bool:
        """A todo/ entry could not be preprocessed; the scanner reads and resets it."""
        return self.preprocessor.trouble

    @todo_trouble.setter
    def todo_trouble(self, value: bool) -> None:
        self.preprocessor.trouble = value

    def _rewrite(self, addr: str) -> tuple[Channel, str]:
        return rewrite(addr, self.rules, self.vmap)  # the rules of the latest configure()

    def _schedule_new(self, msgid: int, channels: list[Channel], now: float) -> None:
        """Step 4 of preprocessing (S5): each channel with a file is due now; a message
        without recipients is complete at once."""
        if self.recovering:
            self.fresh_ids.add(msgid)
        for ch in channels:
            self.channels[ch].schedule_at(msgid, now)
        if not channels:
            self.message_done(msgid)

    # ------------------------------------------------------------ passes
    def next_requests(self, channel: Channel, limit: int | None = None) -> list[Delivery]:
        """Start deliveries while the channel has free slots."""
        state = self.channels[channel]
        out: list[Delivery] = []
        if not state.enabled:
            return out
        now = self.clock()
        free = state.concurrency - state.active
        if limit is not None:
            free = min(free, limit)
        if channel is Channel.REMOTE:
            self._release_probes(now)
        budget = [HOLD_SLICE]  # held recipients and skipped messages this call
        while free > 0 and budget[0] > 0:
            ps = next((q for q in state.passes.values() if q.todo), None)
            if ps is None:
                ps = self._start_pass(state, now, budget)
                if ps is None:
                    break
                if not ps.todo:
                    self._pass_finished(state, ps)
                    continue
            rec = ps.todo.pop(0)
            if channel is Channel.REMOTE and not self._admit(ps, rec, now):
                budget[0] -= 1
                if ps.finished:
                    self._pass_finished(state, ps)
                continue
            ps.outstanding += 1
            state.active += 1
            free -= 1
            out.append(Delivery(ps.msgid, channel, rec.offset,
                                verp_sender(ps.sender, rec.address), rec.address, ps.origin,
                                ps.requiretls))
        return out

    def adopt(self, channel: Channel, msgid: int, offset: int) -> Delivery | None:
        """A delivery a previous scanner started is still running in the delivery worker
        (or ended with a report not received yet): it becomes outstanding in a pass of
        its message, exactly as if started here, so it is not started again and its
        report is applied.  None when the message or the record is not waiting in the
        queue any more (a report for it is then ignored)."""
        state = self.channels[channel]
        ps = state.passes.get(msgid)
        if ps is None:
            ps = self._open_pass(channel, msgid, self.clock())
            if ps is None:
                return None
            state.scheduled.pop(msgid, None)  # this pass replaces the scheduled one
            state.passes[msgid] = ps
        rec = next((r for r in ps.todo if r.offset == offset), None)
        if rec is None:
            if ps.finished:
                self._pass_finished(state, ps)
            return None
        ps.todo.remove(rec)
        ps.outstanding += 1
        state.active += 1
        return Delivery(msgid, channel, rec.offset, verp_sender(ps.sender, rec.address),
                        rec.address, ps.origin, ps.requiretls)

    def _admit(self, ps: Pass, rec: ChannelRecord, now: float) -> bool:
        """May this remote recipient be tried now (eqmail.queue.backoff)?  A held one
        is deferred without a try; on the message's last pass it bounces instead, at
        the time qmail's schedule says."""
        domain = domain_of(rec.address)
        admission = self.backoff.admit(domain, now)
        if admission is Admission.PROBE:
            self.probes[domain] = (ps.msgid, rec.offset)
            log(f"status: probing unreachable destination {sanitize(domain)} "
                f"with msg {ps.msgid}")
        if admission is not Admission.HOLD:
            return True
        if ps.dying:
            req = Delivery(ps.msgid, ps.channel, rec.offset, "", rec.address)
            text = self.backoff.text(domain) + HELD_TEXT.format(domain=domain)
            self._add_bounce(req, text + DYING_TEXT)
            self._mark_done(req, ps)
        else:
            ps.deferred = True
            ps.left.add(domain)
        return False

    def _start_pass(self, state: ChannelState, now: float,
                    budget: list[int] | None = None) -> Pass | None:
        while True:
            due = state.next_due()
            if due is None or due > now:
                return None
            _, msgid = heapq.heappop(state.schedule)
            del state.scheduled[msgid]
            if msgid in state.passes:
                continue
            if state.channel is Channel.REMOTE and self._still_held(state, msgid, now):
                if budget is not None:
                    budget[0] -= 1
                    if budget[0] <= 0:
                        return None
                continue
            ps = self._open_pass(state.channel, msgid, now)
            if ps is not None:
                state.passes[msgid] = ps
                return ps

    def _open_pass(self, channel: Channel, msgid: int, now: float) -> Pass | None:
        fresh = self.preprocessor.take_fresh(channel, msgid)
        if fresh is not None and os.path.exists(self._chan_path(channel, msgid)):
            sender, birth, todo, origin, requiretls = fresh
            return Pass(msgid, channel, sender, birth, now,
                        is_dying(birth, now, self.controls.queuelifetime), todo, origin,
                        requiretls)
        try:
            with open(self.paths.info(msgid), "rb") as f:
                info = f.read(4096)
            birth = os.stat(self.paths.info(msgid)).st_mtime
            records = parse_channel(read_bounded(self._chan_path(channel, msgid), 64 << 20))
        except FileNotFoundError:
            return None
        except OSError as e:
            log(f"warning: trouble opening {channel.dirname}/{msgid}: {e.strerror}; will try again later")
            self.channels[channel].schedule_at(msgid, now + 123)
            return None
        recs = parse_records(info)
        sender = recs[0].value if recs and recs[0].kind == "F" else ""
        todo = [r for r in records if not r.done]
        return Pass(msgid, channel, sender, birth, now, is_dying(birth, now, self.controls.queuelifetime),
                    todo, origin_of(recs), requiretls_of(recs))

    def _still_held(self, state: ChannelState, msgid: int, now: float) -> bool:
        """A due remote message whose last pass left only recipients at domains that
        are held now, and which is not on its last pass: its pass is what qmail's
        schedule says (a deferral of every recipient) without opening a file."""
        known = self.waiting.get(msgid)
        if known is None:
            return False
        birth, domains = known
        if (not domains or is_dying(birth, now, self.controls.queuelifetime)
                or not all(self.backoff.holds(d, now) for d in domains)):
            return False
        state.schedule_at(msgid, next_retry(birth, now, state.channel))
        return True

    def _release_probes(self, now: float) -> None:
        """A dead domain whose period is over gets its probe now: one message waiting
        for it is made due (the others stay held until the probe's report)."""
        for domain, until in self.backoff.expiries():
            if until > now or domain in self.released:
                continue
            self.released.add(domain)
            state = self.channels[Channel.REMOTE]
            for msgid, (_, domains) in self.waiting.items():
                due = state.scheduled.get(msgid)
                if domain in domains and due is not None:
                    if due > now:
                        state.schedule_at(msgid, now)
                    break

    def _release_held(self, domain: str, now: float) -> int:
        """``domain`` is reachable again: the messages held for it are due now."""
        state = self.channels[Channel.REMOTE]
        n = 0
        for msgid, (_, domains) in self.waiting.items():
            due = state.scheduled.get(msgid)
            if domain in domains and due is not None and due > now:
                state.schedule_at(msgid, now)
                n += 1
        return n

    def _site_report(self, req: Delivery, site: Site | None, text: str) -> None:
        domain = domain_of(req.recipient)
        probe = self.probes.get(domain) == (req.msgid, req.offset)
        if probe:
            del self.probes[domain]
        if site is None:  # no delivery report: nothing learned about the destination
            if probe:
                self.backoff.abandon(domain)
                self.released.discard(domain)
            return
        now = self.clock()
        changed = self.backoff.report(domain, site, now, text, probe)
        if changed is None:
            return
        self.released.discard(domain)
        if changed:
            until = self.backoff.dead[domain].until
            log(f"status: destination {sanitize(domain)} unreachable; its deliveries are "
                f"held for {until - now:.0f} s, then one probe")
        else:
            n = self._release_held(domain, now)
            log(f"status: destination {sanitize(domain)} reachable again; "
                f"{n} held message(s) due now")

    def report(self, req: Delivery, verdict: Verdict, text: str,
               site: Site | None = None) -> None:
        """A delivery finished: a success or failure is done (a failure bounces), a
        deferral is retried at the next pass (or bounces when the message is dying).
        ``site``: what a remote delivery learned about the destination (back-off);
        None when the outcome is the scanner's own (the worker died or was not
        reached), which tells nothing about the destination."""
        state = self.channels[req.channel]
        state.active -= 1
        if req.channel is Channel.REMOTE:
            self._site_report(req, site, text)
        ps = state.passes.get(req.msgid)
        if ps is None:
            return
        ps.outstanding -= 1
        if verdict is Verdict.DEFERRAL and ps.dying:
            verdict, text = Verdict.FAILURE, text + ("" if text.endswith("\n") else "\n") + DYING_TEXT
        if verdict is Verdict.FAILURE:
            self._add_bounce(req, text)
        if verdict is not Verdict.DEFERRAL:
            self._mark_done(req, ps)
        else:
            ps.deferred = True
            if req.channel is Channel.REMOTE:
                ps.left.add(domain_of(req.recipient))
        if ps.finished:
            self._pass_finished(state, ps)

    def _pass_finished(self, state: ChannelState, ps: Pass) -> None:
        del state.passes[ps.msgid]
        if ps.fd >= 0:
            os.close(ps.fd)
            ps.fd = -1
        if ps.deferred:
            state.schedule_at(ps.msgid, next_retry(ps.birth, ps.started, state.channel))
            if state.channel is Channel.REMOTE and ps.left:
                left = frozenset(ps.left)
                self.waiting[ps.msgid] = (ps.birth, self._domain_sets.setdefault(left, left))
            return
        if state.channel is Channel.REMOTE:
            self.waiting.pop(ps.msgid, None)
        self.spares.give(self._chan_path(state.channel, ps.msgid))
        other = Channel.REMOTE if state.channel is Channel.LOCAL else Channel.LOCAL
        if not os.path.exists(self._chan_path(other, ps.msgid)):
            self.message_done(ps.msgid)

    def _mark_done(self, req: Delivery, ps: Pass | None = None) -> None:
        """qmail's done marker: the record's T becomes D with a one-byte write.  During a
        pass the file stays open for the pass's other recipients."""
        try:
            if ps is None:
                fd = os.open(self._chan_path(req.channel, req.msgid), os.O_WRONLY)
                try:
                    os.pwrite(fd, b"D", req.offset)
                finally:
                    os.close(fd)
                return
            if ps.fd < 0:
                ps.fd = os.open(self._chan_path(req.channel, req.msgid), os.O_WRONLY)
            os.pwrite(ps.fd, b"D", req.offset)
        except OSError:
            log(f"warning: trouble marking {req.channel.dirname}/{req.msgid}; "
                "message will be delivered twice!")

    def _add_bounce(self, req: Delivery, text: str) -> None:
        addr = strip_virtual_prepend(req.recipient, self.rules, self.vmap)
        note = bounce_note(addr, text)
        while True:
            try:
                fd = os.open(self.paths.bounce(req.msgid), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    write_all(fd, encode(note))
                finally:
                    os.close(fd)
                return
            except OSError:
                log("alert: unable to append to bounce message; HELP! sleeping...")
                time.sleep(10)

    # ------------------------------------------------------------ completion
    def message_done(self, msgid: int) -> bool:
        """messdone: inject the bounce if any, remove info, ask for mess/intd removal."""
        p = self.paths
        if os.path.exists(p.todo(msgid)):
            return False
        self.preprocessor.forget(msgid)
        self.waiting.pop(msgid, None)
        if not self._inject_bounce(msgid):
            self.done_retry[msgid] = self.clock() + 123  # SLEEP_SYSFAIL
            return False
        self.done_retry.pop(msgid, None)
        log(f"end msg {msgid}")
        self.spares.give(p.info(msgid))
        self.pending_foop.append(msgid)  # sent with others by flush_cleans()
        return True

    def flush_cleans(self) -> None:
        """Send the foop/ requests of every message finished since the last call in one
        pipelined round trip; a refused one is retried later."""
        if not self.pending_foop:
            return
        ids, self.pending_foop = self.pending_foop, []
        ids = [i for i in ids if not self._id_reused(i)]
        if not ids:
            return
        for msgid, answer in zip(ids, self.clean([CleanRequest.foop(i) for i in ids]), strict=True):
            if answer is not CleanAnswer.DONE:
                log(f"warning: qmail-clean unable to clean up foop/{msgid}")
                self.foop_retry[msgid] = self.clock() + 10

    def _inject_bounce(self, msgid: int) -> bool:
        p = self.paths
        try:
            with open(p.bounce(msgid), "rb") as f:
                notes = f.read(16 << 20)
        except FileNotFoundError:
            return True
        try:
            with open(p.info(msgid), "rb") as f:
                recs = parse_records(f.read(4096))
        except FileNotFoundError:
            recs = []
        sender = recs[0].value if recs and recs[0].kind == "F" else ""
        requiretls = requiretls_of(recs)
        c = self.controls
        target = bounce_target(sender, c.doublebounceto, c.doublebouncehost)
        if target is None:
            log(f"triple bounce: discarding bounce/{msgid}")
            unlink_quiet(p.bounce(msgid))
            return True
        if not target.double and not self.bounce_rate.allow(target.recipient, self.clock()):
            # Backscatter: drop, as qmail drops a triple bounce; no double bounce follows.
            log(f"bounce limit: discarding bounce/{msgid} to {sanitize(target.recipient)}: "
                f"more than {c.bouncelimit} bounces to this address within an hour")
            unlink_quiet(p.bounce(msgid))
            return True
        try:
            excerpt = Excerpt(os.stat(p.mess(msgid)).st_size, c.bouncemaxbytes)
        except OSError:
            excerpt = None  # the injector meets the same problem and reports it
        head = compose_bounce(target=target, original_sender=sender, notes=notes,
                              bouncefrom=c.bouncefrom, bouncehost=c.bouncehost, excerpt=excerpt,
                              header_only=requiretls)
        args = (target.envelope_sender, [target.recipient], head, msgid, c.bouncemaxbytes)
        ok, text = self.inject(*args, True) if requiretls else self.inject(*args)
        if not ok:
            log(f"warning: trouble injecting bounce message, will try later ({text})")
            return False
        log(f"bounce msg {msgid} qp {text}")
        unlink_quiet(p.bounce(msgid))
        return True

    def sweep(self) -> int:
        """Crash leftovers: mess files with neither info nor todo are removed, with
        their intd file, through the cleaner (qmail-send's cleanup_do; intd/ itself is
        not readable by the scanner, and never outlives its mess).

        qmail waits until such a file is 36 h old, because a live qmail-queue may still
        be writing it.  eqmail's one queue writer knows which messages it is writing and
        refuses ``foop/`` for those and for committed ones (eqmail.queue.writer), so the
        sweep is safe at any moment; the scanner runs it at start and whenever the
        queue writer was restarted, which is when orphans appear.
        """
        info = set(self.paths.ids_in("info"))
        todo = set(self.paths.ids_in("todo"))
        # finished messages whose foop/ is on its way already: one request per message
        # (a second one, late, could hit a new message that got the recycled id)
        busy = set(self.pending_foop) | set(self.foop_retry)
        removed = 0
        for msgid in self.paths.ids_in("mess"):
            if msgid in info or msgid in todo or msgid in busy:
                continue
            if self.clean([CleanRequest.foop(msgid)])[0] is CleanAnswer.DONE:
                removed += 1
        return removed

    # ------------------------------------------------------------ helpers
    def _id_reused(self, msgid: int) -> bool:
        """A finished message's foop/ is stale once its id belongs to a newer message:
        ids are inode numbers, and the queue writer recycles a removed mess file's inode
        for the next message at once.  A newer message always has todo/ (the writer
        refuses foop/ then, and while it is still being written) or info/ (only this
        scanner creates info/, and a finished message's info/ is gone before its foop/
        is queued)."""
        return os.path.exists(self.paths.info(msgid))

    def _chan_path(self, channel: Channel, msgid: int) -> os.PathLike[str] | str:
        return self.paths.split_file(channel.dirname, msgid)

    # ------------------------------------------------------------ admin
    def remove(self, msgid: int, bounce: bool) -> int | None:
        """``eqmailctl queue delete|bounce``: every recipient not yet delivered is marked
        done (with a bounce note first when ``bounce``), exactly as if its delivery had
        finished, so the usual completion path removes the message (and sends the one
        bounce).  Deliveries already running finish normally.  Returns how many
        recipients were removed, None when the message is not in the queue."""
        if os.path.exists(self.paths.todo(msgid)):
            self.preprocess(msgid)
        if not os.path.exists(self.paths.info(msgid)):
            return None
        removed = 0
        self.preprocessor.forget(msgid)  # from here the files are read back
        for ch, state in self.channels.items():
            try:
                records = parse_channel(read_bounded(self._chan_path(ch, msgid), 64 << 20))
            except FileNotFoundError:
                continue
            ps = state.passes.get(msgid)
            waiting = {r.offset for r in ps.todo} if ps is not None else None
            for rec in records:
                # a recipient whose delivery is running now is left to its report
                if rec.done or (waiting is not None and rec.offset not in waiting):
                    continue
                req = Delivery(msgid, ch, rec.offset, "", rec.address)
                if bounce:
                    self._add_bounce(req, ADMIN_BOUNCE_TEXT)
                self._mark_done(req, ps)
                removed += 1
            state.scheduled.pop(msgid, None)  # its heap entry is now stale
            if ps is not None:
                ps.todo.clear()
                ps.deferred = False
                if ps.finished:
                    self._pass_finished(state, ps)
            else:
                state.passes[msgid] = Pass(msgid, ch, "", 0.0, self.clock(), False, [])
                self._pass_finished(state, state.passes[msgid])
        return removed

    def activity(self) -> QueueActivity:
        """Messages with a pass in progress and the channel counts, for ``eqmailctl status``."""
        local, remote = self.channels[Channel.LOCAL], self.channels[Channel.REMOTE]
        return QueueActivity(
            tuple(AdminDelivery(ps.msgid, ch.dirname, ps.outstanding, len(ps.todo))
                  for ch, state in self.channels.items() for ps in state.passes.values()),
            (("local_pending", len(local.scheduled) + len(local.passes)),
             ("remote_pending", len(remote.scheduled) + len(remote.passes)),
             ("local_active", local.active),
             ("remote_active", remote.active)),
            tuple(DeadDestination(d.domain[:255], d.since, d.until, d.probing,
                                  sum(1 for _, ds in self.waiting.values() if d.domain in ds))
                  for d in self.backoff.view()[:STATUS_DEAD_MAX]))

    def flush(self) -> None:
        """ALRM: every scheduled entry becomes due now, and every destination is tried
        again (the back-off is forgotten, as qmail-tcpok clears tcpto)."""
        for domain in self.backoff.clear():
            log(f"status: back-off of {sanitize(domain)} cleared by a flush")
        self.released.clear()
        self.probes.clear()
        now = self.clock()
        for state in self.channels.values():
            for msgid in list(state.scheduled):
                state.schedule_at(msgid, now)

    def retry_done(self) -> None:
        now = self.clock()
        for msgid, due in list(self.done_retry.items()):
            if due <= now:
                self.message_done(msgid)
        for msgid, due in list(self.foop_retry.items()):
            if due <= now:
                del self.foop_retry[msgid]
                if self._id_reused(msgid):
                    continue
                if self.clean([CleanRequest.foop(msgid)])[0] is not CleanAnswer.DONE:
                    self.foop_retry[msgid] = now + 60

    def next_wakeup(self) -> float | None:
        dues = [d for s in self.channels.values() if s.enabled and (d := s.next_due()) is not None]
        dues += [until for domain, until in self.backoff.expiries()
                 if domain not in self.released]
        dues += self.done_retry.values()
        dues += self.foop_retry.values()
        return min(dues) if dues else None

