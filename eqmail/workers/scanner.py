"""The scanner worker (qmail-send), running as eqmails.

Wakes on: the qmail trigger FIFO (lock/trigger), which the queue writer pulls after
every committed batch as qmail-queue does after every message (and anything else that
queues mail may pull), delivery reports from
the local (and later remote) delivery workers, its timers (next scheduled pass, a
periodic rescan of todo/ that backs up lost events, the cleanup sweep of orphaned mess
files — at start, when its connection to the queue writer closes (the writer died) and
every SLEEP_CLEANUP seconds) and signals (TERM: graceful stop, running deliveries may
finish for STOP_GRACE; USR1, from a reload that replaces it: hand over at once; ALRM:
flush).  Events only wake it: the directories are the truth.

Talks to: the queue writer (clean requests and bounce injection, over run/queue.sock),
the local and remote delivery workers (run/local.sock, run/remote.sock: delivery
requests ``D`` / reports ``r``, typed in eqmail.ipc.delivery; on connecting it first
takes over the deliveries a previous scanner left running, and before exiting it
detaches).  Inside, a report is a Verdict and its text; the words success / deferral /
failure and qmail's letters appear only in log lines and on the wire.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from eqmail.ipc import ProtocolError, read_frames
from eqmail.ipc.admin import (
    MAX_ADMIN_REQUEST,
    AdminAction,
    AdminAnswer,
    AdminRefusal,
    AdminRequest,
    Removed,
    encode_answer,
)
from eqmail.ipc.delivery import (
    TO_SCANNER_KINDS,
    Adopted,
    Attach,
    Channel,
    DeliveryRequest,
    Detach,
    Detached,
    EndOfList,
    Outcome,
    Verdict,
    decode_to_scanner,
    parse_scanner_slot,
    scanner_slot,
)
from eqmail.ipc.queue import CleanAnswer, CleanRequest, QueueRole
from eqmail.log import flush_log, hold_log, log, sanitize
from eqmail.queue.bounce import bounded_copy, header_copy
from eqmail.queue.client import QueueConnection, submit
from eqmail.queue.layout import QueuePaths
from eqmail.queue.manager import Delivery, QueueManager
from eqmail.workers.base import ScannerSettings, WorkerContext, drain_wake_pipe

RESCAN_INTERVAL = 60.0  # backs up the trigger; qmail-send rescans todo every 25 min
TODO_TROUBLE_RETRY = 2.0  # after "trouble preprocessing ... will try again later"
SWEEP_INTERVAL = 76431.0  # SLEEP_CLEANUP
STOP_GRACE = 60.0  # SIGTERM (eqmailctl stop): deliveries running may finish this long
DETACH_WAIT = 10.0  # for the delivery workers' last reports before exiting
RECOVER_SLICE = 2000  # info/ entries recovered per loop turn after readiness (a few ms)
TODO_SLICE = 64  # todo entries per loop turn (one durability barrier for all of them);
# measured: 16 and 256 both gave less end-to-end throughput than 64 (bench/RESULTS.md)


def delivery_options(item: Delivery) -> tuple[tuple[str, str], ...]:
    """The request's options: the message's origin for a remote delivery, which the
    remote worker signs by (issue 16; none for a message with no Xorigin= record:
    an outsider's, never signed), and ``("requiretls", "1")`` for any delivery of a
    REQUIRETLS message (issue 17, RFC 8689): the remote worker enforces it, the local
    one passes it on to what a .qmail file forwards (§4.1)."""
    requiretls = (("requiretls", "1"),) if item.requiretls else ()
    if item.channel is not Channel.REMOTE:
        return requiretls
    origin = (("origin", item.origin.value),) if item.origin is not None else ()
    return origin + requiretls


@dataclass
class Slot:
    item: Delivery
    number: int  # the number in qmail's "starting delivery N" log lines


Report = tuple[Slot, Outcome]


class DeliveryChannel:
    """A framed connection to a delivery worker.  A delivery is named by its slot
    ``msgid.offset`` (eqmail.ipc.delivery.scanner_slot), which a restarted scanner can
    read back: on connecting it says ``A`` and starts nothing until the worker has
    listed (``a`` ... ``e``) the deliveries still running, which it takes over
    (eqmail.workers.jobs)."""

    def __init__(self, channel: Channel, path: str, concurrency: int,
                 take_over: Callable[[Channel, int, int], Slot | None]) -> None:
        self.channel = channel
        self.take_over = take_over  # a delivery a previous scanner started: ours now
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.running: dict[bytes, Slot] = {}
        self.capacity = max(concurrency, 1) * 2
        self.attached = False  # the worker's list of running deliveries has been read
        self.detached = False  # the worker answered Q: it sends nothing more here

    @property
    def free(self) -> int:
        return self.capacity - len(self.running) if self.attached else 0

    def connect(self) -> bool:
        if self.sock is not None:
            return True
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.path)
            s.sendall(Attach().frame())
        except OSError:
            return False
        s.setblocking(False)
        self.sock = s
        self.attached = self.detached = False
        return True

    def send(self, item: Delivery, number: int) -> bool:
        if self.sock is None or not self.free:
            return False
        slot = scanner_slot(item.msgid, item.offset)
        request = DeliveryRequest(slot, item.msgid, item.sender, item.recipient, self.channel,
                                  delivery_options(item))
        try:
            data = request.frame()
            self.sock.setblocking(True)
            self.sock.sendall(data)
            self.sock.setblocking(False)
        except (OSError, ProtocolError):
            return False
        self.running[slot] = Slot(item, number)
        return True

    def read_reports(self) -> list[Report] | None:
        """Reports now readable (taking over what a hand-over list names); None when the
        worker went away.  ProtocolError when it broke the protocol."""
        assert self.sock is not None
        frames = read_frames(self.sock, self.buf, TO_SCANNER_KINDS)
        if frames is None:
            return None
        out = []
        for kind, payload in frames:
            msg = decode_to_scanner(kind, payload)
            if isinstance(msg, Adopted):
                key = parse_scanner_slot(msg.slot)
                taken = self.take_over(self.channel, *key) if key is not None else None
                if taken is not None:
                    self.running[msg.slot] = taken
            elif isinstance(msg, EndOfList):
                self.attached = True
            elif isinstance(msg, Detached):
                self.detached = True
            else:
                slot = self.running.pop(msg.slot, None)
                if slot is not None:  # else a delivery of a previous scanner not taken over
                    out.append((slot, msg.outcome))
        return out

    def detach(self) -> bool:
        """Say ``Q``; False when the worker cannot be told."""
        assert self.sock is not None
        try:
            self.sock.setblocking(True)
            self.sock.sendall(Detach().frame())
            self.sock.setblocking(False)
        except OSError:
            return False
        return True

    def lost(self) -> list[Delivery]:
        """The worker died: every outstanding delivery counts as deferred."""
        items = [s.item for s in self.running.values()]
        self.running.clear()
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buf.clear()
        self.attached = False
        return items


class Scanner:
    def __init__(self, ctx: WorkerContext[ScannerSettings]) -> None:
        self.ctx = ctx
        self.root = ctx.instance.root
        self.paths = QueuePaths(ctx.instance.queue)
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.queue_conn: QueueConnection | None = None
        self.manager = QueueManager(ctx.controls, self.paths, self._clean, self._inject)
        self.channels = {
            Channel.LOCAL: DeliveryChannel(Channel.LOCAL, str(ctx.instance.local_socket),
                                           ctx.controls.concurrencylocal, self._take_over),
        }
        remote_socket = ctx.settings.remote_socket
        if remote_socket is not None:
            self.channels[Channel.REMOTE] = DeliveryChannel(Channel.REMOTE, remote_socket,
                                                            ctx.controls.concurrencyremote,
                                                            self._take_over)
        # Without a remote worker, remote recipients stay scheduled (and visible) in the queue.
        self.manager.channels[Channel.REMOTE].enabled = remote_socket is not None
        self.delivery_no = 0
        self.stopping = False
        self.handing_over = False  # USR1: exit now, running deliveries go to the successor
        self.want_scan = True
        self.want_sweep = True  # at start (qmail-send's first cleanup) and after a writer restart
        self.want_flush = False  # ALRM (eqmailctl queue flush)
        self.trigger_fd = -1
        self.last_status = ""

    # ---------------------------------------------------------- queue writer
    def _writer_conn(self) -> QueueConnection | None:
        """The connection to the queue writer, opened on demand.  It is watched in the
        selector: the writer closing it means the writer died, and a writer killed
        mid-message leaves an orphaned mess file, so a sweep is due (see QueueManager.sweep)."""
        if self.queue_conn is None:
            try:
                self.queue_conn = QueueConnection(self.root, role=QueueRole.BOUNCE, timeout=60)
            except OSError:
                return None
            self.sel.register(self.queue_conn.sock, selectors.EVENT_READ, "writer")
        return self.queue_conn

    def _drop_writer_conn(self) -> None:
        if self.queue_conn is not None:
            try:
                self.sel.unregister(self.queue_conn.sock)
            except (KeyError, ValueError):
                pass
            self.queue_conn.close()
            self.queue_conn = None
        self.want_sweep = True

    def _writer_readable(self) -> None:
        """Answers are read synchronously in _clean, so readable here means EOF."""
        assert self.queue_conn is not None
        try:
            data = self.queue_conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log("status: queue writer connection closed; sweeping the queue when it is back")
        self._drop_writer_conn()

    def _clean(self, requests: list[CleanRequest]) -> list[CleanAnswer]:
        """qmail-clean requests to the queue writer, pipelined; ``!`` for each when the
        writer cannot be reached (the caller retries later)."""
        for _ in range(3):
            try:
                conn = self._writer_conn()
                if conn is not None:
                    return conn.clean_many(requests)
            except (OSError, ProtocolError):
                self._drop_writer_conn()
            time.sleep(0.2)
        return [CleanAnswer.REFUSED] * len(requests)

    def _inject(self, sender: str, recipients: list[str], head: bytes, msgid: int,
                limit: int, requiretls: bool = False) -> tuple[bool, str]:
        """Queue a bounce: ``head`` and the mess file, or at most ``limit`` bytes of it;
        for a REQUIRETLS message only its header, as a REQUIRETLS bounce (RFC 8689 §5)."""
        try:
            with open(self.paths.mess(msgid), "rb") as mess:
                body = (header_copy(mess, limit) if requiretls
                        else bounded_copy(mess, limit) if limit > 0 else mess)
                res = submit(self.root, sender, recipients, body, prefix=head, role=QueueRole.BOUNCE,
                             requiretls=requiretls)
        except OSError as e:
            return False, str(e)
        return (True, str(res.qp)) if res.ok else (False, res.text)

    # ---------------------------------------------------------- wake-ups
    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _open_trigger(self) -> None:
        path = self.paths.lock / "trigger"
        if self.trigger_fd >= 0:
            self.sel.unregister(self.trigger_fd)
            os.close(self.trigger_fd)
            self.trigger_fd = -1
        try:
            self.trigger_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self.sel.register(self.trigger_fd, selectors.EVENT_READ, "trigger")
        except OSError:
            self.trigger_fd = -1

    # ---------------------------------------------------------- deliveries
    def _dispatch(self) -> None:
        if self.stopping:
            return
        for ch, dc in self.channels.items():
            if not dc.connect():
                continue
            if dc.sock is not None and dc.sock.fileno() not in self.sel.get_map():
                self.sel.register(dc.sock, selectors.EVENT_READ, ("reports", ch))
            if not dc.attached:
                continue  # first the deliveries a previous scanner left running
            for req in self.manager.next_requests(ch, limit=dc.free):
                self.delivery_no += 1
                if not dc.send(req, self.delivery_no):
                    self.manager.report(req, Verdict.DEFERRAL,
                                        f"Unable to reach the {ch.dirname} delivery worker. (#4.3.0)")
                    continue
                log(f"starting delivery {self.delivery_no}: msg {req.msgid} to "
                    f"{ch.dirname} {sanitize(req.recipient)}")
                self._status()

    def _reports(self, ch: Channel) -> None:
        dc = self.channels[ch]
        try:
            reports = dc.read_reports()
        except ProtocolError as e:
            log(f"warning: {e}")
            reports = None
        if reports is None:
            if dc.sock is not None:
                self.sel.unregister(dc.sock)
            for req in dc.lost():
                self.manager.report(req, Verdict.DEFERRAL, "Delivery worker died. (#4.3.0)")
            return
        self._apply(reports)

    def _apply(self, reports: list[Report]) -> None:
        for slot, outcome in reports:
            log(f"delivery {slot.number}: {outcome.verdict.value}: {sanitize(outcome.text)}")
            self.manager.report(slot.item, outcome.verdict, outcome.text, outcome.site)
        self._status()

    def _take_over(self, ch: Channel, msgid: int, offset: int) -> Slot | None:
        """A delivery that a previous scanner started and the worker still runs (or has
        the report of): counted as running here, never started again."""
        req = self.manager.adopt(ch, msgid, offset)
        if req is None:
            return None
        self.delivery_no += 1
        log(f"status: taking over delivery {self.delivery_no}: msg {msgid} to "
            f"{ch.dirname} {sanitize(req.recipient)} (started by the previous scanner)")
        return Slot(req, self.delivery_no)

    def _detach(self) -> None:
        """Before exiting: ``Q`` to each delivery worker, and its reports up to ``q``;
        deliveries still running then report to the next scanner (eqmail.workers.jobs)."""
        deadline = time.monotonic() + DETACH_WAIT
        for ch, dc in self.channels.items():
            if dc.sock is None or not dc.detach():
                continue
            while dc.sock is not None and not dc.detached and time.monotonic() < deadline:
                ready = select.select([dc.sock], [], [], max(0.0, deadline - time.monotonic()))[0]
                if ready:
                    self._reports(ch)
        flush_log()

    def _status(self) -> None:
        c = self.manager.channels
        line = (f"status: local {c[Channel.LOCAL].active}/{c[Channel.LOCAL].concurrency} "
                f"remote {c[Channel.REMOTE].active}/{c[Channel.REMOTE].concurrency}")
        if line != self.last_status:
            self.last_status = line
            log(line)

    # ---------------------------------------------------------- main loop
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._open_trigger()
        self._open_control()
        hold_log()
        # Ready before the queue is read: pqstart goes on in slices inside the loop,
        # between new mail and deliveries (QueueManager.start_recovery), so neither a
        # large queue nor a cold cache after a reboot delays or fails the start.
        self.manager.start_recovery()
        recovery_started = time.monotonic()
        log("status: ready; reading the queue in the background")
        self.ctx.ready()
        next_rescan = time.monotonic()
        next_sweep = time.time() + SWEEP_INTERVAL
        stop_deadline = 0.0
        while True:
            if self.stopping:
                busy = sum(len(dc.running) for dc in self.channels.values())
                if busy == 0 or self.handing_over or time.monotonic() > stop_deadline:
                    break
            if self.want_flush:
                self.want_flush = False
                self.manager.flush()
            if (self.manager.recovering and not self.stopping
                    and not self.manager.recover_step(RECOVER_SLICE)):
                log(f"status: queue read in {time.monotonic() - recovery_started:.1f} s")
            if not self.stopping and (self.want_scan or time.monotonic() >= next_rescan):
                # A bounded slice per turn: deliveries are started (below) between
                # slices, so a burst of new mail never starves delivery.
                self.want_scan = False
                self.manager.todo_trouble = False
                if self.manager.process_todo(limit=TODO_SLICE) >= TODO_SLICE:
                    self.want_scan = True  # more is waiting: come back without sleeping
                # an entry that could not be preprocessed (a full disk frees up as
                # deliveries finish) is tried again soon, not at the periodic rescan
                next_rescan = time.monotonic() + (TODO_TROUBLE_RETRY if self.manager.todo_trouble
                                                  else RESCAN_INTERVAL)
            if time.time() >= next_sweep:
                self.want_sweep = True
            if self.want_sweep and not self.stopping and self._writer_conn() is not None:
                self.want_sweep = False
                removed = self.manager.sweep()
                if removed:
                    log(f"status: removed {removed} orphaned message file(s) from mess/")
                next_sweep = time.time() + SWEEP_INTERVAL
            self.manager.retry_done()
            self._dispatch()
            self.manager.flush_cleans()
            flush_log()  # this turn's lines in one write, before waiting
            more = (self.want_scan or self.manager.recovering) and not self.stopping
            timeout = 0.0 if more else self._timeout(next_rescan)
            for key, _ in self.sel.select(timeout):
                what = key.data
                if what == "wake":
                    drain_wake_pipe(self.wake_r)
                elif what == "trigger":
                    self._drain_trigger()
                elif what == "writer":
                    self._writer_readable()
                elif what == "control":
                    self._control()
                elif isinstance(what, tuple):
                    self._reports(what[1])
            if self.stopping and not stop_deadline:
                stop_deadline = time.monotonic() + STOP_GRACE
        self._detach()
        self.manager.flush_cleans()  # messages the last reports completed
        self.manager.save_schedule()
        log("status: exiting")
        flush_log()
        return 0

    # ---------------------------------------------------------- admin requests
    def _open_control(self) -> None:
        """run/scanner.sock (bound by the supervisor, root only): eqmailctl's queue
        delete/bounce and the deliveries shown by status, answered as one JSON line."""
        fd = self.ctx.settings.control_fd
        if fd is None:
            return
        self.control_sock = socket.socket(fileno=fd)
        self.control_sock.setblocking(False)
        self.sel.register(self.control_sock, selectors.EVENT_READ, "control")

    def _control(self) -> None:
        try:
            conn, _ = self.control_sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                data = conn.recv(MAX_ADMIN_REQUEST)
                try:
                    answer = self._answer(AdminRequest.decode(data))
                except ProtocolError:
                    answer = AdminRefusal("unknown request")
                conn.sendall(encode_answer(answer))
            except OSError:
                pass

    def _answer(self, request: AdminRequest) -> AdminAnswer:
        if request.action is AdminAction.STATUS or request.msgid is None:
            return self.manager.activity()
        msgid = request.msgid
        bounce = request.action is AdminAction.BOUNCE
        removed = self.manager.remove(msgid, bounce=bounce)
        if removed is None:
            return AdminRefusal(f"no message {msgid} in the queue")
        log(f"status: msg {msgid}: {removed} recipient(s) removed by the postmaster"
            f"{' with a bounce' if bounce else ''}")
        self.manager.flush_cleans()
        return Removed(removed)

    def _timeout(self, next_rescan: float) -> float:
        timeout = max(0.0, next_rescan - time.monotonic())
        due = self.manager.next_wakeup()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.time()))
        return min(timeout, 5.0) if not self.stopping else 0.5

    def _drain_trigger(self) -> None:
        try:
            data = os.read(self.trigger_fd, 4096)
        except BlockingIOError:
            return
        self.want_scan = True
        if not data:  # the last writer closed: reopen, or select spins on EOF
            self._open_trigger()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGTERM:
            self.stopping = True
        elif signum == signal.SIGUSR1:
            self.stopping = self.handing_over = True
        elif signum == signal.SIGALRM:
            self.want_flush = True  # done by the loop: a flush logs and walks the schedule
        self.want_scan = True
        self.wake()


def run(ctx: WorkerContext[ScannerSettings]) -> int:
    os.umask(0o077)
    return Scanner(ctx).run()
