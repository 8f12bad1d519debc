"""The MTA-STS policy worker (eqmail.workers.policy) with a real HTTPS server
(tests/stsserver.py, certificates from a test CA trusted through control/tlsca.pem) and
a real DNS server (tests/dnsserver.py) for the TXT and A records, asked through the
remote worker's client (eqmail.delivery.stsclient) on its socket.

The worker runs as production runs it — its ``run(ctx)`` in a process of its own, on a
socket bound for it — and once inside a started instance, as eqmailt.  The HTTPS server
binds port 443 of 127.43.17.2 (the policy URL has no port), so this needs root.

What is checked: a policy fetched and kept on disk under <root>/sts/; a new TXT id
fetched again; a failed refresh keeps the cached one; a restarted worker uses the disk;
a fetch that times out, a redirect, an oversized, malformed or text/html policy, a
certificate for the wrong name or from an untrusted CA each give no policy and the
right RFC 8460 failure; and the socket serves only the remote worker's uid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from certs import CA
from dnsserver import DnsServer, txt
from stsserver import Site, StsServer, policy

from eqmail.delivery.stsclient import StsClient
from eqmail.delivery.tlspolicy import ResultType, StsLookup, StsMode
from eqmail.ipc.policy import LookupAnswer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binds port 443: needs root")

HTTPS = "127.43.17.2"
PY = sys.executable
BOOT = """
import sys
from pathlib import Path
from eqmail.control import load_controls
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds
from eqmail.workers.base import PolicySettings, WorkerContext, WorkerKind
from eqmail.workers import policy
root = Path(sys.argv[1])
ids = SystemIds.lookup() if sys.argv[4] == "privileged" else SystemIds.current_user()
ctx = WorkerContext(kind=WorkerKind.POLICY, name="policy", instance=Instance(root),
                    controls=load_controls(root), ids=ids, generation=1,
                    ready_fd=int(sys.argv[3]), settings=PolicySettings(int(sys.argv[2])))
sys.exit(policy.run(ctx))
"""
ASK = """
import sys
from pathlib import Path
from eqmail.delivery.stsclient import StsClient
got = StsClient(Path(sys.argv[1]), 5.0, cache_seconds=0).lookup(sys.argv[2])
print(got.policy.id if got.policy else "none", got.failure, got.detail)
"""

GOOD = policy("enforce", "mx.good.test", "*.mx.good.test", max_age=86400)
DOMAINS = ("good", "slow", "tlshang", "redirect", "big", "bad", "html", "wrongcert", "untrusted",
           "gone", "restart")


def zone() -> dict[str, object]:
    z: dict[str, object] = {f"mta-sts.{d}.test": {"A": [HTTPS]} for d in DOMAINS}
    for d in DOMAINS:
        z[f"_mta-sts.{d}.test"] = {"TXT": [txt("v=STSv1; id=one"), txt("v=spf1 -all")]}
    z["nopolicy.test"] = {"MX": [(10, "mx.nopolicy.test")]}
    return z


@dataclass
class World:
    ca: CA
    dns: DnsServer
    https: StsServer

    def txt_id(self, domain: str, policy_id: str) -> None:
        self.dns.zone[f"_mta-sts.{domain}"] = {"TXT": [txt(f"v=STSv1; id={policy_id}")]}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    ca = CA.create("eqmail MTA-STS test CA")
    dns = DnsServer(zone())
    dns.start()
    sites = {
        "good.test": Site(GOOD),
        "restart.test": Site(GOOD),
        "gone.test": Site(policy("testing", "mx.gone.test")),
        "slow.test": Site(GOOD, hang="answer"),
        "tlshang.test": Site(GOOD, hang="handshake"),
        "redirect.test": Site(b"", status=301, location="https://elsewhere.test/x"),
        "big.test": Site(GOOD + b"x: " + b"y" * (64 * 1024) + b"\r\n"),
        "bad.test": Site(b"<html><body>version: STSv1</body></html>\n"),
        "html.test": Site(GOOD, content_type="text/html"),
        "wrongcert.test": Site(GOOD, cert_names=("mta-sts.other.test",)),
        "untrusted.test": Site(GOOD),
    }
    try:
        https = StsServer(ca, HTTPS, sites=sites).start()
    except OSError as e:
        dns.stop()
        pytest.skip(f"cannot bind {HTTPS}:443: {e}")
    yield World(ca, dns, https)
    https.stop()
    dns.stop()


@dataclass
class PolicyWorker:
    root: Path
    proc: subprocess.Popen[bytes]
    errors: Path

    @property
    def socket(self) -> Path:
        return self.root / "run" / "policy.sock"

    def client(self) -> StsClient:
        return StsClient(self.socket, 30.0, cache_seconds=0)

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(30)
        return self.errors.read_text()


@pytest.fixture
def start_worker(world: World) -> Iterator:
    made: list[PolicyWorker] = []
    root = Path(tempfile.mkdtemp(prefix="eqm-sts-", dir="/var/tmp"))
    os.chmod(root, 0o755)

    def start(tlsca: bool = True, privileged: bool = False, mtasts: str = "1") -> PolicyWorker:
        for d in ("control", "run", "sts"):
            (root / d).mkdir(exist_ok=True)
        (root / "control" / "me").write_text("client.test\n")
        (root / "control" / "dnsservers").write_text(f"127.0.0.1:{world.dns.port}\n")
        (root / "control" / "mtasts").write_text(mtasts + "\n")
        (root / "control" / "tlsca.pem").unlink(missing_ok=True)
        if tlsca:
            (root / "control" / "tlsca.pem").write_bytes(world.ca.pem)
        path = root / "run" / "policy.sock"
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o777 if privileged else 0o600)  # privileged: the peer check alone
        listener.listen(8)
        ready_r, ready_w = os.pipe()
        errors = root / f"worker{len(made)}.log"
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [PY, "-c", BOOT, str(root), str(listener.fileno()), str(ready_w),
                 "privileged" if privileged else "plain"],
                pass_fds=(listener.fileno(), ready_w), stderr=err)
        os.close(ready_w)
        listener.close()
        assert os.read(ready_r, 1) == b"R", f"policy worker did not become ready: {errors.read_text()}"
        os.close(ready_r)
        w = PolicyWorker(root, proc, errors)
        made.append(w)
        return w

    yield start
    for w in made:
        if w.proc.poll() is None:
            log = w.stop()
            assert "Traceback" not in log, log
    shutil.rmtree(root, ignore_errors=True)


def requests_for(world: World, domain: str) -> int:
    return sum(1 for host, _ in world.https.requests if host == f"mta-sts.{domain}")


def test_policy_fetched_kept_on_disk_and_refreshed_when_the_id_changes(
        world: World, start_worker) -> None:  # type: ignore[no-untyped-def]
    w = start_worker()
    got = w.client().lookup("Good.Test")
    assert got.failure is None and got.policy is not None
    p = got.policy
    assert (p.mode, p.mx, p.max_age, p.id) == (StsMode.ENFORCE, ("mx.good.test", "*.mx.good.test"),
                                               86400, "one")
    assert p.allows("mx.good.test") and not p.allows("mx.evil.test")
    assert p.text == GOOD.decode() and abs(p.fetched - time.time()) < 60
    cached = w.root / "sts" / "good.test"
    stored = LookupAnswer.decode(cached.read_bytes()).policy
    assert stored is not None and (stored.id, stored.text) == ("one", GOOD.decode())
    assert requests_for(world, "good.test") == 1
    assert w.client().lookup("good.test") == got  # the cache: the TXT id is unchanged
    assert requests_for(world, "good.test") == 1

    # a new id: fetched again, the new policy kept
    world.txt_id("good.test", "two")
    world.https.sites["good.test"] = Site(policy("testing", "mx2.good.test"))
    new = w.client().lookup("good.test")
    assert new.policy is not None and (new.policy.id, new.policy.mode) == ("two", StsMode.TESTING)
    assert requests_for(world, "good.test") == 2

    # a failed refresh (id three, the server errs) keeps what was cached
    world.txt_id("good.test", "three")
    world.https.sites["good.test"] = Site(b"oops", status=500)
    kept = w.client().lookup("good.test")
    assert kept.policy == new.policy and kept.failure is None
    assert "refresh failed: HTTP 500" in kept.detail
    assert LookupAnswer.decode(cached.read_bytes()).policy.id == "two"  # type: ignore[union-attr]
    assert "MTA-STS policy id two fetched: mode testing" in w.stop()


def test_a_restarted_worker_uses_the_disk_and_a_vanished_txt_keeps_the_policy(
        world: World, start_worker) -> None:  # type: ignore[no-untyped-def]
    w1 = start_worker()
    first = w1.client().lookup("restart.test")
    assert first.policy is not None
    w1.stop()
    world.dns.zone.pop("_mta-sts.restart.test")  # RFC 8461 §5.1: the policy stays while valid
    w2 = start_worker()
    again = w2.client().lookup("restart.test")
    assert again.policy == first.policy and "cached policy used" in again.detail
    assert requests_for(world, "restart.test") == 1


@pytest.mark.parametrize(("domain", "failure", "detail"), [
    ("slow.test", ResultType.STS_POLICY_FETCH_ERROR, "timed out"),
    ("tlshang.test", ResultType.STS_POLICY_FETCH_ERROR, "timed out"),
    ("redirect.test", ResultType.STS_POLICY_FETCH_ERROR, "HTTP 301: redirects are not followed"),
    ("big.test", ResultType.STS_POLICY_INVALID, "policy larger than 65536 bytes"),
    ("bad.test", ResultType.STS_POLICY_INVALID, "line 1 is not a policy field"),
    ("html.test", ResultType.STS_POLICY_INVALID, "Content-Type text/html, not text/plain"),
    ("wrongcert.test", ResultType.STS_WEBPKI_INVALID, "Hostname mismatch"),
])
def test_what_gives_no_policy(world: World, start_worker, domain: str, failure: ResultType,
                              detail: str) -> None:  # type: ignore[no-untyped-def]
    w = start_worker()
    began = time.monotonic()
    got = w.client().lookup(domain)
    took = time.monotonic() - began
    assert (got.policy, got.failure) == (None, failure) and detail in got.detail, got
    assert took < 16  # FETCH_SECONDS bounds the whole fetch
    assert not (w.root / "sts" / domain).exists()
    if domain == "redirect.test":  # never followed
        assert all("elsewhere" not in host for host, _ in world.https.requests)


def test_the_test_ca_is_trusted_only_through_control_tlsca(world: World, start_worker) -> None:  # type: ignore[no-untyped-def]
    got = start_worker(tlsca=False).client().lookup("untrusted.test")
    assert (got.policy, got.failure) == (None, ResultType.STS_WEBPKI_INVALID)
    assert "certificate verify failed" in got.detail or "unable to get local issuer" in got.detail


def test_no_txt_record_is_no_policy_and_no_fetch(world: World, start_worker) -> None:  # type: ignore[no-untyped-def]
    w = start_worker()
    assert w.client().lookup("nopolicy.test") == StsLookup(None)
    assert w.client().lookup("[10.0.0.1]") == StsLookup(None)
    assert not any("nopolicy" in host for host, _ in world.https.requests)


def test_control_mtasts_0_turns_it_off(world: World, start_worker) -> None:  # type: ignore[no-untyped-def]
    before = requests_for(world, "gone.test")
    got = start_worker(mtasts="0").client().lookup("gone.test")
    assert got == StsLookup(None) and requests_for(world, "gone.test") == before


def ask_as(user: str, sock: Path, domain: str) -> str:
    return subprocess.run([PY, "-c", ASK, str(sock), domain], user=user, capture_output=True,
                          text=True, timeout=30, check=True).stdout


def test_only_the_remote_workers_uid_is_served(world: World, start_worker) -> None:  # type: ignore[no-untyped-def]
    w = start_worker(privileged=True)
    assert ask_as("eqmailr", w.socket, "gone.test").startswith("one None")
    refused = ask_as("eqmaild", w.socket, "gone.test")
    assert refused.startswith("none sts-policy-fetch-error MTA-STS policy worker unavailable")
    assert "policy: refused a connection from uid" in w.stop()


def test_the_worker_in_a_started_instance() -> None:
    """Started by the supervisor: as eqmailt, its socket for eqmailr alone, its cache
    directory its own."""
    # a listener of its own on a free port (without control/listen a root instance
    # would bind port 25 on every address)
    inst = harness.Instance.create(listen=f"smtp 127.0.0.1:{harness.free_port(('127.0.0.1',))}")
    try:
        inst.start()
        sts = inst.root / "sts"
        st = sts.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (_uid("eqmailt"), 0o700)
        sk = (inst.root / "run" / "policy.sock").stat()
        assert (sk.st_uid, stat.S_IMODE(sk.st_mode)) == (_uid("eqmailr"), 0o600)
        (pid,) = harness.worker_pids(inst, "eqmail: mta-sts policy")
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(_uid("eqmailt"))}
        assert "mta-sts policy" in inst.ctl("status").stdout
        sock = inst.root / "run" / "policy.sock"
        assert ask_as("eqmailr", sock, "example.test") == "none None \n"  # no TXT: no policy
        assert ask_as("eqmaild", sock, "example.test").startswith(
            "none sts-policy-fetch-error MTA-STS policy worker unavailable")  # mode 0600
        os.kill(pid, signal.SIGKILL)  # restarted by the supervisor, serving the same socket
        harness.poll(lambda: [p for p in harness.worker_pids(inst, "eqmail: mta-sts policy")
                              if p != pid], 30, "a new policy worker")
        assert ask_as("eqmailr", sock, "example.test") == "none None \n"
        # a reload that changes control/mtasts replaces it
        (pid2,) = harness.worker_pids(inst, "eqmail: mta-sts policy")
        inst.write_control("mtasts", "0")
        inst.ctl("reload")
        harness.poll(lambda: [p for p in harness.worker_pids(inst, "eqmail: mta-sts policy")
                              if p not in (pid, pid2)], 30, "the policy worker replaced")
        assert ask_as("eqmailr", sock, "example.test") == "none None \n"
    finally:
        inst.destroy()


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


SEND_DUE = """
import sys, time
from pathlib import Path
from eqmail.control import load_controls
from eqmail.instance import Instance
from eqmail.workers.tlsrptsend import send_due
root = Path(sys.argv[1])
print(send_due(Instance(root), load_controls(root), time.time()))
"""


def test_the_policy_workers_user_can_mail_the_tls_reports() -> None:
    """The hourly TLS-RPT call runs as eqmailt: it reads <root>/tlsrpt/ (eqmailr's),
    keeps its marks in <root>/sts/ and injects through run/queue.sock."""
    from eqmail.delivery import tlsrpt

    rua = f"testuser@{harness.ME}"
    dns = DnsServer({"_smtp._tls.report.test": {"TXT": [txt(f"v=TLSRPTv1; rua=mailto:{rua}")]}})
    # a listener of its own on a free port (without control/listen a root instance
    # would bind port 25 on every address)
    inst = harness.Instance.create(listen=f"smtp 127.0.0.1:{harness.free_port(('127.0.0.1',))}")
    try:
        inst.write_control("dnsservers", f"127.0.0.1:{dns.start()}")
        inst.start()
        when = time.time() - 2 * 86400  # a finished day
        subprocess.run(["runuser", "-u", "eqmailr", "--", PY, "-c",
                        "import sys, time; from pathlib import Path; from eqmail.delivery import tlsrpt; "
                        "from eqmail.delivery.tlspolicy import PolicyKind, SessionResult; "
                        "tlsrpt.record(Path(sys.argv[1]), SessionResult(float(sys.argv[2]), 'report.test', "
                        "PolicyKind.STS_ENFORCE, 'mx.report.test', '10.99.0.2', '10.99.0.1', None, "
                        "policy_strings=('version: STSv1',), mx_patterns=('mx.report.test',)))",
                        str(inst.root), str(when)], check=True, timeout=60)
        sent = subprocess.run(["runuser", "-u", "eqmailt", "--", PY, "-c", SEND_DUE, str(inst.root)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0 and sent.stdout == "1\n", sent.stderr
        [path] = inst.wait_for_mail(1, timeout=60)
        assert b"TLS-Report-Domain: report.test" in path.read_bytes()
        marks = inst.root / "sts" / "tlsrpt-sent" / tlsrpt.day_of(when).isoformat()
        assert marks.read_text().startswith("report.test sent\n")
        assert marks.stat().st_uid == _uid("eqmailt")
    finally:
        inst.destroy()
        dns.stop()
