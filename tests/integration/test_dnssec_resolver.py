"""eqmail.dns with DNSSEC against a real validating resolver: unbound trusting a private
signed root, nsd serving signed, bogus and unsigned zones (tests/dnssec.py); and ``eqmailctl check``'s lines for
control/dnssec, which ask the resolver whether it validates."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnssec import DnssecWorld, Signing, available
from dnsserver import Behaviour, DnsServer

from eqmail import dns as edns
from eqmail.cli.check import check_report, dnssec_placement, format_check
from eqmail.control import load_controls
from eqmail.dns import DnsFailure, LookupSoft, MxAddress, Tlsa, TlsaAnswer
from eqmail.instance import Instance

pytestmark = pytest.mark.skipif(not available(), reason="needs nsd, unbound and ldnsutils")

EE = "3 1 1 " + "11" * 32
EE2 = "3 1 1 " + "22" * 32
TA = "2 0 1 " + "33" * 32

RECORDS = {
    "sec.test": {"MX": [(10, "mx.sec.test")]},
    "mx.sec.test": {"A": ["10.99.0.2"], "AAAA": ["fd99::2"]},
    "_25._tcp.mx.sec.test": {"TLSA": [EE, TA]},
    "nodane.sec.test": {"MX": [(10, "plainmx.sec.test")]},
    "plainmx.sec.test": {"A": ["10.99.0.3"]},
    "nomx.sec.test": {"A": ["10.99.0.4"]},
    "mixed.sec.test": {"MX": [(10, "mx.ins.test")]},
    # CNAME'd MX hosts (RFC 7672 §2.2.2)
    "mxa.sec.test": {"CNAME": "real.sec.test"},
    "real.sec.test": {"A": ["10.99.0.5"]},
    "_25._tcp.real.sec.test": {"TLSA": [EE2]},
    "_25._tcp.mxa.sec.test": {"TLSA": [EE]},
    "mxb.sec.test": {"CNAME": "real2.sec.test"},
    "real2.sec.test": {"A": ["10.99.0.6"]},
    "_25._tcp.mxb.sec.test": {"TLSA": [EE]},
    "mxc.sec.test": {"CNAME": "host.ins.test"},
    "_25._tcp.mxc.sec.test": {"TLSA": [EE]},
    "mxd.sec.test": {"CNAME": "real3.sec.test"},
    "real3.sec.test": {"A": ["10.99.0.7"]},
    "_25._tcp.real3.sec.test": {"TLSA": [EE2]},
    "_25._tcp.mxd.sec.test": {"TLSA": [EE]},
    "tlsacname.sec.test": {"A": ["10.99.0.8"]},
    "_25._tcp.tlsacname.sec.test": {"CNAME": "_dane.sec.test"},
    "_dane.sec.test": {"TLSA": [EE2]},
    "ins.test": {"MX": [(10, "mx.ins.test")]},
    "mx.ins.test": {"A": ["10.99.0.9"]},
    "_25._tcp.mx.ins.test": {"TLSA": [EE]},
    "host.ins.test": {"A": ["10.99.0.10"]},
    "bog.test": {"MX": [(10, "mx.bog.test")]},
    "mx.bog.test": {"A": ["10.99.0.11"]},
    "_25._tcp.mx.bog.test": {"TLSA": [EE]},
    "bogusmx.sec.test": {"MX": [(10, "mx.bog.test")]},
}
TAMPER = {("_25._tcp.real3.sec.test", "TLSA"): ["3 1 1 " + "44" * 32]}


@pytest.fixture(scope="module")
def world() -> Iterator[DnssecWorld]:
    with DnssecWorld(RECORDS, {"sec.test": Signing.SECURE, "ins.test": Signing.INSECURE,
                               "bog.test": Signing.BOGUS}, tamper=TAMPER) as w:
        yield w


def resolver(world: DnssecWorld, dnssec: bool = True) -> edns.Resolver:
    return edns.Resolver((("127.0.0.1", world.port),), 3.0, random.Random(1), dnssec=dnssec)


def rec(text: str) -> Tlsa:
    u, s, m, data = text.split()
    return Tlsa(int(u), int(s), int(m), bytes.fromhex(data))


def test_signed_zone_is_secure_for_mx_a_aaaa_and_tlsa(world: DnssecWorld) -> None:
    r = resolver(world)
    assert r.mx_addresses("sec.test") == [MxAddress("fd99::2", 10, "mx.sec.test", True),
                                          MxAddress("10.99.0.2", 10, "mx.sec.test", True)]
    answer = r.tlsa("mx.sec.test")
    assert answer.secure and set(answer.records) == {rec(EE), rec(TA)}
    assert answer.base == "mx.sec.test"
    assert r.host_addresses("mx.sec.test")[0].secure


def test_authenticated_denial_of_tlsa(world: DnssecWorld) -> None:
    r = resolver(world)
    assert [a.secure for a in r.mx_addresses("nodane.sec.test")] == [True]
    assert r.tlsa("plainmx.sec.test") == TlsaAnswer((), True)


def test_no_mx_the_domain_itself_secure(world: DnssecWorld) -> None:
    assert resolver(world).mx_addresses("nomx.sec.test") == [
        MxAddress("10.99.0.4", 0, "nomx.sec.test", True)]


def test_insecure_zone(world: DnssecWorld) -> None:
    r = resolver(world)
    assert r.mx_addresses("ins.test") == [MxAddress("10.99.0.9", 10, "mx.ins.test", False)]
    # records exist but are not authenticated: never handed out
    assert r.tlsa("mx.ins.test") == TlsaAnswer((), False)
    # a signed MX naming a host in an unsigned zone: the host is not secure
    assert r.mx_addresses("mixed.sec.test") == [MxAddress("10.99.0.9", 10, "mx.ins.test", False)]


def test_bogus_zone_is_a_soft_failure(world: DnssecWorld) -> None:
    r = resolver(world)
    with pytest.raises(DnsFailure) as e:
        r.mx_addresses("bog.test")
    assert e.value.problem == edns.TEMP_DNS  # deferred, as qmail defers a DNS failure
    with pytest.raises(LookupSoft) as soft:
        r.tlsa("mx.bog.test")
    # unbound's Extended DNS Error says why, for the log and the deferral's detail
    assert "answered SERVFAIL (EDE 7 signature expired: validation failure" in str(soft.value)
    # a good MX RRset naming a bogus host: no address, deferred
    with pytest.raises(DnsFailure) as e:
        r.mx_addresses("bogusmx.sec.test")
    assert e.value.problem == edns.TEMP_DNS


def test_tampered_tlsa_rrset_is_a_soft_failure(world: DnssecWorld) -> None:
    r = resolver(world)
    assert r.host_addresses("real3.sec.test")[0].secure  # the rest of the zone is fine
    with pytest.raises(LookupSoft) as soft:
        r.tlsa("real3.sec.test")
    assert "(EDE 6 dnssec bogus: validation failure" in str(soft.value)
    # reached through a CNAME, the bogus RRset at the expanded name is not passed over
    # for the initial name's good one
    with pytest.raises(LookupSoft):
        r.tlsa("mxd.sec.test")


def test_without_dnssec_nothing_is_secure_even_from_a_validating_resolver(world: DnssecWorld) -> None:
    r = resolver(world, dnssec=False)
    assert [a.secure for a in r.mx_addresses("sec.test")] == [False, False]
    assert [a.secure for a in r.mx_addresses("nomx.sec.test")] == [False]
    assert r.tlsa("mx.sec.test") == TlsaAnswer((), False)
    assert not r.host_addresses("mx.sec.test")[0].secure


def test_cname_mx_host_tlsa_at_the_expanded_name_first(world: DnssecWorld) -> None:
    r = resolver(world)
    assert r.tlsa("mxa.sec.test") == TlsaAnswer((rec(EE2),), True, "real.sec.test")


def test_cname_mx_host_falls_back_to_the_initial_name(world: DnssecWorld) -> None:
    assert resolver(world).tlsa("mxb.sec.test") == TlsaAnswer((rec(EE),), True, "mxb.sec.test")


def test_cname_into_an_insecure_zone_has_no_dane(world: DnssecWorld) -> None:
    # the expansion is not secure: the initial name's TLSA records are not used either
    assert resolver(world).tlsa("mxc.sec.test") == TlsaAnswer((), False)


def test_tlsa_owner_may_be_a_cname(world: DnssecWorld) -> None:
    assert resolver(world).tlsa("tlsacname.sec.test") == TlsaAnswer((rec(EE2),), True,
                                                                  "tlsacname.sec.test")


def test_other_lookups_still_work_through_the_validating_resolver(world: DnssecWorld) -> None:
    r = resolver(world)
    with pytest.raises(DnsFailure) as e:
        r.mx_addresses("nowhere.sec.test")
    assert e.value.problem == edns.perm_dns("nowhere.sec.test")
    assert r.tlsa("[10.99.0.2]") == TlsaAnswer((), False)
    assert r.canonical("mxa.sec.test") == "real.sec.test"


def _instance(tmp_path: Path, **files: str) -> Instance:
    (tmp_path / "control").mkdir(parents=True)
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    for name, text in files.items():
        (tmp_path / "control" / name).write_text(text)
    return Instance(tmp_path)


def test_check_shows_a_validating_resolver(world: DnssecWorld, tmp_path: Path) -> None:
    report = check_report(_instance(tmp_path, dnssec="1\n", dnsservers=f"{world.dnsservers}\n"))
    assert (f"note: control/dnssec is 1: DANE on; control/dnsservers ({world.dnsservers}) "
            "validate DNSSEC (AD on the root zone's DNSKEY)") in report["notes"]
    assert not [w for w in report["warnings"] if "dnssec" in w]
    assert resolver(world, dnssec=False).validates()  # whatever the resolver's setting


def test_check_warns_about_a_resolver_that_does_not_validate(tmp_path: Path) -> None:
    with DnsServer({".": {"DNSKEY": ["257 3 13 " + "A" * 88]}}) as plain:  # no AD ever
        report = check_report(_instance(tmp_path, dnssec="1\n",
                                        dnsservers=f"127.0.0.1:{plain.port}\n"))
    assert (f"warning: control/dnssec is 1 but control/dnsservers (127.0.0.1:{plain.port}) do "
            "not validate (no AD bit on the root zone's DNSKEY): DANE never applies"
            ) in report["warnings"]
    assert "control/dnssec is 1" in format_check(report)


def test_check_warns_about_a_silent_resolver(tmp_path: Path) -> None:
    with DnsServer({}) as silent:
        silent.behaviour = Behaviour.SILENT
        report = check_report(_instance(tmp_path, dnssec="1\n",
                                        dnsservers=f"127.0.0.1:{silent.port}\n"))
    (warning,) = [w for w in report["warnings"] if "dnssec" in w]
    assert warning.startswith(f"warning: control/dnssec is 1 but control/dnsservers "
                              f"(127.0.0.1:{silent.port}) did not answer a DNSSEC query (")
    assert warning.endswith("): DANE lookups will defer")


def test_check_warns_about_resolvers_elsewhere(tmp_path: Path) -> None:
    # (the placement rule alone: asking 192.0.2.53 would leave the machine)
    far = load_controls(_instance(tmp_path / "a", dnssec="1\n",
                                  dnsservers="127.0.0.1\n192.0.2.53\n").root)
    assert dnssec_placement(far) == [
        "warning: control/dnssec is 1 and control/dnsservers names 192.0.2.53, not on this "
        "host: their AD bit crosses the network unprotected"]
    (none,) = dnssec_placement(load_controls(_instance(tmp_path / "b", dnssec="1\n").root))
    assert none.startswith("warning: control/dnssec is 1 without control/dnsservers: the AD "
                           "bit of /etc/resolv.conf's resolvers is trusted")
    assert dnssec_placement(load_controls(_instance(tmp_path / "c", dnssec="1\n",
                                                    dnsservers="::1\n").root)) == []


def test_check_says_nothing_with_dnssec_off(tmp_path: Path) -> None:
    report = check_report(_instance(tmp_path))
    assert not [ln for ln in report["warnings"] + report["notes"] if "dnssec" in ln]
