"""The local delivery worker (qmail-lspawn + qmail-local).

The spawner runs as root (when eqmail runs as root) and does only what needs root:
open the message file, map the recipient to a user (users/assign, getpw, the alias
user), and hand the job to a child process that runs as that user.  It never delivers
itself and never runs anything as root (uid 0 is never a mail user).

Children are reused: one child serves one user (uid, gid, home) for consecutive
deliveries, because a Python fork costs ~3 ms and an interpreter start ~80 ms here; a
child that sits idle for CHILD_IDLE seconds exits.  The job and the open message file
descriptor travel over a SOCK_SEQPACKET pair (SCM_RIGHTS), so the user's process reads
the message without any access to the queue directory.

The socket (run/local.sock, connectable only by the scanner's uid: mode 0600, owner
eqmails, SO_PEERCRED checked), the scanner's frames, the reports and the stop are the
delivery-worker skeleton's (eqmail.workers.deliveryserver); the Spawner here is its
handler.  Reports follow qmail-lspawn's mapping (eqmail.ipc.delivery.Outcome).
Deliveries outlive the scanner connection that asked for them: a restarted scanner
takes over the running ones and their reports (eqmail.workers.jobs), so none is
started twice.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from dataclasses import dataclass, field

from eqmail.control.assign import UserEntry
from eqmail.delivery.mailbox import LocalUsers
from eqmail.ipc import ProtocolError
from eqmail.ipc.delivery import (
    MAX_CHILD_JOB,
    Channel,
    DeliveryRequest,
    LocalChildJob,
    Outcome,
    Verdict,
)
from eqmail.log import log
from eqmail.privsep.privileges import PrivilegeError, drop_to
from eqmail.queue.layout import QueuePaths
from eqmail.workers.base import LocalSettings, WorkerContext
from eqmail.workers.deliveryserver import DeliveryServer

CHILD_IDLE = 60.0
#: qmail-local's report kinds as the delivery protocol's verdicts
CRASHED = Outcome(Verdict.DEFERRAL, "qmail-local crashed.")
CANNOT_RUN = Outcome(Verdict.DEFERRAL, "Unable to run qmail-local.")


def _defer(text: str) -> Outcome:
    return Outcome(Verdict.DEFERRAL, text)


@dataclass
class Child:
    key: tuple[int, int, str]
    pid: int
    sock: socket.socket
    busy_slot: bytes | None = None  # the delivery it is running
    idle_since: float = field(default_factory=time.monotonic)


class Spawner:
    """qmail-lspawn: the local delivery handler of the delivery-worker skeleton."""

    role = "local delivery"
    channel = Channel.LOCAL
    bad_msgid = Outcome(Verdict.FAILURE, "Sorry, message id is not valid. (#5.3.5)")

    def __init__(self, ctx: WorkerContext[LocalSettings], server: DeliveryServer) -> None:
        self.ctx = ctx
        self.server = server
        self.controls = ctx.controls
        self.paths = QueuePaths(ctx.instance.queue)
        self.children: dict[int, Child] = {}  # pid -> child
        # The same table the SMTP listener's RCPT check resolves with (eqmail.delivery.mailbox).
        alias = ctx.ids["alias"]
        self.users = LocalUsers.build(ctx.controls.assign, alias.uid, alias.gid, str(ctx.instance.alias))
        self.queue_uid = ctx.ids["queue"].uid

    def begin(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a child's exit wakes the loop

    # ------------------------------------------------------------ requests
    def submit(self, request: DeliveryRequest) -> Outcome | None:
        recipient = request.recipient
        if "@" not in recipient:
            return Outcome(Verdict.FAILURE, "Sorry, address must include host name. (#5.1.3)")
        try:
            fd = os.open(self.paths.mess(request.msgid), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return _defer("Unable to open message file. (#4.3.0)")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (self.ctx.ids.privileged and st.st_uid != self.queue_uid):
                return _defer("Sorry, message has wrong owner. (#4.3.5)")
            local, _, domain = recipient.rpartition("@")
            if local == "":
                # qmail-lspawn: an empty local part is a successful trash delivery
                return Outcome(Verdict.SUCCESS, "")
            try:
                user = self.users.resolve(local)
            except Exception as e:  # a passwd lookup failing is temporary
                log(f"warning: user lookup for {local!r} failed: {e}")
                return _defer("Temporary failure in qmail-lspawn.")
            if user.uid == 0:
                return _defer("Not allowed to perform deliveries as root.")
            try:
                job = LocalChildJob(user.user, user.home, local, user.dash, user.ext, domain,
                                    request.sender, self.controls.defaultdelivery,
                                    self.controls.me,
                                    dict(request.options).get("requiretls") == "1").encode()
            except ProtocolError as e:  # a NUL in a home directory, an absurd length
                log(f"warning: local delivery job for {local!r}: {e}")
                return CANNOT_RUN
            child = self.child_for(user)
            if child is None:
                return CANNOT_RUN
            try:
                socket.send_fds(child.sock, [job], [fd])
            except OSError:
                self.reap(child, CRASHED)
                return CANNOT_RUN
            child.busy_slot = request.slot
            return None
        finally:
            os.close(fd)

    # ------------------------------------------------------------ children
    def child_for(self, user: UserEntry) -> Child | None:
        key = (user.uid, user.gid, user.home)
        for child in self.children.values():
            if child.key == key and child.busy_slot is None:
                return child
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the child: becomes the user, never returns
            code = 111
            try:
                parent_sock.close()
                self._close_for_child()
                code = child_main(child_sock, user, self.ctx)
            except BaseException as e:  # noqa: BLE001 - the child must always _exit
                try:
                    log(f"warning: local delivery child for uid {user.uid}: {e!r}")
                except BaseException:
                    pass
            finally:
                os._exit(code)
        child_sock.close()
        child = Child(key, pid, parent_sock)
        self.children[pid] = child
        self.server.watch(parent_sock, lambda: self.child_report(pid))
        return child

    def _close_for_child(self) -> None:
        for child in self.children.values():
            child.sock.close()
        self.server.close_in_child()

    def child_report(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is None:
            return
        try:
            data = child.sock.recv(MAX_CHILD_JOB)
        except OSError:
            data = b""
        if not data:
            self.reap(child, CRASHED)
            return
        try:
            outcome = Outcome.decode(data)
        except ProtocolError:
            self.reap(child, CRASHED)
            return
        if child.busy_slot is not None:
            slot, child.busy_slot = child.busy_slot, None
            self.server.finish(slot, outcome)
        child.idle_since = time.monotonic()

    def reap(self, child: Child, outcome: Outcome | None) -> None:
        """End ``child``; a delivery it was running ends with ``outcome``."""
        self.server.unwatch(child.sock)
        child.sock.close()
        self.children.pop(child.pid, None)
        if child.busy_slot is not None and outcome is not None:
            self.server.finish(child.busy_slot, outcome)
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.collect_zombies()

    def collect_zombies(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def expire_idle(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.busy_slot is None and now - child.idle_since > CHILD_IDLE:
                self.reap(child, None)

    # ------------------------------------------------------------ the skeleton's hooks
    def timeout(self) -> float:
        return 1.0

    def turn(self) -> None:
        self.expire_idle()
        self.collect_zombies()

    def busy(self) -> bool:
        return any(c.busy_slot is not None for c in self.children.values())

    def close(self) -> None:
        for child in list(self.children.values()):
            self.reap(child, Outcome(Verdict.DEFERRAL, ""))


def child_main(sock: socket.socket, user: UserEntry, ctx: WorkerContext[LocalSettings]) -> int:
    """Runs in the forked child: switch to the user, then serve jobs until idle."""
    from eqmail.delivery.local import LocalJob, deliver

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # not ignored in the user's programs
    try:
        if os.geteuid() == 0:
            drop_to(user.uid, user.gid)
    except PrivilegeError as e:
        log(f"alert: {e}")
        return 111
    os.umask(0o077)
    try:
        from setproctitle import setproctitle

        setproctitle(f"eqmail: local delivery for uid {user.uid}")
    except ImportError:  # pragma: no cover
        pass
    forwarders = {rt: make_forwarder(ctx, rt) for rt in (False, True)}
    sock.settimeout(CHILD_IDLE + 5)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_CHILD_JOB, 1)
        except (TimeoutError, OSError):
            return 0
        if not data:
            return 0
        request = LocalChildJob.decode(data)
        job = LocalJob(user=user.user, home=request.home, local=request.local, dash=request.dash,
                       ext=request.ext, domain=request.domain, sender=request.sender,
                       default_delivery=request.default_delivery)
        if not fds:
            sock.send(_defer("Unable to read message. (#4.3.0)").encode())
            continue
        with os.fdopen(fds[0], "rb") as message:
            try:
                report = deliver(job, message, forwarders[request.requiretls], hostname=None,
                                 program_limit=ctx.controls.timeoutprogram)
                outcome = Outcome(report.kind, report.text)
            except Exception as e:  # our bug must never bounce mail: defer
                log(f"warning: local delivery raised {e!r}")
                outcome = _defer("Temporary failure in local delivery. (#4.3.0)")
        sock.send(outcome.cut().encode())


def make_forwarder(ctx: WorkerContext[LocalSettings],  # type: ignore[no-untyped-def]
                   requiretls: bool = False):
    """The .qmail forward's injection; ``requiretls``: the message demanded REQUIRETLS,
    and so does each forwarded copy (RFC 8689 §4.1: a redirected message keeps it)."""
    from eqmail.ipc.queue import Origin
    from eqmail.queue.client import submit

    def forward(sender, recipients, prefix, message):  # type: ignore[no-untyped-def]
        res = submit(ctx.instance.root, sender, list(recipients), message, prefix=prefix,
                     origin=Origin.FORWARD, requiretls=requiretls)
        if res.ok:
            return Verdict.SUCCESS, "", res.qp
        kind = Verdict.FAILURE if res.permanent else Verdict.DEFERRAL
        return kind, res.text, None

    return forward


def run(ctx: WorkerContext[LocalSettings]) -> int:
    server = DeliveryServer(ctx, ctx.settings.socket_fd, lambda server: Spawner(ctx, server))
    return server.serve()
