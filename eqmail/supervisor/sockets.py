"""Sockets the supervisor binds as root, and its sd_notify messages to systemd.

Owns: binding every listening socket before any worker starts — the TCP listeners
(tcpserver's job) and the Unix sockets in run/ — so that a worker never needs write
access to run/ or a privileged port, and a restarted worker serves the same socket.
Runs as root, in the supervisor only.

Inputs: a ``ListenerSpec`` or a path with its mode and owner.  Outputs: a listening,
inheritable socket (the worker receives its fd through fork).  Failure modes: binding
raises ``OSError`` to the caller (start-up fails; a reload logs and skips that
listener).  ``bound_port`` and ``sd_notify`` never raise.

sd_notify (``Notifier``): READY=1 once every worker is ready, RELOADING=1 with
MONOTONIC_USEC= when a reload starts and READY=1 when it is complete or refused,
STOPPING=1 at stop, STATUS= a one-line summary, and WATCHDOG=1 every half of
WATCHDOG_USEC while the supervisor's loop turns (only when WATCHDOG_PID, if set, is
this process, as sd_watchdog_enabled(3) says).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from eqmail.control import ListenerSpec


def bind_unix(path: Any, mode: int, owner: tuple[int, int] | None) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def bind_listener(spec: ListenerSpec) -> socket.socket:
    """Bind one listening socket (tcpserver's job).  v6 sockets are IPV6_V6ONLY so v4
    and v6 are separate listeners."""
    family = socket.AF_INET6 if spec.family_v6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((spec.address, spec.port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def bound_port(sock: socket.socket | None) -> int:
    """The port ``sock`` is bound to (the real one when spec.port was 0); 0 if none."""
    if sock is None:
        return 0
    try:
        return int(sock.getsockname()[1])
    except OSError:
        return 0


def sd_notify(msg: bytes, addr: str | None = None) -> None:
    """Send ``msg`` to systemd's socket (``addr``, else $NOTIFY_SOCKET); best effort."""
    addr = addr if addr is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(msg, addr)
    except OSError:
        pass


def _status(text: str) -> str:
    """One STATUS= assignment: a single line whatever the text holds."""
    from eqmail.log import sanitize

    return "STATUS=" + sanitize(text)[:200]


class Notifier:
    """The supervisor's messages to systemd; does nothing without NOTIFY_SOCKET."""

    def __init__(self, env: dict[str, str] | os._Environ[str] = os.environ) -> None:
        # taken out of the environment (sd_notify's unset_environment): no worker,
        # plugin or delivery program needs them
        self.addr = env.pop("NOTIFY_SOCKET", "")
        self.enabled = bool(self.addr)
        self.interval: float | None = None
        usec, pid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        if self.enabled and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval = int(usec) / 2e6
        self.next_ping = time.monotonic()
        self.status = ""

    def send(self, *assignments: str) -> None:
        if self.enabled:
            sd_notify("\n".join(assignments).encode("utf-8", "replace"), self.addr)

    def reloading(self, status: str) -> None:
        self.status = status
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", _status(status))

    def ready(self, status: str) -> None:
        self.status = status
        self.send("READY=1", _status(status))

    def stopping(self, status: str) -> None:
        self.status = status
        self.send("STOPPING=1", _status(status))

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.send(_status(status))

    def watchdog(self) -> float:
        """Ping when due; the seconds until the next ping is due (or a long time)."""
        if self.interval is None:
            return 3600.0
        now = time.monotonic()
        if now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.interval
        return self.next_ping - now
