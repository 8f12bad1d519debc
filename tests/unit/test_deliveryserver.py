"""The delivery-worker skeleton (eqmail.workers.deliveryserver) around a test handler:
reports for answers given at once and for deliveries finished later by a thread, the
permanent failure for a bad message id, a scanner that breaks the framing dropped while
its deliveries report to the next one, and SIGTERM waiting for running deliveries.
Each case runs the skeleton in its own interpreter, as the supervisor starts a worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from eqmail.ipc import frame, recv_frame

SERVER = r"""
import sys, threading
from pathlib import Path
from eqmail.control import load_controls
from eqmail.instance import Instance
from eqmail.ipc.delivery import Channel, Outcome, Verdict
from eqmail.privsep.ids import SystemIds
from eqmail.workers.base import LocalSettings, WorkerContext, WorkerKind
from eqmail.workers.deliveryserver import DeliveryServer

class Handler:
    role = "test delivery"
    channel = Channel.LOCAL
    bad_msgid = Outcome(Verdict.FAILURE, "Sorry, message id is not valid. (#5.3.5)")

    def __init__(self, server):
        self.server = server
        self.running = 0

    def begin(self):
        print("begun", flush=True)

    def submit(self, request):
        if request.recipient.startswith("now@"):
            return Outcome(Verdict.SUCCESS, f"at once for {request.msgid} from {request.sender}")
        self.running += 1
        delay = float(request.recipient.partition("@")[0])
        def done():
            self.running -= 1
            self.server.finish(request.slot, Outcome(Verdict.DEFERRAL, f"after {delay}"))
        threading.Timer(delay, self.server.call_from_thread, (done,)).start()
        return None

    def timeout(self):
        return 1.0

    def turn(self):
        pass

    def busy(self):
        return self.running > 0

    def close(self):
        print("closed", flush=True)

root = Path(sys.argv[1])
ctx = WorkerContext(kind=WorkerKind.LOCAL, name="local", instance=Instance(root),
                    controls=load_controls(root), ids=SystemIds.current_user(), generation=1,
                    settings=LocalSettings(socket_fd=int(sys.argv[2])), ready_fd=int(sys.argv[3]))
sys.exit(DeliveryServer(ctx, int(sys.argv[2]), Handler).serve())
"""


class Worker:
    def __init__(self, root: Path) -> None:
        (root / "control").mkdir(parents=True, exist_ok=True)
        (root / "control" / "me").write_text("test.example\n")
        self.path = str(root / "local.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(4)
        ready_r, ready_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(listener.fileno()),
                                      str(ready_w)], pass_fds=(listener.fileno(), ready_w),
                                     stdout=subprocess.PIPE, text=True)
        os.close(ready_w)
        listener.close()
        assert os.read(ready_r, 1) == b"R"
        os.close(ready_r)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        s.settimeout(10)
        return s


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path)
    yield w
    if w.proc.poll() is None:
        w.proc.kill()
    w.proc.wait(10)


def test_requests_are_answered_with_one_report_each(worker: Worker) -> None:
    s = worker.connect()
    s.sendall(frame(b"D", b"7.1\0007\0s@x.test\0now@y.test\0")
              + frame(b"D", b"7.2\0abc\0s@x.test\0now@y.test\0")
              + frame(b"D", b"7.3\0007\0s@x.test\0000.1@y.test\0"))
    assert recv_frame(s) == (b"r", b"7.1\0Kat once for 7 from s@x.test")
    assert recv_frame(s) == (b"r", b"7.2\0DSorry, message id is not valid. (#5.3.5)")
    assert recv_frame(s) == (b"r", b"7.3\0Zafter 0.1")


def test_a_scanner_that_breaks_the_framing_is_dropped_and_its_reports_wait(worker: Worker) -> None:
    first = worker.connect()
    first.sendall(frame(b"A"))
    assert recv_frame(first) == (b"e", b"")
    first.sendall(frame(b"D", b"8.1\0008\0\0000.5@y.test\0") + frame(b"D", b"8.2\0008\0\0now@y.test\0"))
    assert recv_frame(first) == (b"r", b"8.2\0Kat once for 8 from ")
    first.sendall(frame(b"r", b"8.1\0K"))
    assert first.recv(1) == b""  # dropped: a scanner does not send reports
    second = worker.connect()
    second.sendall(frame(b"A"))
    assert recv_frame(second) == (b"a", b"8.1")
    assert recv_frame(second) == (b"e", b"")
    assert recv_frame(second) == (b"r", b"8.1\0Zafter 0.5")
    second.sendall(frame(b"Q"))
    assert recv_frame(second) == (b"q", b"")


def test_sigterm_lets_running_deliveries_finish(worker: Worker) -> None:
    s = worker.connect()
    s.sendall(frame(b"D", b"9.1\0009\0\0001.0@y.test\0"))
    s.sendall(frame(b"D", b"9.2\0009\0\0now@y.test\0"))
    assert recv_frame(s) == (b"r", b"9.2\0Kat once for 9 from ")
    worker.proc.send_signal(signal.SIGTERM)
    assert recv_frame(s) == (b"r", b"9.1\0Zafter 1.0")
    assert worker.proc.wait(10) == 0
    assert worker.proc.stdout is not None and worker.proc.stdout.read() == "begun\nclosed\n"
