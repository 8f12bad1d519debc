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

Serves run/local.sock, connectable only by the scanner's uid (mode 0600, owner eqmails,
and SO_PEERCRED checked).  Requests ``D``: ``slot\\0msgid\\0sender\\0recipient\\0``;
reports ``r``: ``slot\\0`` + K/Z/D + text (qmail-lspawn's report mapping).  Deliveries
outlive the scanner connection that asked for them: a restarted scanner takes over the
running ones and their reports (eqmail.workers.jobs), so none is started twice.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import time
from dataclasses import dataclass, field

from eqmail.delivery.mailbox import LocalUsers
from eqmail.delivery.users import UserEntry
from eqmail.ipc import ProtocolError, accept_from
from eqmail.log import log
from eqmail.privsep.privileges import PrivilegeError, drop_to
from eqmail.textio import decode, encode
from eqmail.workers.base import LocalSettings, WorkerContext, drain_wake_pipe
from eqmail.workers.jobs import JobBoard, ScannerClients

CHILD_IDLE = 60.0
MAX_JOB = 64 * 1024


@dataclass
class Child:
    key: tuple[int, int, str]
    pid: int
    sock: socket.socket
    busy_slot: bytes | None = None  # the delivery it is running
    idle_since: float = field(default_factory=time.monotonic)


class Spawner(ScannerClients):
    def __init__(self, ctx: WorkerContext[LocalSettings]) -> None:
        self.ctx = ctx
        self.controls = ctx.controls
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}  # pid -> child
        self.clients: dict[socket.socket, bytearray] = {}
        self.board = JobBoard()
        self.role = "local delivery"
        self.stopping = False
        # The same table the SMTP listener's RCPT check resolves with (eqmail.delivery.mailbox).
        alias = ctx.ids["alias"]
        self.users = LocalUsers.build(ctx.controls.assign, alias.uid, alias.gid, str(ctx.instance.alias))
        self.queue_uid = ctx.ids["queue"].uid

    # ------------------------------------------------------------ requests
    def handle_request(self, client: socket.socket, payload: bytes) -> None:
        parts = payload.split(b"\0")
        if len(parts) < 5:
            raise ProtocolError("malformed delivery request")
        slot, msgid_b, sender_b, recip_b = parts[0], parts[1], parts[2], parts[3]
        if not self.board.start(client, slot):
            return  # running already (a restarted scanner asked again), or just reported
        def answer(text: str) -> None:
            self.board.finish(slot, text)
        if not msgid_b.isdigit() or len(msgid_b) > 20:
            return answer("DSorry, message id is not valid. (#5.3.5)")
        recipient = decode(recip_b)
        if "@" not in recipient:
            return answer("DSorry, address must include host name. (#5.1.3)")
        msgid = int(msgid_b)
        path = self.ctx.instance.queue / "mess" / str(msgid % 23) / str(msgid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return answer("ZUnable to open message file. (#4.3.0)")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (self.ctx.ids.privileged and st.st_uid != self.queue_uid):
                return answer("ZSorry, message has wrong owner. (#4.3.5)")
            local, _, domain = recipient.rpartition("@")
            if local == "":
                return answer("K")  # qmail-lspawn: an empty local part is a successful trash delivery
            try:
                user = self.users.resolve(local)
            except Exception as e:  # a passwd lookup failing is temporary
                log(f"warning: user lookup for {local!r} failed: {e}")
                return answer("ZTemporary failure in qmail-lspawn.")
            if user.uid == 0:
                return answer("ZNot allowed to perform deliveries as root.")
            job = b"\0".join(encode(x) for x in (
                user.user, user.home, local, user.dash, user.ext, domain, decode(sender_b),
                self.controls.defaultdelivery, self.controls.me)) + b"\0"
            child = self.child_for(user)
            if child is None:
                return answer("ZUnable to run qmail-local.")
            try:
                socket.send_fds(child.sock, [job], [fd])
            except OSError:
                self.reap(child, "Zqmail-local crashed.")
                return answer("ZUnable to run qmail-local.")
            child.busy_slot = slot
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
        self.sel.register(parent_sock, selectors.EVENT_READ, ("child", pid))
        return child

    def _close_for_child(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self.wake_r)
        os.close(self.wake_w)
        for child in self.children.values():
            child.sock.close()
        for client in self.clients:
            client.close()
        self.listener.close()
        self.sel.close()

    def child_report(self, child: Child) -> None:
        try:
            data = child.sock.recv(MAX_JOB)
        except OSError:
            data = b""
        if not data:
            self.reap(child, "Zqmail-local crashed.")
            return
        if child.busy_slot is not None:
            slot, child.busy_slot = child.busy_slot, None
            self.board.finish(slot, decode(data))
        child.idle_since = time.monotonic()

    def reap(self, child: Child, text: str) -> None:
        self.sel.unregister(child.sock)
        child.sock.close()
        self.children.pop(child.pid, None)
        if child.busy_slot is not None:
            self.board.finish(child.busy_slot, text)
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
                self.reap(child, "")

    # ------------------------------------------------------------ loop
    def serve(self) -> int:
        self.listener = socket.socket(fileno=self.ctx.settings.socket_fd)  # bound by the supervisor
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", 0))
        # Signals wake the select through a self-pipe: a handler alone does not
        # interrupt it (PEP 475), which made every stop wait out the 1 s timeout.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", 0))
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.ctx.ready()
        while not (self.stopping and not any(c.busy_slot for c in self.children.values())):
            for key, _ in self.sel.select(1.0):
                kind, ident = key.data
                if kind == "listen":
                    self.accept()
                elif kind == "client":
                    self.client_data(key.fileobj)  # type: ignore[arg-type]
                elif kind == "child" and ident in self.children:
                    self.child_report(self.children[ident])
                elif kind == "wake":
                    drain_wake_pipe(self.wake_r)
            self.expire_idle()
            self.collect_zombies()
        for child in list(self.children.values()):
            self.reap(child, "")
        return 0

    def _on_term(self, *_: object) -> None:
        self.stopping = True

    def accept(self) -> None:
        conn = accept_from(self.listener, {0, os.getuid(), self.ctx.ids["send"].uid})
        if conn is not None:
            self.clients[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, ("client", 0))



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
    forwarder = make_forwarder(ctx)
    sock.settimeout(CHILD_IDLE + 5)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_JOB, 1)
        except (TimeoutError, OSError):
            return 0
        if not data:
            return 0
        fields = [decode(x) for x in data.split(b"\0")[:9]]
        _u, home, local, dash, ext, domain, sender, default, me = fields
        job = LocalJob(user=user.user, home=home, local=local, dash=dash, ext=ext, domain=domain,
                       sender=sender, default_delivery=default)
        if not fds:
            sock.send(b"ZUnable to read message. (#4.3.0)")
            continue
        with os.fdopen(fds[0], "rb") as message:
            try:
                report = deliver(job, message, forwarder, hostname=None,
                                 program_limit=ctx.controls.timeoutprogram)
                text = report.kind.value + report.text
            except Exception as e:  # our bug must never bounce mail: defer
                log(f"warning: local delivery raised {e!r}")
                text = "ZTemporary failure in local delivery. (#4.3.0)"
        sock.send(encode(text)[:10000])


def make_forwarder(ctx: WorkerContext[LocalSettings]):  # type: ignore[no-untyped-def]
    from eqmail.delivery.local import ReportKind
    from eqmail.queue.client import submit

    def forward(sender, recipients, prefix, message):  # type: ignore[no-untyped-def]
        res = submit(ctx.instance.root, sender, list(recipients), message, prefix=prefix)
        if res.ok:
            return ReportKind.SUCCESS, "", res.qp
        kind = ReportKind.PERMANENT if res.permanent else ReportKind.TEMPORARY
        return kind, res.text, None

    return forward


def run(ctx: WorkerContext[LocalSettings]) -> int:
    return Spawner(ctx).serve()
