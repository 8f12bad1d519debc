"""The supervisor's two small protocols: sd_notify (sockets.Notifier) to a datagram
socket bound here, and the log-target message with its fd (ipc.LogTarget over a
SOCK_SEQPACKET pair, received by the logger's recv_target)."""

from __future__ import annotations

import array
import os
import socket
import time
from pathlib import Path

import pytest

from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.logtarget import LogSink, LogTarget
from eqmail.logformat import LogFormat
from eqmail.supervisor.logoutput import journal_stream
from eqmail.supervisor.sockets import Notifier
from eqmail.workers.logger import recv_target


def _bound(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(2)
    return s


def test_notifier_messages_and_environment(tmp_path: Path) -> None:
    sock = _bound(tmp_path)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000", "OTHER": "x"}
    n = Notifier(env)
    assert env == {"OTHER": "x"}  # taken out: no child inherits them
    assert n.interval == 2.0
    n.ready("up\nsecond line\x1b")
    assert sock.recv(512) == b"READY=1\nSTATUS=up/second line_"
    n.reloading("reloading")
    msg = sock.recv(512).decode()
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=") and msg.endswith("\nSTATUS=reloading")
    assert abs(int(msg.split("\n")[1].split("=")[1]) - time.monotonic_ns() // 1000) < 5_000_000
    n.set_status("reloading")  # unchanged: not sent again
    n.set_status("other")
    assert sock.recv(512) == b"STATUS=other"
    assert n.watchdog() == pytest.approx(2.0, abs=0.5)
    assert sock.recv(512) == b"WATCHDOG=1"
    assert n.watchdog() > 1.0  # not due again yet: nothing sent
    n.stopping("stopping")
    assert sock.recv(512) == b"STOPPING=1\nSTATUS=stopping"


def test_notifier_watchdog_for_another_pid_or_without_socket(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.enabled and n.interval is None
    n = Notifier({"WATCHDOG_USEC": "1000"})
    assert not n.enabled and n.interval is None
    n.ready("nothing to send to")  # no socket: no error


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    return a, b


def test_log_target_with_its_fd(tmp_path: Path) -> None:
    a, b = _pair()
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    a.sendmsg([LogTarget(LogSink.FILE, LogFormat.TAI64N).encode()],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    got = recv_target(b)
    assert got is not None
    target, rfd = got
    assert target == LogTarget(LogSink.FILE, LogFormat.TAI64N)
    os.write(rfd, b"through the passed fd")
    os.close(rfd)
    assert (tmp_path / "f").read_bytes() == b"through the passed fd"
    a.sendmsg([LogTarget(LogSink.SYSLOG, LogFormat.LOCAL).encode()])
    assert recv_target(b) == (LogTarget(LogSink.SYSLOG, LogFormat.LOCAL), -1)
    with pytest.raises(BlockingIOError):
        recv_target(b)
    a.close()
    assert recv_target(b) is None


@pytest.mark.parametrize("payload", [b"file", b"file xml", b"disk local", b"\xff \xfe", b"file local extra"])
def test_malformed_log_target_is_refused(payload: bytes) -> None:
    a, b = _pair()
    a.sendmsg([payload])
    with pytest.raises(ProtocolError):
        recv_target(b)


def test_file_target_without_fd_is_refused() -> None:
    a, b = _pair()
    a.sendmsg([b"file local"])
    with pytest.raises(ProtocolError):
        recv_target(b)


def test_journal_stream_matches_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as f:
        st = os.fstat(f.fileno())
        assert journal_stream(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not journal_stream(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal_stream(f.fileno(), {"JOURNAL_STREAM": "junk"})
        assert not journal_stream(f.fileno(), {})
