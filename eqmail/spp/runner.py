"""Running qmail-spp plugins inside the sandbox worker: one plugin, one section.

Owns: how a plugin process is started and bounded, and how eqmail's own (shipped)
Python plugins run in-process.  Runs in the plugin sandbox worker (user eqmailp: no
access to the queue, keys or the control files it does not need); never in the
listener.

External plugins keep qmail-spp's fork/exec contract, started with ``os.posix_spawn``
(never a Python fork: DESIGN §6): argv as qmail-spp builds it (the path alone, or
``/bin/sh -c <rest>``), cwd the instance root (the sandbox chdirs there once), an
environment built only from the session's (plus PATH=/usr/bin:/bin when it has none),
fd 0 /dev/null, fd 1 a pipe, fd 2 the log, no other fd (every fd eqmail opens is
close-on-exec), default signal dispositions and an empty mask, a session and process
group of its own.  rlimits (CPU seconds, address space, open files, processes, no core
files) are set by ``/usr/bin/prlimit`` with a fixed argv in front of the plugin:
posix_spawn has no rlimit attribute, and a pre-exec hook would need a fork.  A
wall-clock deadline (control/spptimeout) covers the whole run; on expiry, on more than
MAX_OUTPUT bytes of output, and after every run, the plugin's process group is killed
with SIGKILL, so children it left behind die too.

Shipped plugins (files directly in the package checkout's ``plugins/`` directory that
define ``check(env) -> str`` or ``async acheck(env) -> str``) are imported once and
called with the same environment; their returned text goes through the same parser.
Blocking ``check`` functions run in a thread pool, so a slow one (DNS) does not hold up
other sessions; ``acheck`` (tarpit's sleep) runs on the event loop.

Failures are never raised: a run returns ``(stdout, None)`` or ``(partial, reason)``
with a reason of eqmail.spp.protocol (can't execute, child crashed, timeout, ...).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.machinery
import importlib.util
import os
import re
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from eqmail.ipc.sandbox import Request
from eqmail.log import log, sanitize
from eqmail.smtp.actions import HookOutcome
from eqmail.spp import protocol as P
from eqmail.spp.config import Plugin


def _shipped_dir() -> Path:
    """Where eqmail's own plugins are: the checkout's plugins/ (an editable install, the
    embedded instance), else the copy pip installed under <prefix>/share/eqmail/plugins."""
    checkout = Path(__file__).resolve().parents[2] / "plugins"
    if (checkout / "sppkit.py").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "eqmail" / "plugins"


SHIPPED_DIR = _shipped_dir()
PRLIMIT = "/usr/bin/prlimit"
DEFAULT_PATH = "/usr/bin:/bin"
SIGDEF = (signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU, signal.SIGXFSZ)
_ENV_NAME = re.compile(r"[^=\0]+")


@dataclass(frozen=True)
class Limits:
    """rlimits of every external plugin.  ``nproc`` counts every process of the user
    (Linux), so it is only set when the sandbox runs as its own system user."""

    cpu: int = 30                   # seconds of CPU (SIGXCPU: "child crashed")
    address_space: int = 1 << 30    # bytes
    nofile: int = 64
    nproc: int | None = None
    prlimit: str | None = PRLIMIT   # None: no limits (a machine without util-linux)
    fsize: int | None = None        # bytes a file may grow to (before-remote output)

    def wrap(self, argv: list[str]) -> list[str]:
        if self.prlimit is None:
            return argv
        opts = [f"--cpu={self.cpu}", f"--as={self.address_space}",
                f"--nofile={self.nofile}", "--core=0"]
        if self.nproc is not None:
            opts.append(f"--nproc={self.nproc}")
        if self.fsize is not None:
            opts.append(f"--fsize={self.fsize}")
        return [self.prlimit, *opts, "--", *argv]


def plugin_env(session_env: Mapping[str, str]) -> dict[str, str]:
    """The plugin's whole environment: the session's variables only (tcpserver's,
    tcprules', the listener's options, SMTP*, what plugins set), never the sandbox's."""
    env = {k: v for k, v in session_env.items() if _ENV_NAME.fullmatch(k) and "\0" not in v}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def seal_fds() -> None:
    """Mark every fd above 2 close-on-exec: an fd this process inherited without the
    flag (the supervisor closes them, a test harness may not) must not reach plugins."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the directory's own fd, already closed


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Runner:
    """Runs plugins for the sandbox; one instance per worker process."""

    def __init__(self, root: Path, timeout: float, limits: Limits,
                 max_output: int = P.MAX_OUTPUT, shipped_dir: Path = SHIPPED_DIR,
                 threads: int = 32) -> None:
        self.root = root
        self.timeout = timeout
        self.limits = limits
        self.max_output = max_output
        self.shipped_dir = os.path.realpath(shipped_dir)
        self.executor = ThreadPoolExecutor(max_workers=threads,
                                           thread_name_prefix="spp")
        self._modules: dict[str, ModuleType | None] = {}
        seal_fds()

    # ---- the section ------------------------------------------------------------------
    async def run_section(self, req: Request) -> HookOutcome:
        """qmail-spp's spp(): the plugins in order, stop at a terminal command, S/U
        changes visible to the next plugin."""
        section = P.Section(req.stage, req.env)
        for line in req.plugins:
            data, failure = await self.run(Plugin(line), section.env)
            if failure is not None:
                log(f"warning: qmail-spp: {sanitize(line)}: {failure}")
            if section.add(line, data, failure):
                if failure is None and section.failure is not None:  # its output broke a rule
                    log(f"warning: qmail-spp: {sanitize(line)}: {section.failure}")
                break
        return section.outcome()

    async def run(self, plugin: Plugin, env: Mapping[str, str]) -> tuple[bytes, str | None]:
        module = self.shipped(plugin)
        if module is not None:
            return await self._inprocess(module, plugin_env(env))
        return await self._external(plugin, plugin_env(env))

    # ---- in-process (shipped) plugins --------------------------------------------------
    def shipped(self, plugin: Plugin) -> ModuleType | None:
        """The loaded module when ``plugin`` is one of eqmail's own plugins."""
        if plugin.shell:
            return None
        full = os.path.realpath(os.path.join(self.root, plugin.line))
        if os.path.dirname(full) != self.shipped_dir:
            return None
        if full not in self._modules:
            self._modules[full] = self._load(full)
        return self._modules[full]

    def preload(self) -> None:
        """Import every shipped plugin now: errors show at start, not at a session."""
        try:
            names = sorted(os.listdir(self.shipped_dir))
        except OSError:
            return
        for name in names:
            full = os.path.join(self.shipped_dir, name)
            if "." not in name and os.access(full, os.X_OK) and os.path.isfile(full):
                self._modules[full] = self._load(full)

    def _load(self, path: str) -> ModuleType | None:
        name = "eqmail_spp_plugin_" + re.sub(r"\W", "_", os.path.basename(path))
        if self.shipped_dir not in sys.path:
            sys.path.append(self.shipped_dir)  # their shared helper module, sppkit
        try:
            loader = importlib.machinery.SourceFileLoader(name, path)
            spec = importlib.util.spec_from_loader(name, loader)
            assert spec is not None
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except Exception as e:  # a broken plugin file: run it as a program instead
            log(f"warning: qmail-spp: cannot load {sanitize(path)} in-process: {e!r}")
            return None
        if not callable(getattr(module, "acheck", None) or getattr(module, "check", None)):
            return None
        return module

    async def _inprocess(self, module: ModuleType, env: dict[str, str]) -> tuple[bytes, str | None]:
        acheck: Callable[..., Any] | None = getattr(module, "acheck", None)
        try:
            if acheck is not None:
                text = await asyncio.wait_for(acheck(env), self.timeout)
            else:
                loop = asyncio.get_running_loop()
                text = await asyncio.wait_for(
                    loop.run_in_executor(self.executor, module.check, env), self.timeout)
        except TimeoutError:
            return b"", P.TIMEOUT
        except Exception:  # the plugin's bug: the command gets the 451, the log the why
            for line in traceback.format_exc().splitlines():
                log(f"warning: qmail-spp: {module.__name__}: {line}")
            return b"", P.CRASHED
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
        if len(data) > self.max_output:
            return b"", P.TOO_LARGE
        return data, None

    # ---- external programs -------------------------------------------------------------
    def _argv(self, plugin: Plugin) -> list[str] | None:
        argv = list(plugin.argv)
        if plugin.shell:
            return argv
        full = os.path.join(self.root, plugin.line)
        if not (os.path.isfile(full) and os.access(full, os.X_OK)):
            return None  # qmail-spp: execv fails, the child exits 120
        if "/" not in argv[0] and self.limits.prlimit is not None:
            argv[0] = "./" + argv[0]  # prlimit execs with execvp: keep it off $PATH
        return argv

    async def _external(self, plugin: Plugin, env: dict[str, str]) -> tuple[bytes, str | None]:
        argv = self._argv(plugin)
        if argv is None:
            return b"", P.CANT_EXECUTE
        cmd = self.limits.wrap(argv)
        r, w = os.pipe()  # both ends close-on-exec; the child's fd 1 is a dup
        try:
            pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, w, 1),
            ], setsid=True, setsigdef=SIGDEF, setsigmask=())
        except OSError as e:
            os.close(r)
            exec_errors = (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR)
            return b"", P.CANT_EXECUTE if e.errno in exec_errors else P.CANT_FORK
        finally:
            os.close(w)
        deadline = time.monotonic() + self.timeout
        exited = False
        try:
            data, failure = await self._collect(r, deadline)
            exited = failure is None and await wait_exit(pid, deadline - time.monotonic())
        finally:
            kill_group(pid)  # leftovers (and on failure the plugin itself); leader unreaped
            if not exited:
                await wait_exit(pid, 5.0)  # SIGKILL is prompt; never block the loop
        if failure is None and not exited:
            failure = P.TIMEOUT
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if failure is not None:
            return data, failure
        if status < 0:
            return data, P.CRASHED
        if status == 120:
            return data, P.CANT_EXECUTE
        return data, None

    async def _collect(self, fd: int, deadline: float) -> tuple[bytes, str | None]:
        """Read the pipe until EOF, the deadline or the output bound."""
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        buf = bytearray()
        done: asyncio.Future[str | None] = loop.create_future()

        def readable() -> None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if done.done():
                return
            if not chunk:
                done.set_result(None)
                return
            buf.extend(chunk)
            if len(buf) > self.max_output:
                done.set_result(P.TOO_LARGE)

        loop.add_reader(fd, readable)
        try:
            failure = await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            failure = P.TIMEOUT
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return bytes(buf), failure


def wait_exit_blocking(pid: int, timeout: float) -> bool:
    """:func:`wait_exit` for a thread that may block (the before-remote jobs)."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if poller.poll(max(0, int((deadline - time.monotonic()) * 1000) + 1)):
                return True
            if time.monotonic() >= deadline:
                return False
    finally:
        os.close(pidfd)


async def wait_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (left a zombie: not reaped here, so its pid and
    process group id stay reserved until the caller has killed the group)."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    done: asyncio.Future[None] = loop.create_future()
    def wake() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, wake)
    try:
        await asyncio.wait_for(done, max(0.0, timeout))
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
