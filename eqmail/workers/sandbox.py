"""The plugin sandbox worker: qmail-spp's fork/exec, away from the listener.

Owns: run/sandbox.sock's server side (bound by the supervisor, given as
``ctx.extra["socket_fd"]``) and every qmail-spp plugin run (eqmail.spp.runner).
Runs as eqmailp (role "plugin"): no access to the queue, the TLS keys or control files
other than world-readable ones; its cwd is the instance root, as qmail-smtpd's is.

Inputs: ``Q`` requests from listeners (eqmail.spp.wire): one section's plugin lines
and the session's environment.  Outputs: one ``A`` answer each, a HookOutcome.
Concurrency: one asyncio task per connection, so a slow plugin delays only its own
session; the listener keeps several connections open.  Optional ``ctx.extra``:
``limits`` (eqmail.spp.runner.Limits) to override the default rlimits.

Failure modes: a peer that breaks the framing is disconnected (logged); a plugin that
fails gets its 451 answer (eqmail.spp.protocol); an unexpected exception while serving
a request is logged and answered with the 451 failure for the section's first plugin.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
from pathlib import Path

from eqmail.log import log
from eqmail.smtp.actions import HookOutcome, HookVerdict
from eqmail.spp import protocol as P
from eqmail.spp.runner import PRLIMIT, Limits, Runner
from eqmail.spp.wire import (
    ANSWER,
    REQUEST,
    ProtocolError,
    Request,
    encode_outcome,
    read_frame,
    write_frame,
)
from eqmail.workers.base import WorkerContext

NPROC_PRIVILEGED = 256  # processes of user eqmailp in all (plugins + their children)


def default_limits(timeout: int, privileged: bool) -> Limits:
    return Limits(cpu=max(1, math.ceil(timeout)),
                  nproc=NPROC_PRIVILEGED if privileged else None,
                  prlimit=PRLIMIT if os.access(PRLIMIT, os.X_OK) else None)


async def _serve_one(runner: Runner, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                payload = await read_frame(reader, REQUEST)
            except asyncio.IncompleteReadError:
                return  # the listener closed the connection
            req = Request.decode(payload)
            try:
                outcome = await runner.run_section(req)
            except Exception as e:  # our bug: this command gets the 451, the log says why
                log(f"warning: sandbox: section {req.stage.value} failed: {e!r}")
                outcome = HookOutcome(HookVerdict.REJECT,
                                      P.failure_text(req.plugins[0] if req.plugins else "",
                                                     P.CRASHED))
            write_frame(writer, ANSWER, encode_outcome(outcome))
            await writer.drain()
    except (ProtocolError, ConnectionError) as e:
        log(f"warning: sandbox: dropping a client: {e}")
    finally:
        writer.close()


async def serve(runner: Runner, sock: socket.socket, stop: asyncio.Event,
                ready: asyncio.Event | None = None) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await _serve_one(runner, reader, writer)
        finally:
            tasks.discard(task)

    server = await asyncio.start_unix_server(client, sock=sock)
    if ready is not None:
        ready.set()
    await stop.wait()
    server.close()
    # Graceful stop: sections in progress finish (each bounded by spptimeout).
    if tasks:
        await asyncio.wait(set(tasks), timeout=runner.timeout + 10)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def run(ctx: WorkerContext) -> int:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    sock = socket.socket(fileno=ctx.extra["socket_fd"])
    sock.set_inheritable(False)  # never leak it into plugins
    os.chdir(ctx.instance.root)  # plugin paths and their own reads are relative to it
    timeout = ctx.controls.spptimeout
    limits = ctx.extra.get("limits") or default_limits(timeout, ctx.ids.privileged)
    runner = Runner(ctx.instance.root, timeout, limits)
    runner.preload()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    ctx.ready()
    loop.run_until_complete(serve(runner, sock, stop))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone sandbox for tests and debugging: bind SOCKET, optionally become
    USER (root only), serve until SIGTERM.  Prints ``ready`` when serving."""
    from eqmail.control import load_controls
    from eqmail.instance import Instance
    from eqmail.supervisor.ids import Ids, SystemIds
    from eqmail.supervisor.privileges import drop_to

    ap = argparse.ArgumentParser(prog="eqmail.workers.sandbox")
    ap.add_argument("--root", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--user", help="run as this user (from root)")
    ap.add_argument("--nproc", type=int, help="RLIMIT_NPROC for plugins")
    args = ap.parse_args(argv)
    inst = Instance(Path(args.root).resolve())
    controls = load_controls(inst.root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(args.socket)
    os.chmod(args.socket, 0o777)
    sock.listen(128)
    ids = SystemIds.current_user()
    if args.user:
        import pwd

        pw = pwd.getpwnam(args.user)
        drop_to(pw.pw_uid, pw.pw_gid)
        who = Ids(pw.pw_uid, pw.pw_gid, args.user)
        ids = SystemIds(True, dict.fromkeys(ids.roles, who))
    extra: dict[str, object] = {"socket_fd": sock.detach()}
    if args.nproc is not None:
        extra["limits"] = Limits(cpu=controls.spptimeout, nproc=args.nproc)
    ctx = WorkerContext(kind="sandbox", name="plugin sandbox", instance=inst,
                        controls=controls, ids=ids, generation=0, extra=extra,
                        on_ready=lambda: print("ready", flush=True))
    return run(ctx)


if __name__ == "__main__":
    raise SystemExit(main())
