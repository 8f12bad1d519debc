"""Outbound TLS policy in remote delivery (issue 17), the parts before and in one SMTP
session: the demand a DANE or MTA-STS policy puts on an MX host and how the session
meets it (eqmail.smtp.client: real TLS peers from tests/smtpsink.py, certificates from
a test CA made trusted through control/tlsca.pem), and the decisions of
eqmail.delivery.remote (which hosts a policy allows, the deferral text, REQUIRETLS's
validated hosts, ``TLS-Required: No``).  Whole deliveries against real DNSSEC, HTTPS
policy servers and peers are in tests/integration/test_dane_live.py and
test_mtasts_live.py."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from smtpsink import Script, SmtpSink, mint

from eqmail.control import load_controls
from eqmail.delivery import remote, tlsplan
from eqmail.delivery.tlspolicy import (
    PolicyKind,
    StsLookup,
    StsMode,
    StsPolicy,
)
from eqmail.dns import MxAddress, Tlsa, TlsaAnswer
from eqmail.instance import Instance
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.queue import tcpto
from eqmail.queue.layout import create_queue
from eqmail.smtp.client import Destination, PolicyFailure, SmtpSession, TlsDemand
from eqmail.smtp.transport import TlsConfig, Transport
from eqmail.spp.bfrmtclient import run_chain

MESSAGE = b"Subject: hi\n\nbody\n"
STS = TlsDemand("mta-sts enforce", True, webpki=True)
STS_TESTING = TlsDemand("mta-sts testing", False, webpki=True)


@pytest.fixture
def sinks() -> Iterator[list[SmtpSink]]:
    made: list[SmtpSink] = []
    yield made
    for s in made:
        s.stop()


def _peer(sinks: list[SmtpSink], script: Script, cert: tuple[Path, Path] | None) -> int:
    sink = SmtpSink(script, *(cert or (None, None)))
    sinks.append(sink)
    return sink.listen("127.0.0.1")


def _session(port: int, host: str, demand: TlsDemand | None, control: Path,
             dane: object = None) -> SmtpSession:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    dest = Destination("127.0.0.1", port, host, demand=demand)
    return SmtpSession(Transport(sock, 5), dest, "client.test", TlsConfig(control),
                       dane=dane)  # type: ignore[arg-type]


def _control(tmp_path: Path, ca: Path | None) -> Path:
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    if ca is not None:
        (control / "tlsca.pem").write_bytes(ca.read_bytes())
    return control


def test_mta_sts_enforce_accepts_a_valid_certificate_for_the_mx(tmp_path: Path,
                                                                 sinks: list[SmtpSink]) -> None:
    cert, key, ca = mint(tmp_path, ["mx.sts.test"])
    port = _peer(sinks, Script(starttls=True), (cert, key))
    s = _session(port, "mx.sts.test", STS, _control(tmp_path, ca))
    s.open()
    assert s.tls_active and s.tls_result is not None and s.tls_result[0] is None
    assert s.tls_result[1].startswith("certificate for mx.sts.test issued by ")
    assert s.transaction("s@x.test", ["a@sts.test"], io.BytesIO(MESSAGE))[1].verdict is Verdict.SUCCESS
    assert sinks[0].transactions[0].tls


@pytest.mark.parametrize("names, trusted, result", [
    (["other.test"], True, "certificate-host-mismatch"),
    (["mx.sts.test"], False, "certificate-not-trusted"),
])
def test_mta_sts_enforce_refuses_a_bad_certificate_and_sends_nothing(
        tmp_path: Path, sinks: list[SmtpSink], names: list[str], trusted: bool, result: str) -> None:
    cert, key, ca = mint(tmp_path, names)
    port = _peer(sinks, Script(starttls=True), (cert, key))
    s = _session(port, "mx.sts.test", STS, _control(tmp_path, ca if trusted else None))
    with pytest.raises(PolicyFailure) as e:
        s.open()
    assert e.value.result == result
    assert not s.usable and all(not t.mail for t in sinks[0].transactions)  # no MAIL sent


def test_a_stripped_starttls_is_a_policy_failure_never_clear_text(tmp_path: Path,
                                                                   sinks: list[SmtpSink]) -> None:
    port = _peer(sinks, Script(), None)  # a peer (or a man in the middle) offering no STARTTLS
    s = _session(port, "mx.sts.test", STS, _control(tmp_path, None))
    with pytest.raises(PolicyFailure) as e:
        s.open()
    assert (e.value.result, e.value.detail) == ("starttls-not-supported", "STARTTLS not offered")
    assert all(not t.mail for t in sinks[0].transactions)


def test_mta_sts_testing_records_the_failure_and_goes_on(tmp_path: Path,
                                                         sinks: list[SmtpSink]) -> None:
    cert, key, ca = mint(tmp_path, ["other.test"])
    port = _peer(sinks, Script(starttls=True), (cert, key))
    s = _session(port, "mx.sts.test", STS_TESTING, _control(tmp_path, ca))
    s.open()
    assert s.tls_result == ("certificate-host-mismatch", "received certificate for other.test")
    assert s.transaction("s@x.test", ["a@sts.test"], io.BytesIO(MESSAGE))[1].verdict is Verdict.SUCCESS


def test_dane_demand_is_decided_by_the_dane_check(tmp_path: Path, sinks: list[SmtpSink]) -> None:
    cert, key, _ = mint(tmp_path, ["mx.dane.test"])
    port = _peer(sinks, Script(starttls=True), (cert, key))
    record = Tlsa(3, 1, 1, b"\x01" * 32)
    seen: list[tuple[Sequence[Tlsa], int, Sequence[str]]] = []

    def check(records: Sequence[Tlsa], chain: Sequence[x509.Certificate], names: Sequence[str],
              now: float) -> tuple[str | None, str]:
        seen.append((records, len(chain), names))
        return (None, "TLSA 3 1 1 0101...") if len(seen) == 1 else ("validation-failure", "no match")

    demand = TlsDemand("dane", True, tlsa=(record,), names=("mx.dane.test", "dane.test"))
    good = _session(port, "mx.dane.test", demand, _control(tmp_path, None), check)
    good.open()
    assert good.tls_result == (None, "TLSA 3 1 1 0101...")
    assert seen[0] == ((record,), 1, ("mx.dane.test", "dane.test"))
    with pytest.raises(PolicyFailure) as e:
        _session(port, "mx.dane.test", demand, _control(tmp_path, None), check).open()
    assert (e.value.result, e.value.detail) == ("validation-failure", "no match")


def test_requiretls_goes_on_mail_from(tmp_path: Path, sinks: list[SmtpSink]) -> None:
    port = _peer(sinks, Script(), None)
    s = _session(port, "mx.test", None, _control(tmp_path, None))
    s.open()
    s.transaction("s@x.test", ["a@y.test"], io.BytesIO(MESSAGE), requiretls=True)
    assert sinks[0].transactions[0].mail.endswith(" REQUIRETLS")


# ------------------------------------------------------------------ remote's decisions


class FakeResolver:
    def __init__(self, tlsa: dict[str, TlsaAnswer | Exception]) -> None:
        self.answers = tlsa

    def tlsa(self, host: str, port: int = 25) -> TlsaAnswer:
        a = self.answers.get(host, TlsaAnswer((), True))
        if isinstance(a, Exception):
            raise a
        return a


class FakeSts:
    def __init__(self, lookup: StsLookup) -> None:
        self.answer = lookup
        self.asked: list[str] = []

    def lookup(self, domain: str) -> StsLookup:
        self.asked.append(domain)
        return self.answer


def _job(tmp_path: Path, sts: FakeSts | None, dnssec: bool = True) -> remote.RemoteJob:
    root = tmp_path / "inst"
    (root / "control").mkdir(parents=True)
    (root / "control" / "me").write_text("client.test\n")
    if dnssec:
        (root / "control" / "dnssec").write_text("1\n")
    create_queue(Instance(root).queue)
    return remote.RemoteJob(load_controls(root), frozenset(),
                            tcpto.Tcpto(root / "queue" / "lock" / "tcpto"), remote.ConnectionCache(1),
                            TlsConfig(root / "control"), run_chain, None, sts, root)


def _env(job: remote.RemoteJob) -> tlsplan.PolicyEnv:
    return tlsplan.PolicyEnv(job.controls, job.tls, job.sts, job.root)


def _policy(mode: StsMode, *mx: str) -> StsPolicy:
    return StsPolicy(mode, mx, 86400, "id1", "version: STSv1\nmode: x\n", 0.0)


OPT_OUT = b"Subject: x\nTLS-Required: No\n\nbody\n"


def _msg(data: bytes = MESSAGE) -> io.BytesIO:
    return io.BytesIO(data)


def _addrs(*hosts: tuple[str, bool]) -> list[MxAddress]:
    return [MxAddress(f"10.0.0.{i}", 10 * i, h, secure) for i, (h, secure) in enumerate(hosts, 1)]


def test_mta_sts_enforce_keeps_only_the_hosts_its_policy_names(tmp_path: Path) -> None:
    job = _job(tmp_path, FakeSts(StsLookup(_policy(StsMode.ENFORCE, "*.sts.test"))))
    plan = tlsplan.Plan(_env(job), "sts.test", tlsplan.Attempt(1))
    kept = tlsplan.apply(plan, FakeResolver({}),  # type: ignore[arg-type]
                                _addrs(("mx.sts.test", False), ("evil.test", False)), _msg())
    assert [a.host for a in kept] == ["mx.sts.test"]
    assert plan.demands["mx.sts.test"] == TlsDemand("mta-sts enforce", True, webpki=True)
    assert plan.kind is PolicyKind.STS_ENFORCE
    none = tlsplan.Plan(_env(job), "sts.test", tlsplan.Attempt(1))
    assert tlsplan.apply(none, FakeResolver({}),  # type: ignore[arg-type]
                                _addrs(("evil.test", False)), _msg()) == []
    assert none.deferral() == Outcome(
        Verdict.DEFERRAL, "Sorry, no MX host of sts.test meets its TLS policy (mta-sts enforce): "
        "evil.test: validation-failure: MX host evil.test is not in the policy's mx list. (#4.7.5)\n")
    optout = tlsplan.Plan(_env(job), "sts.test", tlsplan.Attempt(1))
    assert len(tlsplan.apply(optout, FakeResolver({}),  # type: ignore[arg-type]
                                    _addrs(("evil.test", False)), _msg(OPT_OUT))) == 1
    # REQUIRETLS: the header field is ignored (RFC 8689 §5)
    strict = tlsplan.Plan(_env(job), "sts.test", tlsplan.Attempt(1, requiretls=True))
    assert tlsplan.apply(strict, FakeResolver({}),  # type: ignore[arg-type]
                                _addrs(("evil.test", False)), _msg(OPT_OUT)) == []


def test_dane_takes_precedence_and_needs_an_authenticated_mx(tmp_path: Path) -> None:
    rec = Tlsa(3, 1, 1, bytes(32))
    job = _job(tmp_path, FakeSts(StsLookup(_policy(StsMode.ENFORCE, "mx.d.test", "mx2.d.test"))))
    plan = tlsplan.Plan(_env(job), "d.test", tlsplan.Attempt(1))
    tlsplan.apply(plan, FakeResolver({"mx.d.test": TlsaAnswer((rec,), True),  # type: ignore[arg-type]
                                      "mx2.d.test": TlsaAnswer((rec,), True)}),
                  _addrs(("mx.d.test", True), ("mx2.d.test", False)), _msg())
    assert plan.demands["mx.d.test"].kind == "dane" and plan.demands["mx.d.test"].tlsa == (rec,)
    assert plan.demands["mx2.d.test"].kind == "mta-sts enforce"  # its address was not secure
    off = tlsplan.Plan(_env(_job(tmp_path / "b", None, dnssec=False)), "d.test", tlsplan.Attempt(1))
    tlsplan.apply(off, FakeResolver({"mx.d.test": TlsaAnswer((rec,), True)}),  # type: ignore[arg-type]
                  _addrs(("mx.d.test", True)), _msg())
    assert off.demands == {}  # control/dnssec 0: the AD bit is never believed


def test_a_failed_tlsa_lookup_makes_the_host_unusable(tmp_path: Path) -> None:
    from eqmail.dns import LookupSoft

    job = _job(tmp_path, None)
    plan = tlsplan.Plan(_env(job), "d.test", tlsplan.Attempt(1))
    kept = tlsplan.apply(plan, FakeResolver({"mx.d.test": LookupSoft("SERVFAIL")}),  # type: ignore[arg-type]
                         _addrs(("mx.d.test", True)), _msg())
    assert kept == [] and plan.deferral().text.startswith(
        "Sorry, no MX host of d.test meets its TLS policy (dane): mx.d.test: dnssec-invalid")


def test_requiretls_needs_a_validated_host(tmp_path: Path) -> None:
    job = _job(tmp_path, None)
    assert not tlsplan.validated(job.tls, Destination("10.0.0.1", 25, "mx.test"))
    assert not tlsplan.validated(job.tls, Destination("10.0.0.1", 25, "mx.test", demand=STS_TESTING))
    assert tlsplan.validated(job.tls, Destination("10.0.0.1", 25, "mx.test", demand=STS))
    assert not tlsplan.validated(job.tls, Destination("10.0.0.1", 25, "mx.test",
                                                  demand=TlsDemand("dane", True)))
    plan = tlsplan.Plan(_env(job), "d.test", tlsplan.Attempt(1, requiretls=True))
    plan.failure = "mx.d.test [10.0.0.1]: certificate-host-mismatch: x"
    assert plan.deferral().verdict is Verdict.FAILURE and plan.deferral().text.endswith("(#5.7.10)\n")


@pytest.mark.parametrize("head, optout", [
    (b"Subject: x\nTLS-Required: No\n\nbody\n", True),
    (b"tls-required:   no  \n\n", True),
    (b"TLS-Required: Yes\n\n", False),
    (b"Subject: x\n\nTLS-Required: No\n", False),  # in the body: not a header field
])
def test_tls_required_no(head: bytes, optout: bool) -> None:
    assert tlsplan.tls_not_required(io.BytesIO(head)) is optout
