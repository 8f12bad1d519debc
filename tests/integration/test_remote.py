"""The remote delivery worker, driven through its socket with the scanner's D/r frames.

Real DNS (tests/dnsserver.py) and real SMTP receivers (tests/smtpsink.py) on their own
network: two network namespaces made by the test ("client", where the worker runs, and
"peer", where the receivers listen), joined by a veth pair.  The worker's own addresses
are 127.0.0.1, ::1, 10.99.0.1 and fd99::1; receivers are at 10.99.0.2-9 and fd99::2-9,
port 25, so qmail's "am I an MX" rule sees them as other hosts.  The smarthost test uses
``[::1]:port`` inside the client namespace (a route skips that rule).  Before-remote
hooks run where production runs them: in a sandbox worker (its own entry point, as a
subprocess) serving the instance's run/sandbox-remote.sock.  Needs root (namespaces);
nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
from dnsserver import DnsServer
from smtpsink import Script, SmtpSink, mint
from spp_harness import Sandbox

from eqmail.ipc import frame, recv_frame
from eqmail.ipc.delivery import SITE_MARK, DeliveryReport, Outcome, Site, Verdict
from eqmail.textio import encode

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(),
                                reason="needs root and unshare for network namespaces")

S, Z, F = Verdict.SUCCESS, Verdict.DEFERRAL, Verdict.FAILURE
WIRE_LETTER = {S: b"K", Z: b"Z", F: b"D"}  # qmail-rspawn's report letters, on the wire
PY = sys.executable
BOOT = """
import sys
from pathlib import Path
from eqmail.control import load_controls
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds
from eqmail.workers.base import RemoteSettings, WorkerContext, WorkerKind
from eqmail.workers import remote
root = Path(sys.argv[1])
ctx = WorkerContext(kind=WorkerKind.REMOTE, name="remote", instance=Instance(root),
                    controls=load_controls(root), ids=SystemIds.current_user(), generation=1,
                    ready_fd=int(sys.argv[3]), settings=RemoteSettings(int(sys.argv[2])))
sys.exit(remote.run(ctx))
"""

ZONE = {
    "v6.test": {"MX": [(10, "mx.v6.test")]},
    "mx.v6.test": {"AAAA": ["fd99::2"], "A": ["10.99.0.2"]},
    "fallback.test": {"MX": [(10, "mx.fallback.test")]},
    "mx.fallback.test": {"AAAA": ["fd99::3"], "A": ["10.99.0.3"]},  # nobody on fd99::3
    "pref.test": {"MX": [(20, "b.pref.test"), (10, "a.pref.test")]},
    "a.pref.test": {"A": ["10.99.0.4"]},
    "b.pref.test": {"A": ["10.99.0.5"]},
    "tls.test": {"MX": [(10, "mx.tls.test")]},
    "mx.tls.test": {"A": ["10.99.0.6"]},
    "plain.test": {"MX": [(10, "mx.plain.test")]},
    "mx.plain.test": {"A": ["10.99.0.7"]},
}


# re-exported for the test modules that build on this one's worker (test_dane_live.py)
in_netns, _sh = netns.in_netns, netns.sh


@dataclass
class Net:
    client: int
    peer: int
    dns: DnsServer


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    peer_cmds: list[str] = []
    for i in range(2, 10):
        peer_cmds += [f"ip addr add 10.99.0.{i}/24 dev v1", f"ip -6 addr add fd99::{i}/64 dev v1 nodad"]
    with netns.pair(["ip addr add 10.99.0.1/24 dev v0", "ip -6 addr add fd99::1/64 dev v0 nodad"],
                    peer_cmds, 600) as (client, peer):
        dns = DnsServer(ZONE, host="10.99.0.9")
        with in_netns(peer):
            dns.start()
        yield Net(client, peer, dns)
        dns.stop()


@dataclass
class Worker:
    root: Path
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    sandbox: Sandbox
    slot: int = 0

    def deliver(self, msgid: int, sender: str, recipients: list[str], wait: float = 20,
                separately: bool = False) -> list[Outcome]:
        """One D frame per recipient (one write, or one write each as the scanner does);
        the reported outcomes in recipient order, each checked to be on the wire as
        qmail's letter + text (after the back-off's site mark when there is one)."""
        slots = {}
        data = b""
        for rcpt in recipients:
            self.slot += 1
            slots[str(self.slot).encode()] = rcpt
            data += frame(b"D", f"{self.slot}\0{msgid}\0{sender}\0{rcpt}\0".encode())
            if separately:
                self.sock.sendall(data)
                data = b""
        self.sock.sendall(data)
        self.sock.settimeout(wait)
        got: dict[str, Outcome] = {}
        while len(got) < len(recipients):
            kind, payload = recv_frame(self.sock)
            assert kind == b"r"
            report = DeliveryReport.decode(payload)
            slot = report.slot
            assert slot in slots and slots[slot] not in got, "one report per request"
            site = (b"" if report.outcome.site is Site.UNKNOWN
                    else SITE_MARK + report.outcome.site.value.encode() + b"\0")
            assert payload == slot + b"\0" + site + WIRE_LETTER[report.verdict] + encode(report.text)
            got[slots[slot]] = report.outcome
        return [got[r] for r in recipients]


@pytest.fixture
def start_worker(net: Net, tmp_path: Path) -> Iterator:
    workers: list[Worker] = []

    def start(controls: dict[str, str | bytes] | None = None) -> Worker:
        root = tmp_path / f"inst{len(workers)}"
        for d in ("control", "queue/lock", *(f"queue/mess/{i}" for i in range(23))):
            (root / d).mkdir(parents=True, exist_ok=True)
        files: dict[str, str | bytes] = {
            "me": "client.test", "dnsservers": f"10.99.0.9:{net.dns.port}",
            "timeoutconnect": "2", "timeoutremote": "3", "concurrencyremote": "4"}
        files.update(controls or {})
        for name, text in files.items():
            path = root / "control" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        sandbox = Sandbox(root, remote=True).start()  # the before-remote hooks run there
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(root / "remote.sock"))
        listener.listen(4)
        ready_r, ready_w = os.pipe()
        proc = subprocess.Popen(
            ["nsenter", f"--net=/proc/{net.client}/ns/net", PY, "-c", BOOT, str(root),
             str(listener.fileno()), str(ready_w)], pass_fds=(listener.fileno(), ready_w))
        os.close(ready_w)
        listener.close()
        assert os.read(ready_r, 1) == b"R", "worker did not become ready"
        os.close(ready_r)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(root / "remote.sock"))
        w = Worker(root, proc, sock, sandbox)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.sock.close()
        w.proc.terminate()
        w.proc.wait(10)
        log = w.sandbox.stop()
        assert "Traceback" not in log, log


@pytest.fixture
def sinks(net: Net) -> Iterator:
    made: list[SmtpSink] = []

    def make(addr: str, script: Script | None = None, cert: tuple[Path, Path] | None = None,
             port: int = 25, ns: str = "peer") -> SmtpSink:
        sink = SmtpSink(script, *(cert or (None, None)))
        with in_netns(net.peer if ns == "peer" else net.client):
            sink.port = sink.listen(addr, port)  # type: ignore[attr-defined]
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.stop()


MESSAGE = b"From: s@client.test\nSubject: test\n\n.dot line\nbody\n"


def write_message(w: Worker, msgid: int = 4711, body: bytes = MESSAGE) -> int:
    (w.root / "queue" / "mess" / str(msgid % 23) / str(msgid)).write_bytes(body)
    return msgid


def test_ipv6_used_when_an_aaaa_exists(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    v6, v4 = sinks("fd99::2"), sinks("10.99.0.2")
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@v6.test"])
    assert report == Outcome(S, "fd99::2 accepted message.\nRemote host said: 250 ok 1234 qp 5\n")
    (tr,) = v6.transactions
    assert tr.peer == "fd99::1" and tr.rcpts == ["u@v6.test"] and tr.helo == "client.test"
    assert tr.data == b"From: s@client.test\r\nSubject: test\r\n\r\n..dot line\r\nbody\r\n"
    assert v4.transactions == []


def test_refused_ipv6_falls_back_to_ipv4_and_is_noted_in_tcpto(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    v4 = sinks("10.99.0.3")
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@fallback.test"])
    assert report.verdict is S and report.text.startswith("10.99.0.3 accepted message.\n")
    assert len(v4.transactions) == 1
    from eqmail.queue.tcpto import Tcpto

    assert [(ip, n) for ip, n, _ in Tcpto(w.root / "queue/lock/tcpto").entries()] == [("fd99::3", 1)]


def test_mx_preference_order(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    a, b = sinks("10.99.0.4"), sinks("10.99.0.5")
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@pref.test"])
    assert report.verdict is S and report.text.startswith("10.99.0.4 accepted")
    assert len(a.transactions) == 1 and b.transactions == []
    a.stop()  # the best MX goes away: the next preference gets it
    w.proc.terminate()  # (a fresh worker: the first one would reuse its open connection)
    w = start_worker()
    (report,) = w.deliver(write_message(w, 4712), "s@client.test", ["u@pref.test"])
    assert report.verdict is S and report.text.startswith("10.99.0.5 accepted")
    assert len(b.transactions) == 1


def test_smarthost_route_ipv6_literal_with_auth_login(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    relay = sinks("::1", Script(auth=("relayuser", "pass word")), port=0, ns="client")
    w = start_worker({"smtproutes": f":[::1]:{relay.port} relayuser pass word\n"})  # type: ignore[attr-defined]
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@anywhere.example"])
    assert report.verdict is S and report.text.startswith("::1 accepted message.\n")
    (tr,) = relay.transactions
    assert tr.auth_user == "relayuser"
    size = len(MESSAGE.replace(b"\n", b"\r\n"))  # the server offers SIZE: RFC 1870's size
    assert tr.mail == f"FROM:<s@client.test> AUTH=<s@client.test> SIZE={size}"


def test_starttls_used_when_offered(start_worker, sinks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, _ = mint(tmp_path / "certs", ["mx.tls.test"])
    sink = sinks("10.99.0.6", Script(starttls=True), (cert, key))
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@tls.test"])
    assert report.verdict is S and report.text.startswith("10.99.0.6 accepted")
    assert sink.transactions[0].tls


def test_mandatory_tls_refuses_a_wrong_certificate(start_worker, sinks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, ca = mint(tmp_path / "certs", ["not-the-mx.test"])
    sink = sinks("10.99.0.6", Script(starttls=True), (cert, key))
    w = start_worker({"tlshosts/mx.tls.test.pem": ca.read_bytes()})
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@tls.test"])
    assert report == Outcome(Z, "TLS unable to verify server mx.tls.test: received certificate for "
                                "not-the-mx.test; connected to 10.99.0.6.\n")
    assert sink.transactions == []


def test_4xx_is_temporary_and_5xx_permanent_with_the_remote_text(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    def rcpt(addr: str) -> str:
        return {"later": "451 4.7.1 greylisted, come back", "never": "550 5.1.1 no such user"}.get(
            addr.split("@")[0], "250 ok")

    sinks("10.99.0.7", Script(rcpt=rcpt))
    w = start_worker()
    later, never = w.deliver(write_message(w), "s@client.test", ["later@plain.test", "never@plain.test"])
    assert later == Outcome(Z, "10.99.0.7 does not like recipient.\nRemote host said: 451 4.7.1 greylisted, "
                               "come back\nGiving up on 10.99.0.7.\n")
    assert never == Outcome(F, "10.99.0.7 does not like recipient.\nRemote host said: 550 5.1.1 no such user\n"
                               "Giving up on 10.99.0.7.\n")


def test_receiver_that_hangs_times_out(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    sinks("10.99.0.7", Script(hang_at="banner"))
    w = start_worker({"timeoutremote": "1"})
    start = time.monotonic()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@plain.test"])
    assert report == Outcome(Z, "Connected to 10.99.0.7 but connection died. (#4.4.2)\n")
    assert time.monotonic() - start < 5


def test_recipients_share_one_transaction_and_connections_are_reused(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.7", Script(rcpt=lambda a: "550 nope" if a.startswith("x") else "250 ok"))
    w = start_worker()
    reports = w.deliver(write_message(w), "s@client.test", ["a@plain.test", "x@plain.test", "b@plain.test"],
                        separately=True)
    assert [r.verdict for r in reports] == [S, F, S]
    assert reports[0] == Outcome(S, "10.99.0.7 accepted message.\nRemote host said: 250 ok 1234 qp 5\n")
    (tr,) = sink.transactions
    assert tr.rcpts == ["a@plain.test", "b@plain.test"]
    (report,) = w.deliver(write_message(w, 4713), "s@client.test", ["c@plain.test"])
    assert report.verdict is S and len(sink.transactions) == 2 and sink.connections == 1


def test_partial_final_line_is_refused_before_connecting(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.7")
    w = start_worker()
    (report,) = w.deliver(write_message(w, body=b"Subject: x\n\nno newline"), "s@client.test", ["u@plain.test"])
    assert report == Outcome(F, "SMTP cannot transfer messages with partial final lines. (#5.6.2)\n")
    assert sink.connections == 0


def test_before_remote_hook_adds_a_header(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.7")
    w = start_worker({"beforemote": "# sign\nprintf 'X-Signed: %s\\n' \"$1\"; cat\n"})
    reports = w.deliver(write_message(w), "s@client.test", ["a@plain.test", "b@plain.test"])
    assert [r.verdict for r in reports] == [S, S]
    (tr,) = sink.transactions  # same hook output for both: still one transaction
    assert tr.data.startswith(b"X-Signed: plain.test\r\nFrom: s@client.test\r\n")


def test_failing_hook_defers_and_sends_nothing(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.7")
    w = start_worker({"beforemote": "head -c 10; exit 111\n"})
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@plain.test"])
    assert report == Outcome(Z, "before-remote hook head -c 10; exit 111 failed (exit 111); will retry. (#4.3.0)\n")
    assert sink.connections == 0


def test_hook_never_runs_in_the_remote_worker(start_worker, sinks) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.7")
    w = start_worker({"beforemote": "touch ran; cat\n"})
    w.sandbox.stop()  # no sandbox: deferred, not run here instead, nothing sent
    (w.root / "run" / "sandbox-remote.sock").unlink()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@plain.test"])
    assert report == Outcome(Z, "before-remote hook could not be run: sandbox unavailable; "
                                "will retry. (#4.3.0)\n")
    assert sink.connections == 0 and not (w.root / "ran").exists()


def test_dns_failures_reach_the_report(start_worker) -> None:  # type: ignore[no-untyped-def]
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@nowhere.test"])
    assert report == Outcome(F, "Sorry, I couldn't find any host named nowhere.test. (#5.1.2)\n")
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@[127.0.0.1]"])
    assert report.verdict is F
    assert report.text.startswith("Sorry. Although I'm listed as a best-preference MX or A")
