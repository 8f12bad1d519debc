"""Test helpers for qmail-spp: a sandbox worker in a subprocess, and SMTP sessions
driven through the real sandbox exactly as the listener drives them.

:class:`Sandbox` starts ``python -m eqmail.workers.sandbox`` (the worker's own entry
point) on a Unix socket, optionally as another user (root only), and waits for its
``ready`` line.  :func:`converse` runs one pure :class:`eqmail.smtp.session.Session`
whose RunHook actions go to :func:`eqmail.spp.client.run_hook` — the listener's wiring
in miniature — and returns the transcript the client would have seen.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from eqmail.smtp import actions as A
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import Session, SessionConfig
from eqmail.spp.client import run_hook
from eqmail.spp.config import PluginTableCache

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def make_root(plugins: str, controls: dict[str, str] | None = None) -> Path:
    """An instance root (world-traversable, under /var/tmp) with control/smtpplugins."""
    root = Path(tempfile.mkdtemp(prefix="eqm-spp-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    for d in ("control", "users", "queue", "spp"):
        (root / d).mkdir()
    (root / "control" / "me").write_text("mx.test.example\n")
    (root / "control" / "smtpplugins").write_text(plugins)
    for name, text in (controls or {}).items():
        path = root / name if "/" in name else root / "control" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def script(root: Path, name: str, body: str) -> str:
    """An executable plugin file in root; returns its smtpplugins line."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    os.chmod(path, 0o755)
    return name


def ensure_user(name: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


@dataclass
class Sandbox:
    root: Path
    user: str | None = None
    nproc: int | None = None
    remote: bool = False  # also serve run/sandbox-remote.sock (before-remote hooks)
    sock: str = ""
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    def start(self) -> Sandbox:
        self.sock = str(self.root / "sandbox.sock")
        cmd = [sys.executable, "-m", "eqmail.workers.sandbox", "--root", str(self.root),
               "--socket", self.sock]
        if self.remote:  # where eqmail.spp.bfrmtclient looks for it
            (self.root / "run").mkdir(exist_ok=True)
            cmd += ["--remote-socket", str(self.root / "run" / "sandbox-remote.sock")]
        if self.user:
            cmd += ["--user", self.user]
        if self.nproc is not None:
            cmd += ["--nproc", str(self.nproc)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, cwd=str(self.root))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"sandbox did not start: {line!r} {self.proc.stderr.read()}")
        return self

    def stop(self) -> str:
        """Stop it (SIGTERM to its pid, then SIGKILL) and return its log (stderr)."""
        if self.proc is None:
            return ""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.proc = None
        return err

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def session_config(**kw: object) -> SessionConfig:
    base: dict[str, object] = dict(
        greeting="mx.test.example", local_host="mx.test.example", databytes=0,
        rcpthosts=RcptHosts.from_lines(["mx.test.example", "example.org"]),
        plugins_enabled=True)
    base.update(kw)
    return SessionConfig(**base)  # type: ignore[arg-type]


@dataclass
class Transcript:
    replies: bytes = b""
    headers: list[bytes] = field(default_factory=list)  # BeginMessage.header_prefix
    closed: bool = False
    session: Session | None = None

    @property
    def text(self) -> str:
        return self.replies.decode("utf-8", "replace")


async def converse(sandbox: Sandbox, commands: list[bytes], env: dict[str, str] | None = None,
                   cfg: SessionConfig | None = None, plugin_timeout: float = 30) -> Transcript:
    """Run the session; each command is sent once the previous replies are out."""
    env = {"TCPREMOTEIP": "192.0.2.10", "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": "25",
           "TCPREMOTEPORT": "40000", "TCPLOCALHOST": "mx.test.example", "PROTO": "TCP",
           **(env or {})}
    table = PluginTableCache(sandbox.root).for_session(env)
    enabled = table is not None and not table.empty
    session = Session(cfg or session_config(plugins_enabled=enabled), env, time.time)
    out = Transcript(session=session)

    async def perform(actions: list[A.Action]) -> None:
        pending = list(actions)
        while pending:
            act = pending.pop(0)
            more: list[A.Action] = []
            if isinstance(act, A.Send):
                out.replies += act.data
            elif isinstance(act, A.Close):
                out.closed = True
            elif isinstance(act, A.BeginMessage):
                out.headers.append(act.header_prefix)
            elif isinstance(act, A.EndMessage):
                more = session.queue_result(A.QueueOutcome(A.QueueStatus.ACCEPTED, qp=1))
            elif isinstance(act, A.RunHook):
                assert table is not None
                outcome = await run_hook(sandbox.sock, act.stage, table.for_stage(act.stage),
                                         session.env, plugin_timeout=plugin_timeout)
                more = session.hook_result(outcome)
            pending = more + pending

    await perform(session.start())
    for cmd in commands:
        if out.closed:
            break
        await perform(session.feed(cmd))
    return out
