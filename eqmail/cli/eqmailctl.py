"""``eqmailctl``: set up, start, stop, inspect and reload an eqmail instance.

Thin entry point: argument parsing here, the work in importable functions.  Exit codes
follow LSB for status (0 running, 3 not running, 4 unknown) and are 0 / 1 elsewhere.
"""

from __future__ import annotations

import argparse
import enum
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eqmail import __version__
from eqmail.cli import dkim, tlsrpt
from eqmail.control import load_controls
from eqmail.errors import ControlErrors
from eqmail.instance import Instance, resolve_root
from eqmail.ipc.admin import (
    MAX_ADMIN_ANSWER,
    AdminAction,
    AdminAnswer,
    AdminRefusal,
    AdminRequest,
    QueueActivity,
    Removed,
    decode_answer,
)
from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.status import MAX_STATUS_ANSWER, StatusAnswer, StatusRequest

STOP_TIMEOUT = 120.0
RELOAD_TIMEOUT = 80.0  # under systemd's default TimeoutSec (90 s) for ExecReload


def _pid_of(inst: Instance) -> int | None:
    """The supervisor's pid when it holds the pid-file lock, else None."""
    try:
        fd = os.open(inst.pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.read(fd, 32).strip()
            return int(data) if data.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def query_scanner(inst: Instance, request: AdminRequest, timeout: float = 30.0) -> AdminAnswer | None:
    """One request to the scanner's admin socket (root only); None if unreachable or
    the answer is not one of the protocol's."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(inst.run / "scanner.sock"))
            s.sendall(request.encode())
            data = bytearray()
            while not data.endswith(b"\n") and len(data) <= MAX_ADMIN_ANSWER:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return decode_answer(bytes(data))
    except (OSError, ProtocolError):
        return None


def query_status(inst: Instance, timeout: float = 5.0) -> dict[str, Any] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(inst.status_socket))
            s.sendall(StatusRequest().encode())
            data = bytearray()
            while len(data) <= MAX_STATUS_ANSWER:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return StatusAnswer.decode(bytes(data)).as_dict()
    except (OSError, ProtocolError):
        return None


# ------------------------------------------------------------------ commands


def cmd_setup(inst: Instance, args: argparse.Namespace) -> int:
    from eqmail.setup import setup_instance

    for line in setup_instance(inst.root, me=args.me, force=args.force):
        print(line)
    return 0


def cmd_cert(inst: Instance, args: argparse.Namespace) -> int:
    """eQmail's ``make cert`` (renew), ``make cert-req`` (request), ``update_tmprsadh``
    (dh); ``install`` puts a signed certificate with the pending key in service."""
    from eqmail import certs
    from eqmail.tls import dh_prime_bits

    control = inst.control
    me = args.me or _control_me(inst)
    try:
        if args.action == "renew":
            path = certs.make_servercert(control, me, rsa_key=args.rsa, days=args.days)
            print(f"wrote {path} (self-signed for {me}, {args.days} days)")
            print(f"wrote {certs.make_dhparams(control)}")
        elif args.action == "dh":
            print(f"wrote {certs.make_dhparams(control)}")
        elif args.action == "publish":
            from eqmail.cli import publish

            domain = args.domain or (me.split(".", 1)[1] if me.count(".") >= 2 else me)
            print(publish.publish_text(control, me, domain, args.mode, args.mx, args.max_age,
                                       args.rua), end="")
            return 0
        elif args.action == "request":
            csr, key = certs.make_request(control, me, rsa_key=args.rsa)
            print(f"wrote {csr} (send it to your CA) and {key} (the new key)")
            print(f"then: eqmailctl --root {inst.root} cert install SIGNED.pem")
            return 0
        elif args.action == "install":
            if not args.file:
                print("usage: eqmailctl cert install SIGNED.pem", file=sys.stderr)
                return 1
            with open(args.file, "rb") as f:
                leaf = certs.install_signed(control, f.read(1 << 20))
            print(f"installed {control / certs.SERVERCERT} ({leaf.subject.rfc4514_string()})")
        else:  # show
            info = certs.describe(control / certs.SERVERCERT)
            print(f"subject: {info.subject}\nnames: {', '.join(info.names) or '-'}\n"
                  f"key: {info.key}\nexpires: {info.not_after:%Y-%m-%d %H:%M:%S} UTC"
                  f"{' (self-signed)' if info.self_signed else ''}")
            dh = control / certs.DHPARAMS
            if dh.exists():
                print(f"dh2048.pem: {dh_prime_bits(dh.read_bytes())} bits")
            return 0
    except (OSError, certs.CertError, ValueError) as e:
        print(f"eqmailctl cert: {e}", file=sys.stderr)
        return 1
    if _pid_of(inst) is not None:
        print("run 'eqmailctl reload' to use it (open sessions keep the old one)")
    return 0


def _control_me(inst: Instance) -> str:
    try:
        with open(inst.control / "me") as f:
            return f.readline().strip() or "localhost"
    except OSError:
        from eqmail.setup import default_me

        return default_me()


def cmd_start(inst: Instance, args: argparse.Namespace) -> int:
    from eqmail.supervisor.main import StartError, Supervisor

    try:
        load_controls(inst.root)
    except ControlErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        return 1
    if _pid_of(inst) is not None:
        print(f"eqmail: already running (pid {_pid_of(inst)})", file=sys.stderr)
        return 1
    if args.foreground:
        try:
            return Supervisor(inst.root, foreground=True).run()
        except StartError as e:
            print(f"eqmail: {e}", file=sys.stderr)
            return 1
    return _start_background(inst)


def _start_background(inst: Instance) -> int:
    from eqmail.supervisor.main import StartError, Supervisor

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        code = 1
        try:
            inst.log.mkdir(exist_ok=True)
            out = os.open(inst.log / "eqmail.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            nul = os.open(os.devnull, os.O_RDWR)
            os.dup2(nul, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            os.close(nul)
            code = Supervisor(inst.root, foreground=False, notify_fd=w).run()
        except StartError as e:
            os.write(w, f"error: {e}\n".encode())
        except BaseException as e:  # noqa: BLE001
            try:
                os.write(w, f"error: {e!r}\n".encode())
            except OSError:
                pass
        os._exit(code)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    if data.startswith(b"ok"):
        print(f"eqmail: started (pid {pid})")
        return 0
    msg = data.decode(errors="replace").strip() or "error: the supervisor exited during start-up"
    print(f"eqmail: {msg} (see {inst.log / 'eqmail.log'})", file=sys.stderr)
    return 1


def cmd_stop(inst: Instance, args: argparse.Namespace) -> int:
    pid = _pid_of(inst)
    if pid is None:
        print("eqmail: not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _pid_of(inst) is None:
            print("eqmail: stopped")
            return 0
        time.sleep(0.1)
    print(f"eqmail: still stopping after {STOP_TIMEOUT:.0f}s", file=sys.stderr)
    return 1


def cmd_status(inst: Instance, args: argparse.Namespace) -> int:
    status = query_status(inst)
    if status is None:
        from eqmail.supervisor.status import queue_counts

        pid = _pid_of(inst)
        status = {"running": False, "pid": pid or 0, "generation": 0, "workers": [], "listeners": [],
                  "queue": queue_counts(inst.queue) if inst.queue.is_dir() else {}}
        code = 4 if pid else 3
    else:
        code = 0
        scanner = query_scanner(inst, AdminRequest(AdminAction.STATUS))
        if isinstance(scanner, QueueActivity):
            status["deliveries"] = [d.as_dict() for d in scanner.deliveries]
            status["queue"].update(dict(scanner.counts))
            status["dead_destinations"] = [d.as_dict() for d in scanner.dead]
    tls_failures = tlsrpt.status_failures(inst.root)
    if tls_failures:  # issue 17: today's failed sessions under DANE / MTA-STS, per domain
        status["tls_failures"] = tls_failures
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return code


def format_status(s: dict[str, Any]) -> str:
    if not s.get("running"):
        q = s.get("queue", {})
        tls_line = tlsrpt.status_line(s.get("tls_failures") or {})
        return f"eqmail: not running; queue: {q.get('messages', 0)} messages" + (f"\n{tls_line}" if tls_line else "")
    lr = s.get("last_reload") or {}
    lines = [
        f"eqmail: running, pid {s['pid']}, up {_duration(s.get('uptime', 0))}, "
        f"generation {s['generation']}",
    ]
    if lr.get("time"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lr["time"]))
        lines.append(f"last reload: {when} {'ok' if lr.get('ok') else 'REFUSED'}")
        lines += [f"  {e}" for e in lr.get("errors", [])]
    lines.append("")
    lines.append(f"{'KIND':<12} {'PID':>7} {'UID':>6} {'GID':>6} {'STATE':<9} {'RESTARTS':>8}  TITLE")
    for w in s["workers"]:
        lines.append(f"{w['kind']:<12} {w['pid']:>7} {w['uid']:>6} {w['gid']:>6} {w['state']:<9} "
                     f"{w.get('restarts', 0):>8}  {w['title']}")
    if s["listeners"]:
        lines.append("")
        lines.append(f"{'SERVICE':<11} {'ADDRESS':<28} {'SESSIONS':>9}")
        for lst in s["listeners"]:
            addr = f"[{lst['address']}]:{lst['port']}" if ":" in lst["address"] else f"{lst['address']}:{lst['port']}"
            lines.append(f"{lst['service']:<11} {addr:<28} {lst.get('sessions', 0):>4}/{lst.get('concurrency', 0):<4}")
    if s.get("deliveries"):
        lines.append("")
        lines.append(f"{'MSG':>10} {'CHANNEL':<8} {'RUNNING':>7} {'WAITING':>7}")
        for d in s["deliveries"]:
            lines.append(f"{d['msgid']:>10} {d['channel']:<8} {d['running']:>7} {d['waiting']:>7}")
    q = s.get("queue", {})
    lines.append("")
    lines.append(f"queue: {q.get('messages', 0)} messages, {q.get('todo', 0)} not yet preprocessed, "
                 f"{q.get('local', 0)} local / {q.get('remote', 0)} remote pending, "
                 f"{q.get('bouncing', 0)} bouncing")
    for d in s.get("dead_destinations") or []:  # the scanner's per-destination back-off
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["until"]))
        state = "probing now" if d["probing"] else f"held until {until}, then one probe"
        lines.append(f"destination {d['domain']} unreachable: {d['held']} message(s) {state}")
    tls_line = tlsrpt.status_line(s.get("tls_failures") or {})
    lines += [tls_line] if tls_line else []
    return "\n".join(lines)


def _duration(sec: float) -> str:
    sec = int(sec)
    d, rem = divmod(sec, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def cmd_reload(inst: Instance, args: argparse.Namespace) -> int:
    """Ask the supervisor to reload and wait for its verdict: exit 0 only when the new
    configuration serves every new connection, 1 (with the reasons) when it refused —
    so systemd's ExecReload, and ``systemctl reload``, tell the truth."""
    pid = _pid_of(inst)
    if pid is None:
        try:
            load_controls(inst.root)
        except ControlErrors as e:
            _print_refused([str(err) for err in e.errors])
            return 1
        print("eqmail: not running", file=sys.stderr)
        return 3

    def verdict(before: dict[str, Any], st: dict[str, Any]) -> int | None:
        lr = st.get("last_reload") or {}
        if lr.get("seq", 0) > before.get("last_reload", {}).get("seq", 0):
            if not lr.get("ok"):
                _print_refused(lr.get("errors", []))
                return 1
            if lr.get("complete"):
                print(f"eqmail: reload complete, generation {st['generation']}")
                return 0
        elif st.get("stopping"):
            print("eqmail: reload ignored: eqmail is stopping", file=sys.stderr)
            return 1
        return None

    result = _signal_and_watch(inst, pid, signal.SIGHUP, RELOAD_TIMEOUT, verdict)
    if result is _Watch.GONE:
        print("eqmail: the supervisor stopped during the reload", file=sys.stderr)
    elif result is _Watch.TIMEOUT:
        print(f"eqmail: reload not complete after {RELOAD_TIMEOUT:.0f}s (see eqmailctl status)",
              file=sys.stderr)
    return result if isinstance(result, int) else 1


def _print_refused(errors: list[str]) -> None:
    for err in errors:
        print(err, file=sys.stderr)
    print("eqmail: reload refused; the running configuration is unchanged", file=sys.stderr)


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except PermissionError:
        print("eqmail: not allowed to signal the supervisor (run as root)", file=sys.stderr)
        return False
    except ProcessLookupError:
        print("eqmail: not running", file=sys.stderr)
        return False
    return True


class _Watch(enum.Enum):
    GONE = "the supervisor exited"
    TIMEOUT = "no verdict in time"


def _signal_and_watch(inst: Instance, pid: int, sig: signal.Signals, timeout: float,
                      verdict: Callable[[dict[str, Any], dict[str, Any]], int | None]
                      ) -> int | _Watch:
    """Send ``sig`` to the supervisor and poll its status report until ``verdict(before,
    now)`` gives an exit code (it prints why); 1 when it could not be asked at all."""
    before = _wait_status(inst, pid, time.monotonic() + 30)
    if before is None:
        print("eqmail: the supervisor does not answer on its status socket", file=sys.stderr)
        return 1
    if not _signal(pid, sig):
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _wait_status(inst, pid, deadline)
        if st is None:
            return _Watch.GONE
        code = verdict(before, st)
        if code is not None:
            return code
        time.sleep(0.05)
    return _Watch.TIMEOUT


def _wait_status(inst: Instance, pid: int, deadline: float) -> dict[str, Any] | None:
    """The status report, retried while the supervisor runs but is busy or still
    binding its status socket; None once it has exited."""
    while True:
        st = query_status(inst)
        if st is not None:
            return st
        if _pid_of(inst) != pid or time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def cmd_reopen_logs(inst: Instance, args: argparse.Namespace) -> int:
    """SIGUSR1 to the supervisor (logrotate's postrotate), then wait until the logger
    writes to the reopened file."""
    pid = _pid_of(inst)
    if pid is None:
        print("eqmail: not running", file=sys.stderr)
        return 3

    def reopened(before: dict[str, Any], st: dict[str, Any]) -> int | None:
        out = st.get("log", {})
        if out.get("reopens", 0) <= before.get("log", {}).get("reopens", 0):
            return None
        if out.get("error"):
            print(f"eqmail: {out['error']}", file=sys.stderr)
            return 1
        return 0

    result = _signal_and_watch(inst, pid, signal.SIGUSR1, 30.0, reopened)
    if isinstance(result, int):
        return result
    print("eqmail: the log was not reopened", file=sys.stderr)
    return 1


def cmd_check(inst: Instance, args: argparse.Namespace) -> int:
    """qmail-showctl (eqmail.cli.check); exit 1 when control/ does not load."""
    from eqmail.cli.check import check_report, format_check

    report = check_report(inst)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_check(report), end="")
    return 0 if report["ok"] else 1


def cmd_queue(inst: Instance, args: argparse.Namespace) -> int:
    if args.action in ("stat", "list", "show"):
        return _queue_read(inst, args)
    if args.json:
        print(f"eqmailctl queue {args.action}: --json is for stat, list and show", file=sys.stderr)
        return 1
    if args.action in ("delete", "bounce"):
        if args.id is None or args.id < 0:
            print(f"usage: eqmailctl queue {args.action} ID", file=sys.stderr)
            return 1
        answer = query_scanner(inst, AdminRequest(AdminAction(args.action), args.id))
        if answer is None:
            print("eqmail: not running (or not root): the scanner must do this", file=sys.stderr)
            return 3
        if not isinstance(answer, Removed):
            error = answer.error if isinstance(answer, AdminRefusal) else "unexpected answer"
            print(f"eqmail: {error}", file=sys.stderr)
            return 1
        what = "bounced" if args.action == "bounce" else "deleted"
        print(f"eqmail: msg {args.id}: {answer.removed} recipient(s) {what}")
    elif args.action == "flush":
        pid = _pid_of(inst)
        tcpto = inst.queue / "lock" / "tcpto"
        if tcpto.exists():
            with open(tcpto, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                f.write(b"\0" * size)
        if pid is None:
            print("eqmail: not running", file=sys.stderr)
            return 3
        os.kill(pid, signal.SIGALRM)
        print("eqmail: queue flush requested")
    return 0


def _queue_read(inst: Instance, args: argparse.Namespace) -> int:
    """stat / list / show, as text (qmail-qstat, qmail-qread) or JSON (eqmailctl(8))."""
    from eqmail.queue import inspect

    try:
        if args.action == "stat":
            messages, todo = inspect.qstat(inst.root)
            out = (json.dumps({"messages": messages, "todo": todo}) + "\n" if args.json
                   else inspect.format_qstat(messages, todo))
        elif args.action == "list":
            if args.json:
                out = json.dumps({"messages": [m.as_json() for m in inspect.messages(inst.root)]},
                                 indent=2) + "\n"
            else:
                out = inspect.qread(inst.root)
        else:
            if args.id is None:
                print("usage: eqmailctl queue show ID", file=sys.stderr)
                return 1
            out = (json.dumps(inspect.show_json(inst.root, args.id, lambda d: tlsrpt.queue_json(inst.root, d)),
                              indent=2) + "\n" if args.json
                   else inspect.show(inst.root, args.id, lambda d: tlsrpt.queue_lines(inst.root, d)))
    except inspect.NoSuchMessage as e:
        print(f"eqmailctl queue show: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"eqmailctl queue {args.action}: cannot read {inst.queue}: {e.strerror}", file=sys.stderr)
        return 1
    print(out, end="")
    return 0


class ImportProgress:
    """import-qmail's queue progress on stderr: the count at the start, at every tenth
    of the queue and at least every ``interval`` seconds; on a terminal one line
    rewritten in place."""

    def __init__(self, stream: Any = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_time = 0.0
        self.last_step = -1

    def __call__(self, done: int, total: int) -> None:
        step = done * 10 // total if total else 10
        now = time.monotonic()
        if step == self.last_step and now - self.last_time < self.interval and done < total:
            return
        self.last_step, self.last_time = step, now
        pct = done * 100 // total if total else 100
        line = f"import-qmail: queue {done}/{total} messages ({pct}%)"
        end = "\n" if not self.tty or done >= total else ""
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def cmd_import_qmail(inst: Instance, args: argparse.Namespace) -> int:
    """Take over a stopped qmail installation (eqmail.migrate); lists what could not be
    carried over.  Exit 1, with nothing changed, when it is unsafe or would not load.
    ``--dry-run`` says what would be imported and changes nothing."""
    from eqmail.migrate import ImportRefused, import_qmail

    try:
        report = import_qmail(Path(args.qmailhome), inst.root, force=args.force,
                              dry_run=args.dry_run, progress=ImportProgress())
    except ImportRefused as e:
        print(f"eqmailctl import-qmail: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqmailctl", description="control an eqmail instance",
                                epilog="See eqmailctl(8) and eqmail-control(5).")
    p.add_argument("--root", help="instance root (default: $EQMAIL_ROOT, /var/eqmail, or this checkout)")
    p.add_argument("--version", action="version", version=f"eqmailctl (eqmail) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("setup", help="create control/, queue/, users/, alias/ (config-fast)")
    s.add_argument("--me", help="this host's name (control/me)")
    s.add_argument("--force", action="store_true", help="overwrite existing control files")
    s = sub.add_parser("start", help="start the supervisor")
    s.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stdout")
    sub.add_parser("stop", help="stop gracefully")
    s = sub.add_parser("status", help="show status (LSB exit codes)")
    s.add_argument("--json", action="store_true", help="print the status as one JSON object")
    sub.add_parser("reload", help="reload control/; returns when the reload is complete or refused")
    sub.add_parser("reopen-logs", help="reopen the log file (after logrotate has moved it)")
    s = sub.add_parser("check", help="show every control value and its source (qmail-showctl)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object (eqmailctl(8))")
    s = sub.add_parser("cert", help="server certificate: renew, request, install, show, dh, publish")
    s.add_argument("action", choices=["renew", "request", "install", "show", "dh", "publish"])
    s.add_argument("file", nargs="?", help="install: the signed certificate (PEM, chain after it)")
    s.add_argument("--me", help="the certificate's name (default: control/me)")
    s.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    s.add_argument("--days", type=int, default=366, help="renew: validity (default 366)")
    s.add_argument("--domain", help="publish: the mail domain (default: control/me's parent)")
    s.add_argument("--mode", choices=["enforce", "testing", "none"], default="testing",
                   help="publish: the MTA-STS mode (default testing: start there)")
    s.add_argument("--mx", action="append", default=[],
                   help="publish: an MX name for the MTA-STS policy (repeat; default control/me)")
    s.add_argument("--max-age", type=int, default=604800,
                   help="publish: the MTA-STS max_age in seconds (default one week)")
    s.add_argument("--rua", default="", help="publish: where TLS-RPT reports go (default tlsrpt@DOMAIN)")
    s = sub.add_parser("import-qmail", help="take over a stopped qmail's control files, users, aliases and queue")
    s.add_argument("qmailhome", help="the qmail installation, e.g. /var/qmail")
    s.add_argument("--force", action="store_true", help="replace control files eqmail already has")
    s.add_argument("--dry-run", action="store_true", help="say what would be imported; change nothing")
    s = sub.add_parser("queue", help="queue tools: stat, list, show ID, flush, delete ID, bounce ID")
    s.add_argument("action", choices=["stat", "list", "show", "flush", "delete", "bounce"])
    s.add_argument("id", nargs="?", type=int, help="show, delete, bounce: the message id")
    s.add_argument("--json", action="store_true", help="stat, list, show: JSON (eqmailctl(8))")
    dkim.add_parser(sub)
    tlsrpt.add_parser(sub)
    return p


COMMANDS = {
    "setup": cmd_setup, "start": cmd_start, "stop": cmd_stop, "status": cmd_status,
    "import-qmail": cmd_import_qmail,
    "reload": cmd_reload, "reopen-logs": cmd_reopen_logs, "check": cmd_check, "queue": cmd_queue,
    "cert": cmd_cert, "dkim": dkim.cmd_dkim, "tlsrpt": tlsrpt.cmd_tlsrpt,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inst = Instance(resolve_root(args.root))
    return COMMANDS[args.command](inst, args)


if __name__ == "__main__":
    sys.exit(main())
