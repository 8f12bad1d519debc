"""DANE end to end: the remote delivery worker (driven through its socket as the scanner
does, see test_remote.py) resolves through a real validating resolver (unbound, with a
private signed root served by nsd: tests/dnssec.py) and delivers to SMTP peers
(tests/smtpsink.py) whose certificates do or do not match the TLSA records.

Network: as in test_remote.py, two namespaces joined by a veth pair -- the worker in
"client" (10.99.0.1), the peers and the resolver in "peer" (10.99.0.2-20; unbound on
10.99.0.30, nsd on the peer's 127.0.0.1).  control/dnssec is 1, control/mtasts 0.
Needs root (namespaces), nsd, unbound and ldnsutils; nothing leaves the machine.

Cases (RFC 7672): DANE-EE match -> delivered over TLS, the log names the TLSA record;
mismatch -> deferred with the policy text, no MAIL ever sent; STARTTLS stripped by the
peer -> deferred, never clear text; bogus zone -> deferred, nobody contacted; a
tampered (bogus) TLSA RRset -> the host is skipped, deferred; insecure zone ->
delivered with opportunistic TLS; DANE-TA with the trust anchor in the chain ->
delivered; a failing DANE MX -> the next DANE MX that matches gets the mail.
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
from cryptography import x509
from dnssec import DnssecWorld, Signing, available, tlsa_text
from netns import in_netns
from smtpsink import Script, SmtpSink, mint
from spp_harness import Sandbox
from test_remote import BOOT, Worker, write_message

from eqmail.dns import TEMP_CNAME
from eqmail.ipc.delivery import Verdict

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(),
                       reason="needs root and unshare for network namespaces"),
    pytest.mark.skipif(not available(), reason="needs nsd, unbound and ldnsutils"),
]

S, Z = Verdict.SUCCESS, Verdict.DEFERRAL
PY = sys.executable
RESOLVER_IP = "10.99.0.30"


@dataclass
class Certs:
    ee: tuple[Path, Path]          # mx.ee.dane.test, matched by its 3 1 1 record
    mismatch: tuple[Path, Path]    # mx.mismatch.dane.test, its record names another key
    strip: tuple[Path, Path]       # mx.strip.dane.test (the peer never offers STARTTLS)
    ta_chain: tuple[Path, Path]    # mx.ta.dane.test: leaf + CA in one file, CA matched (2 0 1)
    ta_ca: Path
    any: tuple[Path, Path]         # an unrelated certificate (insecure zone, failing MX)
    other_key: Path                # the certificate the mismatching record names


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("danecerts")
    ee = mint(d, ["mx.ee.dane.test", "mx2.two.dane.test"])
    mm = mint(d, ["mx.mismatch.dane.test"])
    other = mint(d, ["mx.mismatch.dane.test"])
    strip = mint(d, ["mx.strip.dane.test"])
    ta_leaf, ta_key, ta_ca = mint(d, ["mx.ta.dane.test"])
    chain = d / "ta-chain.pem"
    chain.write_bytes(ta_leaf.read_bytes() + ta_ca.read_bytes())
    anything = mint(d, ["somebody.else.test"])
    return Certs(ee[:2], mm[:2], strip[:2], (chain, ta_key), ta_ca, anything[:2], other[0])


def records(c: Certs) -> dict[str, dict[str, object]]:
    ee = tlsa_text(_cert(c.ee[0]), 3, 1, 1)
    return {
        "ee.dane.test": {"MX": [(10, "mx.ee.dane.test")]},
        "mx.ee.dane.test": {"A": ["10.99.0.2"]},
        "_25._tcp.mx.ee.dane.test": {"TLSA": [ee]},
        "mismatch.dane.test": {"MX": [(10, "mx.mismatch.dane.test")]},
        "mx.mismatch.dane.test": {"A": ["10.99.0.3"]},
        "_25._tcp.mx.mismatch.dane.test": {"TLSA": [tlsa_text(_cert(c.other_key), 3, 1, 1)]},
        "strip.dane.test": {"MX": [(10, "mx.strip.dane.test")]},
        "mx.strip.dane.test": {"A": ["10.99.0.4"]},
        "_25._tcp.mx.strip.dane.test": {"TLSA": [tlsa_text(_cert(c.strip[0]), 3, 1, 1)]},
        "ta.dane.test": {"MX": [(10, "mx.ta.dane.test")]},
        "mx.ta.dane.test": {"A": ["10.99.0.6"]},
        "_25._tcp.mx.ta.dane.test": {"TLSA": [tlsa_text(_cert(c.ta_ca), 2, 0, 1)]},
        "badtlsa.dane.test": {"MX": [(10, "mx.badtlsa.dane.test")]},
        "mx.badtlsa.dane.test": {"A": ["10.99.0.7"]},
        "_25._tcp.mx.badtlsa.dane.test": {"TLSA": [ee]},
        "two.dane.test": {"MX": [(10, "mx1.two.dane.test"), (20, "mx2.two.dane.test")]},
        "mx1.two.dane.test": {"A": ["10.99.0.10"]},
        "_25._tcp.mx1.two.dane.test": {"TLSA": [ee]},
        "mx2.two.dane.test": {"A": ["10.99.0.11"]},
        "_25._tcp.mx2.two.dane.test": {"TLSA": [ee]},
        "ins.test": {"MX": [(10, "mx.ins.test")]},
        "mx.ins.test": {"A": ["10.99.0.8"]},
        "_25._tcp.mx.ins.test": {"TLSA": [tlsa_text(_cert(c.other_key), 3, 1, 1)]},
        "bog.test": {"MX": [(10, "mx.bog.test")]},
        "mx.bog.test": {"A": ["10.99.0.5"]},
        "_25._tcp.mx.bog.test": {"TLSA": [ee]},
    }


@dataclass
class Net:
    client: int
    peer: int
    world: DnssecWorld


@pytest.fixture(scope="module")
def net(certs: Certs) -> Iterator[Net]:
    with netns.pair(["ip addr add 10.99.0.1/24 dev v0"],
                    [f"ip addr add 10.99.0.{i}/24 dev v1" for i in [*range(2, 21), 30]],
                    600) as (client, peer):
        world = DnssecWorld(records(certs), {"dane.test": Signing.SECURE,
                                             "ins.test": Signing.INSECURE,
                                             "bog.test": Signing.BOGUS},
                            host=RESOLVER_IP, netns=peer,
                            tamper={("_25._tcp.mx.badtlsa.dane.test", "TLSA"):
                                    ["3 1 1 " + "00" * 32]})
        with world:
            yield Net(client, peer, world)


@dataclass
class LoggedWorker(Worker):
    log_path: Path = Path("/dev/null")

    def log(self, want: str, wait: float = 5) -> str:
        """The worker's log once it has a line containing ``want`` (the worker may
        write its lines just after the report)."""
        deadline = time.monotonic() + wait
        while True:
            text = self.log_path.read_text(errors="replace")
            if want in text or time.monotonic() > deadline:
                return text
            time.sleep(0.05)


@pytest.fixture
def start_worker(net: Net, tmp_path: Path) -> Iterator:
    workers: list[LoggedWorker] = []

    def start(controls: dict[str, str] | None = None) -> LoggedWorker:
        root = tmp_path / f"inst{len(workers)}"
        for d in ("control", "queue/lock", *(f"queue/mess/{i}" for i in range(23))):
            (root / d).mkdir(parents=True, exist_ok=True)
        files = {"me": "client.test", "dnsservers": net.world.dnsservers, "dnssec": "1",
                 "mtasts": "0", "timeoutconnect": "2", "timeoutremote": "5",
                 "concurrencyremote": "4", **(controls or {})}
        for name, text in files.items():
            (root / "control" / name).write_text(text + "\n")
        sandbox = Sandbox(root, remote=True).start()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(root / "remote.sock"))
        listener.listen(4)
        ready_r, ready_w = os.pipe()
        log_path = root / "worker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/proc/{net.client}/ns/net", PY, "-c", BOOT, str(root),
                 str(listener.fileno()), str(ready_w)],
                pass_fds=(listener.fileno(), ready_w), stderr=log)
        os.close(ready_w)
        listener.close()
        assert os.read(ready_r, 1) == b"R", "worker did not become ready"
        os.close(ready_r)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(root / "remote.sock"))
        w = LoggedWorker(root, proc, sock, sandbox, log_path=log_path)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.sock.close()
        w.proc.terminate()
        w.proc.wait(10)
        log = w.sandbox.stop()
        assert "Traceback" not in log, log
        assert "Traceback" not in w.log_path.read_text(errors="replace")


@pytest.fixture
def sinks(net: Net) -> Iterator:
    made: list[SmtpSink] = []

    def make(addr: str, cert: tuple[Path, Path] | None, starttls: bool = True) -> SmtpSink:
        sink = SmtpSink(Script(starttls=starttls and cert is not None), *(cert or (None, None)))
        with in_netns(net.peer):
            sink.listen(addr, 25)
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.stop()


def no_mail_sent(sink: SmtpSink) -> bool:
    """Nothing of the envelope went over the wire (clear or not)."""
    return sink.transactions == [] and not any(
        c.upper().startswith((b"MAIL", b"RCPT", b"DATA")) for c in sink.commands)


def test_dane_ee_match_is_delivered_and_logged(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.2", certs.ee)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@ee.dane.test"])
    assert report.verdict is S, report.text
    assert report.text.startswith("10.99.0.2 accepted message.\n")
    (tr,) = sink.transactions
    assert tr.tls and tr.rcpts == ["u@ee.dane.test"]
    record = tlsa_text(_cert(certs.ee[0]), 3, 1, 1)
    want = (f"remote: msg 4711 to ee.dane.test: dane TLS to mx.ee.dane.test [10.99.0.2]: "
            f"TLSA 3 1 1 {record.split()[3][:16]}...")
    assert want in w.log(want)


def test_dane_ee_mismatch_is_deferred_and_never_sent(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.3", certs.mismatch)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@mismatch.dane.test"])
    assert report.verdict is Z
    assert report.text.startswith(
        "Sorry, no MX host of mismatch.dane.test meets its TLS policy (dane): "
        "mx.mismatch.dane.test [10.99.0.3]: certificate-not-trusted: no TLSA record matches "
        "the certificate for mx.mismatch.dane.test, issuer test CA "), report.text
    assert report.text.endswith(". (#4.7.5)\n")
    assert sink.connections >= 1 and no_mail_sent(sink)


def test_stripped_starttls_is_deferred_never_clear_text(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.4", certs.strip, starttls=False)  # a MITM removed STARTTLS
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@strip.dane.test"])
    assert report.verdict is Z
    assert report.text.startswith(
        "Sorry, no MX host of strip.dane.test meets its TLS policy (dane): "
        "mx.strip.dane.test [10.99.0.4]: starttls-not-supported"), report.text
    assert sink.connections >= 1 and no_mail_sent(sink)


def test_bogus_zone_is_deferred_and_nobody_contacted(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.5", certs.ee)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@bog.test"])
    # qmail-remote looks up the domain's CNAME first: that is where the bogus zone shows
    assert report.verdict is Z and report.text == TEMP_CNAME.text
    assert sink.connections == 0


def test_bogus_tlsa_rrset_skips_the_host(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.7", certs.ee)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@badtlsa.dane.test"])
    assert report.verdict is Z
    assert report.text.startswith(
        "Sorry, no MX host of badtlsa.dane.test meets its TLS policy (dane): "
        "mx.badtlsa.dane.test: dnssec-invalid: TLSA lookup failed"), report.text
    assert "answered SERVFAIL (EDE 6 dnssec bogus: validation failure" in report.text
    assert sink.connections == 0


def test_insecure_zone_is_delivered_opportunistically(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    # its (unauthenticated) TLSA record names another key: it must not count
    sink = sinks("10.99.0.8", certs.any)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@ins.test"])
    assert report.verdict is S, report.text
    (tr,) = sink.transactions
    assert tr.tls
    assert "dane TLS" not in w.log_path.read_text()


def test_dane_ta_with_the_anchor_in_the_chain(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    sink = sinks("10.99.0.6", certs.ta_chain)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@ta.dane.test"])
    assert report.verdict is S, report.text
    assert sink.transactions[0].tls
    record = tlsa_text(_cert(certs.ta_ca), 2, 0, 1)
    want = (f"remote: msg 4711 to ta.dane.test: dane TLS to mx.ta.dane.test [10.99.0.6]: "
            f"TLSA 2 0 1 {record.split()[3][:16]}..., certificate for mx.ta.dane.test")
    assert want in w.log(want)


def test_failing_dane_mx_gives_way_to_the_next_matching_one(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    first = sinks("10.99.0.10", certs.any)  # its certificate does not match
    second = sinks("10.99.0.11", certs.ee)
    w = start_worker()
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@two.dane.test"])
    assert report.verdict is S, report.text
    assert report.text.startswith("10.99.0.11 accepted message.\n")
    assert no_mail_sent(first) and second.transactions[0].tls


def test_dnssec_off_means_no_dane(start_worker, sinks, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    # control/dnssec 0: the validating resolver's AD bit is not believed, so the
    # mismatching record does not stop opportunistic delivery
    sink = sinks("10.99.0.3", certs.mismatch)
    w = start_worker({"dnssec": "0"})
    (report,) = w.deliver(write_message(w), "s@client.test", ["u@mismatch.dane.test"])
    assert report.verdict is S, report.text
    assert sink.transactions[0].tls
