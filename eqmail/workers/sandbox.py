"""The plugin sandbox worker: qmail-spp's, checkpassword's and qmail-bfrmt's fork/exec,
away from the listener and the remote delivery worker.

Owns: the server side of run/sandbox.sock (bound by the supervisor, mode 0600, owner
eqmaild; ``ctx.settings.socket_fd``) and of run/sandbox-remote.sock (mode 0600, owner
eqmailr; ``ctx.settings.remote_socket_fd``, optional), and every plugin, checkpassword
and before-remote run (eqmail.spp.runner, .checkpassword, .beforemote).  Runs as
eqmailp (role "plugin"): no access to the queue, the TLS keys or control files other
than world-readable ones; its cwd is the instance root, as qmail-smtpd's is.

It also keeps the failed-AUTH table of control/authlimit (eqmail.authlimit) for
every listener process: a ``P`` request that names its client address is refused
(``locked``) without running the program while that address is locked out, and a
failure is counted before the next check of that address starts.  The table is
memory only: it survives listener restarts and reloads, not a restart of this worker.

What a request may do is decided by the socket it arrived on (eqmail.ipc.sandbox):
listener socket — ``Q`` (a plugin section, answered ``A``) and ``P`` (checkpassword,
answered ``p``); remote socket — ``B`` only (a before-remote chain with the message
fd, answered ``b`` with the output fd), and only from the remote worker's uid (or
root) when privileged (SO_PEERCRED, on top of the socket's mode).  Any other frame
drops the connection.

Concurrency: listener connections are asyncio tasks, so a slow plugin delays only its
own session; before-remote chains block, so each remote connection is served by a
thread of its own pool (at most MAX_REMOTE at once; more wait to be accepted).
Optional ``ctx.settings.limits`` (eqmail.spp.runner.Limits) overrides the default
rlimits.

Failure modes: a peer that breaks the framing is disconnected (logged); a plugin that
fails gets its 451 answer (eqmail.spp.protocol); an unexpected exception while serving
a request is logged and answered with a failure (451 for the section's first plugin;
checkpassword: "no child", 454 at the listener; before-remote: Z).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from eqmail.authlimit import AuthLimit, AuthLimiter, client_key
from eqmail.delivery.bfrmt import SANDBOX_FAILED
from eqmail.ipc.delivery import Outcome
from eqmail.ipc.framing import peer_uid
from eqmail.ipc.sandbox import (
    ANSWER,
    BFRMT,
    BFRMT_ANSWER,
    CHECKPW,
    CHECKPW_ANSWER,
    REQUEST,
    BfrmtAnswer,
    BfrmtRequest,
    CheckAnswer,
    CheckRequest,
    CheckResult,
    ProtocolError,
    Request,
    encode_outcome,
    read_frame_any,
    recv_frame_fds,
    send_frame_fds,
    write_frame,
)
from eqmail.log import log
from eqmail.smtp.actions import HookOutcome, HookVerdict
from eqmail.spp import beforemote, checkpassword
from eqmail.spp import protocol as P
from eqmail.spp.runner import PRLIMIT, Limits, Runner
from eqmail.workers.base import SandboxSettings, WorkerContext, WorkerKind, stop_on_sigterm

NPROC_PRIVILEGED = 256  # processes of user eqmailp in all (plugins + their children)
MAX_REMOTE = 64  # remote connections served at once (the remote worker opens one per chain)
REMOTE_IDLE = 30.0  # seconds a remote connection may sit between requests
LISTENER_FRAMES = (REQUEST, CHECKPW)


def default_limits(timeout: int, privileged: bool) -> Limits:
    return Limits(cpu=max(1, math.ceil(timeout)),
                  nproc=NPROC_PRIVILEGED if privileged else None,
                  prlimit=PRLIMIT if os.access(PRLIMIT, os.X_OK) else None)


# ---- the listener socket: plugins and checkpassword (asyncio) --------------------------


class AuthTable:
    """control/authlimit's failure counts for every listener (eqmail.authlimit): one
    per worker process.  Checks of one client address run one at a time, so that the
    lock-out test, the check and the count of its failure are one step."""

    def __init__(self) -> None:
        self.limiter = AuthLimiter(AuthLimit())
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()  # requests holding or awaiting a lock

    async def check(self, req: CheckRequest, limits: Limits) -> CheckAnswer:
        if not req.client or req.limit is None:
            return await checkpassword.check(req, limits)
        key = client_key(req.client)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                if self.limiter.locked(key):
                    return CheckAnswer(CheckResult.LOCKED)
                answer = await checkpassword.check(req, limits)
                if answer.result is not CheckResult.FAILED:
                    return answer
                delay = self.limiter.failed(key, req.limit)
                return replace(answer, delay=delay, locked=self.limiter.locked(key) > 0)
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


async def _answer(runner: Runner, auth: AuthTable, kind: bytes,
                  payload: bytes) -> tuple[bytes, bytes]:
    if kind == CHECKPW:
        creq = CheckRequest.decode(payload)
        try:
            canswer = await auth.check(creq, runner.limits)
        except Exception as e:  # our bug: a temporary failure, the log says why
            log(f"warning: sandbox: checkpassword failed: {e!r}")
            canswer = CheckAnswer(CheckResult.NO_CHILD)
        return CHECKPW_ANSWER, canswer.encode()
    req = Request.decode(payload)
    try:
        outcome = await runner.run_section(req)
    except Exception as e:  # our bug: this command gets the 451, the log says why
        log(f"warning: sandbox: section {req.stage.value} failed: {e!r}")
        outcome = HookOutcome(HookVerdict.REJECT,
                              P.failure_text(req.plugins[0] if req.plugins else "", P.CRASHED))
    return ANSWER, encode_outcome(outcome)


class _Conn:
    """A listener connection: busy while a request is being answered."""

    busy = False


async def _serve_one(runner: Runner, auth: AuthTable, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, conn: _Conn, stop: asyncio.Event) -> None:
    try:
        while not stop.is_set():
            try:
                kind, payload = await read_frame_any(reader, LISTENER_FRAMES)
            except asyncio.IncompleteReadError:
                return  # the listener closed the connection
            conn.busy = True
            answer_kind, answer = await _answer(runner, auth, kind, payload)
            write_frame(writer, answer_kind, answer)
            await writer.drain()
            conn.busy = False
    except (ProtocolError, ConnectionError) as e:
        log(f"warning: sandbox: dropping a client: {e}")
    finally:
        writer.close()


# ---- the remote socket: before-remote chains (threads) ---------------------------------


class RemoteServer:
    """Accepts on the remote socket (on the event loop) and serves each connection in a
    pool thread with blocking I/O: the chain blocks, the fds need sendmsg/recvmsg."""

    def __init__(self, sock: socket.socket, limits: Limits, allowed_uids: frozenset[int] | None,
                 max_threads: int = MAX_REMOTE) -> None:
        self.sock = sock
        self.limits = limits
        self.allowed_uids = allowed_uids  # None: anyone who can connect (unprivileged)
        self.pool = ThreadPoolExecutor(max_threads, thread_name_prefix="bfrmt")
        self.slots = threading.BoundedSemaphore(max_threads)
        self.jobs: set[Future[None]] = set()
        self.idle: set[socket.socket] = set()  # waiting for a request (lock: self.lock)
        self.lock = threading.Lock()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.loop is not None
        # Over MAX_REMOTE connections the rest wait in the kernel's accept queue.
        while self.slots.acquire(blocking=False):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.slots.release()
                return
            except OSError as e:
                self.slots.release()
                log(f"warning: sandbox: accept on the remote socket: {e}")
                return
            job = self.pool.submit(self._serve, conn)
            self.jobs.add(job)
            job.add_done_callback(self._done)
        self.loop.remove_reader(self.sock.fileno())  # resumed when a slot frees

    def _done(self, job: Future[None]) -> None:
        """In the pool thread: free the slot, let the loop accept again."""
        self.slots.release()

        def resume() -> None:
            self.jobs.discard(job)
            if not self.stopping and self.loop is not None:
                self.loop.add_reader(self.sock.fileno(), self._accept)

        try:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(resume)
        except RuntimeError:
            pass  # the loop has closed: the worker is exiting

    async def stop(self, timeout: float) -> None:
        """Stop accepting; chains in progress finish (up to ``timeout``)."""
        with self.lock:
            self.stopping = True
            for conn in self.idle:  # their threads see the end of the stream and exit
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        if self.jobs:
            await asyncio.wait([asyncio.wrap_future(j) for j in self.jobs], timeout=timeout)
        self.pool.shutdown(wait=False)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                uid = peer_uid(conn)
                if self.allowed_uids is not None and uid not in self.allowed_uids:
                    log(f"warning: sandbox: remote socket: refused uid {uid}")
                    return
                conn.setblocking(True)
                conn.settimeout(REMOTE_IDLE)
                while True:
                    with self.lock:
                        if self.stopping:
                            return
                        self.idle.add(conn)
                    try:
                        got = recv_frame_fds(conn, BFRMT, 1)
                    finally:
                        with self.lock:
                            self.idle.discard(conn)
                    if got is None:
                        return
                    self._chain(conn, *got)
            except (ProtocolError, OSError) as e:
                log(f"warning: sandbox: dropping a remote client: {e}")
            except Exception as e:  # never let a thread die silently
                log(f"warning: sandbox: before-remote connection failed: {e!r}")

    def _chain(self, conn: socket.socket, payload: bytes, fds: list[int]) -> None:
        try:
            req = BfrmtRequest.decode(payload)
            if len(fds) != 1:
                raise ProtocolError("a before-remote request needs the message fd")
            try:
                result = beforemote.run_chain(req.commands, req.args, fds[0],
                                              req.timeout, self.limits)
            except Exception as e:  # our bug: defer, and say why
                log(f"warning: sandbox: before-remote chain failed: {e!r}")
                result = SANDBOX_FAILED
        finally:
            for fd in fds:
                os.close(fd)
        if isinstance(result, Outcome):
            send_frame_fds(conn, BFRMT_ANSWER, BfrmtAnswer(result).encode())
            return
        try:
            send_frame_fds(conn, BFRMT_ANSWER, BfrmtAnswer(None).encode(), [result.fileno()])
        finally:
            result.close()


# ---- the worker ----------------------------------------------------------------------


async def serve(runner: Runner, sock: socket.socket, stop: asyncio.Event,
                on_ready: Callable[[], None] | None = None,
                remote: RemoteServer | None = None, remote_drain: float = 0) -> None:
    conns: dict[asyncio.Task[None], _Conn] = {}
    auth = AuthTable()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conns[task] = conn = _Conn()
        try:
            await _serve_one(runner, auth, reader, writer, conn, stop)
        finally:
            del conns[task]

    server = await asyncio.start_unix_server(client, sock=sock, backlog=4096)
    if remote is not None:
        remote.start(asyncio.get_running_loop())
    if on_ready is not None:
        on_ready()  # only now: a SIGTERM that came before the loop ran could be lost
    await stop.wait()
    server.close()
    # Graceful stop: work in progress finishes (each bounded by its own timeout);
    # connections waiting for their next request are closed now.
    for task, conn in list(conns.items()):
        if not conn.busy:
            task.cancel()
    if remote is not None:
        await remote.stop(remote_drain)
    if conns:
        await asyncio.wait(set(conns), timeout=runner.timeout + 10)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def _allowed_remote_uids(ctx: WorkerContext[SandboxSettings]) -> frozenset[int] | None:
    if not ctx.ids.privileged:
        return None
    return frozenset({ctx.ids["remote"].uid, 0})


def run(ctx: WorkerContext[SandboxSettings]) -> int:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    sock = socket.socket(fileno=ctx.settings.socket_fd)
    sock.set_inheritable(False)  # never leak it into plugins
    remote_sock = None
    if ctx.settings.remote_socket_fd is not None:
        remote_sock = socket.socket(fileno=ctx.settings.remote_socket_fd)
        remote_sock.set_inheritable(False)
    os.chdir(ctx.instance.root)  # plugin paths and their own reads are relative to it
    timeout = ctx.controls.spptimeout
    limits = ctx.settings.limits or default_limits(timeout, ctx.ids.privileged)
    runner = Runner(ctx.instance.root, timeout, limits)
    runner.preload()
    remote = None if remote_sock is None else RemoteServer(
        remote_sock, limits, _allowed_remote_uids(ctx))
    # a chain in progress: every command may use its timeout, plus the kill and reap
    drain = max(1, len(ctx.controls.beforemote)) * (ctx.controls.timeoutremote + 5) + 5
    stop = asyncio.Event()
    stop_on_sigterm(loop, stop)  # after preload(): plugins must not inherit a blocked SIGTERM
    loop.run_until_complete(serve(runner, sock, stop, ctx.ready, remote=remote,
                                  remote_drain=drain))
    return 0


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o777)
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    """Stand-alone sandbox for tests and debugging: bind SOCKET (and REMOTE_SOCKET),
    optionally become USER (root only), serve until SIGTERM.  Prints ``ready`` when
    serving."""
    from eqmail.control import load_controls
    from eqmail.instance import Instance
    from eqmail.privsep.ids import Ids, SystemIds
    from eqmail.privsep.privileges import drop_to

    ap = argparse.ArgumentParser(prog="eqmail.workers.sandbox")
    ap.add_argument("--root", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--remote-socket", help="also serve before-remote requests here")
    ap.add_argument("--user", help="run as this user (from root)")
    ap.add_argument("--nproc", type=int, help="RLIMIT_NPROC for plugins")
    args = ap.parse_args(argv)
    inst = Instance(Path(args.root).resolve())
    controls = load_controls(inst.root)
    settings = SandboxSettings(socket_fd=_bind(args.socket).detach(), remote_socket_fd=(
        _bind(args.remote_socket).detach() if args.remote_socket else None))
    ids = SystemIds.current_user()
    if args.user:
        import pwd

        pw = pwd.getpwnam(args.user)
        drop_to(pw.pw_uid, pw.pw_gid)
        who = Ids(pw.pw_uid, pw.pw_gid, args.user)
        ids = SystemIds(True, dict.fromkeys(ids.roles, who))
    if args.nproc is not None:
        settings = replace(settings, limits=Limits(cpu=controls.spptimeout, nproc=args.nproc))
    ctx = WorkerContext(kind=WorkerKind.SANDBOX, name="plugin sandbox", instance=inst,
                        controls=controls, ids=ids, generation=0, settings=settings,
                        on_ready=lambda: print("ready", flush=True))
    return run(ctx)


if __name__ == "__main__":
    raise SystemExit(main())
