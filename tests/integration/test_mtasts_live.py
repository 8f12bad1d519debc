"""MTA-STS end to end: eqmail's remote delivery worker and its MTA-STS policy worker,
both started through their ``run(ctx)`` as production starts them, deliver to SMTP
receivers (tests/smtpsink.py) whose domains publish policies.

Network as in test_remote.py: two network namespaces made by the test ("client", where
the two workers run, and "peer", where everything else listens) joined by a veth pair.
In the peer: the DNS server (10.99.0.9, MX, A, ``_mta-sts`` TXT), the HTTPS server of
the policies (tests/stsserver.py, 10.99.0.8 port 443) and the receivers (10.99.0.2-7,
10 and 11, port 25).  Certificates come from one test CA, which control/tlsca.pem makes trusted
for the policy fetch and the MX certificate check alike.  Needs root.

What is checked (issue 17 item 6, RFC 8461 §5): enforce + a good MX is delivered over
TLS and the log names the policy and the certificate; an MX not in the policy, a
certificate for another name, an expired one, a self-signed one and a stripped
STARTTLS are deferred with the policy's text and nothing reaches the receiver in clear
text; a policy fetch that times out with
nothing cached delivers as without a policy; testing mode delivers despite a mismatch.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from certs import CA, Issued
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnsserver import DnsServer, txt
from netns import in_netns
from smtpsink import Script, SmtpSink
from stsserver import Site, StsServer, policy

from eqmail.ipc import frame, recv_frame
from eqmail.ipc.delivery import DeliveryReport, Outcome, Verdict

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(),
                                reason="needs root and unshare for network namespaces")

S, Z = Verdict.SUCCESS, Verdict.DEFERRAL
PY = sys.executable
HTTPS = "10.99.0.8"
DNS = "10.99.0.9"
BOOT = """
import sys
from pathlib import Path
from eqmail.control import load_controls
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds
from eqmail.workers import base
from eqmail.workers import policy, remote
root, kind = Path(sys.argv[1]), sys.argv[4]
settings = (base.PolicySettings if kind == "policy" else base.RemoteSettings)(int(sys.argv[2]))
ctx = base.WorkerContext(kind=base.WorkerKind(kind), name=kind, instance=Instance(root),
                         controls=load_controls(root), ids=SystemIds.current_user(), generation=1,
                         ready_fd=int(sys.argv[3]), settings=settings)
sys.exit((policy if kind == "policy" else remote).run(ctx))
"""

# domain -> (receiver address, policy body or None, the site's quirks)
DOMAINS: dict[str, tuple[str, bytes | None, dict[str, object]]] = {
    "enforce.test": ("10.99.0.2", policy("enforce", "mx.enforce.test"), {}),
    "outside.test": ("10.99.0.3", policy("enforce", "mx.elsewhere.test"), {}),
    "wrongname.test": ("10.99.0.4", policy("enforce", "*.wrongname.test"), {}),
    "stripped.test": ("10.99.0.5", policy("enforce", "mx.stripped.test"), {}),
    "slowpolicy.test": ("10.99.0.6", policy("enforce", "mx.nowhere.test"), {"hang": "answer"}),
    "testing.test": ("10.99.0.7", policy("testing", "mx.elsewhere.test"), {}),
    "expired.test": ("10.99.0.10", policy("enforce", "mx.expired.test"), {}),
    "selfsigned.test": ("10.99.0.11", policy("enforce", "mx.selfsigned.test"), {}),
}


def zone() -> dict[str, object]:
    z: dict[str, object] = {}
    for domain, (ip, body, _quirks) in DOMAINS.items():
        z[domain] = {"MX": [(10, f"mx.{domain}")]}
        z[f"mx.{domain}"] = {"A": [ip]}
        if body is not None:
            z[f"_mta-sts.{domain}"] = {"TXT": [txt("v=STSv1; id=20261208")]}
            z[f"mta-sts.{domain}"] = {"A": [HTTPS]}
    return z


@dataclass
class Net:
    client: int
    peer: int
    dns: DnsServer
    https: StsServer
    ca: CA
    certs: Path
    sinks: list[SmtpSink] = field(default_factory=list)

    def sink(self, addr: str, script: Script, cert_names: tuple[str, ...] | None,
             issued: Issued | None = None) -> SmtpSink:
        cert: tuple[Path | None, Path | None] = (None, None)
        if issued is None and cert_names is not None:
            issued = self.ca.server(*cert_names)
        if issued is not None:
            cert = issued.write(self.certs, f"{addr}-{len(self.sinks)}")
        s = SmtpSink(script, *cert)
        with in_netns(self.peer):
            s.listen(addr, 25)
        self.sinks.append(s)
        return s


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    certs = Path(tempfile.mkdtemp(prefix="eqm-sts-certs-"))
    try:
        with netns.pair(["ip addr add 10.99.0.1/24 dev v0"],
                        [f"ip addr add 10.99.0.{i}/24 dev v1" for i in range(2, 12)]) as (client, peer):
            ca = CA.create("eqmail MTA-STS live test CA")
            sites = {d: Site(body, **quirks) for d, (_ip, body, quirks) in DOMAINS.items()  # type: ignore[arg-type]
                     if body is not None}
            dns = DnsServer(zone(), host=DNS)
            https = StsServer(ca, HTTPS, sites=sites)
            with in_netns(peer):
                dns.start()
                https.start()
            n = Net(client, peer, dns, https, ca, certs)
            yield n
            for s in n.sinks:
                s.stop()
            https.stop()
            dns.stop()
    finally:
        shutil.rmtree(certs, ignore_errors=True)


@dataclass
class Workers:
    root: Path
    procs: list[subprocess.Popen[bytes]]
    sock: socket.socket
    slot: int = 0

    def deliver(self, msgid: int, rcpt: str, wait: float = 60) -> Outcome:
        (self.root / "queue" / "mess" / str(msgid % 23) / str(msgid)).write_bytes(
            b"From: s@client.test\nSubject: sts\n\nsecret body\n")
        self.slot += 1
        self.sock.sendall(frame(b"D", f"{self.slot}\0{msgid}\0s@client.test\0{rcpt}\0".encode()))
        self.sock.settimeout(wait)
        kind, payload = recv_frame(self.sock)
        assert kind == b"r"
        return DeliveryReport.decode(payload).outcome

    def log(self) -> str:
        return "".join((self.root / f"{k}.log").read_text() for k in ("remote", "policy"))


def _start(net: Net, root: Path, kind: str, sock_name: str) -> subprocess.Popen[bytes]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "run" / sock_name))
    listener.listen(8)
    ready_r, ready_w = os.pipe()
    with open(root / f"{kind}.log", "wb") as err:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/proc/{net.client}/ns/net", PY, "-c", BOOT, str(root),
             str(listener.fileno()), str(ready_w), kind],
            pass_fds=(listener.fileno(), ready_w), stderr=err)
    os.close(ready_w)
    listener.close()
    ok = os.read(ready_r, 1) == b"R"
    os.close(ready_r)
    assert ok, f"{kind} worker did not become ready: {(root / f'{kind}.log').read_text()}"
    return proc


@pytest.fixture
def workers(net: Net) -> Iterator[Workers]:
    root = Path(tempfile.mkdtemp(prefix="eqm-sts-live-", dir="/var/tmp"))
    for d in ("control", "run", "sts", "queue/lock", *(f"queue/mess/{i}" for i in range(23))):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, text in {"me": "client.test", "dnsservers": f"{DNS}:{net.dns.port}",
                       "timeoutconnect": "3", "timeoutremote": "5", "concurrencyremote": "2",
                       "mtasts": "1"}.items():
        (root / "control" / name).write_text(text + "\n")
    (root / "control" / "tlsca.pem").write_bytes(net.ca.pem)
    procs = [_start(net, root, "policy", "policy.sock"), _start(net, root, "remote", "remote.sock")]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(root / "run" / "remote.sock"))
    w = Workers(root, procs, sock)
    yield w
    sock.close()
    for p in procs:
        p.terminate()
        p.wait(30)
    log = w.log()
    shutil.rmtree(root, ignore_errors=True)
    assert "Traceback" not in log, log


def deferral(domain: str, kind: str, detail: str) -> Outcome:
    return Outcome(Z, f"Sorry, no MX host of {domain} meets its TLS policy ({kind}): {detail}. "
                      "(#4.7.5)\n")


def test_enforce_and_a_good_mx_is_delivered_over_tls(net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.2", Script(starttls=True), ("mx.enforce.test",))
    got = workers.deliver(101, "u@enforce.test")
    assert got.verdict is S and got.text.startswith("10.99.0.2 accepted message."), got
    (tr,) = sink.transactions
    assert tr.tls and tr.rcpts == ["u@enforce.test"]
    assert ("remote: msg 101 to enforce.test: mta-sts enforce TLS to mx.enforce.test "
            "[10.99.0.2]: ") in workers.log()
    line = next(ln for ln in workers.log().splitlines() if "msg 101 to enforce.test" in ln)
    assert "mx.enforce.test" in line.split("]: ", 1)[1] and "eqmail MTA-STS live test CA" in line
    assert (workers.root / "sts" / "enforce.test").is_file()  # fetched before the attempt


def test_an_mx_not_in_the_policy_is_deferred(net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.3", Script(starttls=True), ("mx.outside.test",))
    got = workers.deliver(102, "u@outside.test")
    assert got == deferral("outside.test", "mta-sts enforce",
                           "mx.outside.test: validation-failure: MX host mx.outside.test is not in "
                           "the policy's mx list")
    assert sink.connections == 0 and sink.transactions == []


def test_a_certificate_for_another_name_is_deferred(net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.4", Script(starttls=True), ("mx.someone-else.test",))
    got = workers.deliver(103, "u@wrongname.test")
    assert got.verdict is Z, got
    assert got.text.startswith("Sorry, no MX host of wrongname.test meets its TLS policy "
                               "(mta-sts enforce): mx.wrongname.test [10.99.0.4]: "
                               "certificate-host-mismatch: "), got
    assert got.text.endswith(". (#4.7.5)\n")
    assert sink.transactions == [] and not any(c.startswith(b"MAIL") for c in sink.commands)


def test_a_stripped_starttls_is_deferred_and_nothing_goes_in_clear_text(
        net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.5", Script(starttls=False), None)  # an attacker removed STARTTLS
    got = workers.deliver(104, "u@stripped.test")
    assert got.verdict is Z, got
    assert got.text.startswith("Sorry, no MX host of stripped.test meets its TLS policy "
                               "(mta-sts enforce): mx.stripped.test [10.99.0.5]: "
                               "starttls-not-supported"), got
    assert sink.transactions == []
    assert not any(c.split(b" ")[0].upper() in (b"MAIL", b"RCPT", b"DATA") for c in sink.commands)


def test_a_policy_fetch_that_times_out_with_nothing_cached_delivers_as_without_policy(
        net: Net, workers: Workers) -> None:
    # the policy (were it fetched) would forbid this MX: delivered = no policy was used
    sink = net.sink("10.99.0.6", Script(starttls=False), None)
    began = time.monotonic()
    got = workers.deliver(105, "u@slowpolicy.test")
    assert got.verdict is S and got.text.startswith("10.99.0.6 accepted message."), got
    assert time.monotonic() - began < 30
    (tr,) = sink.transactions
    assert not tr.tls
    assert not (workers.root / "sts" / "slowpolicy.test").exists()
    assert "policy: slowpolicy.test: no MTA-STS policy for id 20261208: sts-policy-fetch-error" \
        in workers.log()


def test_testing_mode_delivers_despite_a_mismatch(net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.7", Script(starttls=True), ("mx.someone-else.test",))
    got = workers.deliver(106, "u@testing.test")
    assert got.verdict is S and got.text.startswith("10.99.0.7 accepted message."), got
    (tr,) = sink.transactions
    assert tr.tls  # TLS as offered, the failures only recorded


def _leaf(name: str, issuer: CA | None, days: tuple[int, int]) -> Issued:
    """A server certificate for ``name`` valid from ``days[0]`` to ``days[1]`` days from
    now, signed by ``issuer`` (None: by its own key, a self-signed certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer.name if issuer else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(issuer.key if issuer else key, hashes.SHA256()))
    return Issued(cert, key)


def test_an_expired_certificate_is_deferred(net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.10", Script(starttls=True), None,
                    _leaf("mx.expired.test", net.ca, (-10, -1)))
    got = workers.deliver(107, "u@expired.test")
    assert got.verdict is Z, got
    assert got.text.startswith("Sorry, no MX host of expired.test meets its TLS policy "
                               "(mta-sts enforce): mx.expired.test [10.99.0.10]: "
                               "certificate-expired: certificate has expired"), got
    assert sink.transactions == [] and not any(c.startswith(b"MAIL") for c in sink.commands)


def test_a_self_signed_certificate_is_deferred(net: Net, workers: Workers) -> None:
    sink = net.sink("10.99.0.11", Script(starttls=True), None,
                    _leaf("mx.selfsigned.test", None, (-1, 30)))
    got = workers.deliver(108, "u@selfsigned.test")
    assert got.verdict is Z, got
    assert got.text.startswith("Sorry, no MX host of selfsigned.test meets its TLS policy "
                               "(mta-sts enforce): mx.selfsigned.test [10.99.0.11]: "
                               "certificate-not-trusted: self-signed certificate"), got
    assert sink.transactions == [] and not any(c.startswith(b"MAIL") for c in sink.commands)
