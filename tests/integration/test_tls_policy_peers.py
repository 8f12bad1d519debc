"""Outbound TLS policy against a real receiving MTA (issue 17 item 6): another eqmail
instance, started as an admin starts it, listening on port 25 of a loopback address
with a certificate from a test CA — the peer a DANE or MTA-STS domain points its MX
at.  The sending side is eqmail's remote delivery (eqmail.delivery.remote, as the
remote worker calls it), resolving through tests/dnssec.py's validating unbound in front
of nsd serving signed zones.

Cases: DANE-EE matching the peer's key -> delivered into the peer's Maildir, the log
naming the TLSA record; a TLSA record of another key -> deferred, the peer never sees
a MAIL command; MTA-STS enforce with the peer's certificate valid for its MX name ->
delivered; the same peer under an MX name its certificate does not carry -> deferred.
Needs root (port 25, the peer's privilege separation) and nsd/unbound/ldns."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dnssec
import pytest
from certs import CA
from dnssec import DnssecWorld, Signing, tlsa_text
from harness import IS_ROOT, Instance, poll

from eqmail.control import load_controls
from eqmail.delivery import remote
from eqmail.delivery.tlspolicy import StsLookup, StsMode, StsPolicy
from eqmail.instance import Instance as EqInstance
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.queue import tcpto
from eqmail.queue.layout import QueuePaths
from eqmail.smtp.transport import TlsConfig
from eqmail.spp.bfrmtclient import run_chain

pytestmark = pytest.mark.skipif(not IS_ROOT or not dnssec.available(),
                                reason="needs root (port 25) and nsd, unbound, ldns-utils")

POLICY = "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmx: mx.stsbad.test\nmax_age: 86400\n"


class Policies:
    """What the policy worker would answer (its fetch is tested in test_mtasts_*.py)."""

    def lookup(self, domain: str) -> StsLookup:
        if domain in ("sts.test", "stsbad.test"):
            return StsLookup(StsPolicy(StsMode.ENFORCE, ("mx.sts.test", "mx.stsbad.test"),
                                       86400, "id1", POLICY, time.time()))
        return StsLookup(None)


@dataclass
class World:
    peer: Instance
    sender: Instance
    ip: str
    dns: DnssecWorld


def _peer_address() -> str:
    rng = random.Random()
    return f"127.{rng.randint(100, 250)}.{rng.randint(0, 255)}.{rng.randint(2, 250)}"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    ca = CA.create("eqmail TLS policy peers test CA")
    # the peer's certificate names mx.dane.test, mx.wrongkey.test and mx.sts.test — not
    # mx.stsbad.test, whose domain's MTA-STS policy then cannot be met
    issued = ca.server("mx.dane.test", "mx.wrongkey.test", "mx.sts.test")
    other = ca.server("mx.wrongkey.test")
    for _ in range(10):
        ip = _peer_address()
        peer = Instance.create(listen=f"smtp {ip}:25")
        (peer.root / "control" / "servercert.pem").write_bytes(issued.chain_and_key)
        peer.write_control("locals", "dane.test\nwrongkey.test\nsts.test\nstsbad.test\n")
        peer.write_control("rcpthosts", "dane.test\nwrongkey.test\nsts.test\nstsbad.test\n")
        try:
            peer.start()
            break
        except AssertionError:  # the address's port 25 is taken: another one
            peer.destroy()
    else:
        raise AssertionError("no free loopback address for the peer's port 25")
    records: dict[str, object] = {}
    for d in ("dane.test", "wrongkey.test", "sts.test", "stsbad.test"):
        records[d] = {"MX": [(10, f"mx.{d}")]}
        records[f"mx.{d}"] = {"A": [ip]}
    records["_25._tcp.mx.dane.test"] = {"TLSA": [tlsa_text(issued.cert)]}
    records["_25._tcp.mx.wrongkey.test"] = {"TLSA": [tlsa_text(other.cert)]}  # another key
    zones = {"dane.test": Signing.SECURE, "wrongkey.test": Signing.SECURE,
             "sts.test": Signing.INSECURE, "stsbad.test": Signing.INSECURE}
    dns = DnssecWorld(records, zones=zones).start()
    sender = Instance.create(listen=None)
    sender.write_control("dnsservers", dns.dnsservers)
    sender.write_control("dnssec", "1")
    (sender.root / "control" / "tlsca.pem").write_bytes(ca.pem)
    try:
        yield World(peer, sender, ip, dns)
    finally:
        dns.stop()
        peer.destroy()
        sender.destroy()


def deliver(world: World, msgid: int, rcpt: str) -> Outcome:
    root = world.sender.root
    job = remote.RemoteJob(load_controls(root), frozenset(),
                           tcpto.Tcpto(root / "queue" / "lock" / "tcpto"), remote.ConnectionCache(1),
                           TlsConfig(root / "control"), run_chain, None, Policies(), root)
    QueuePaths(root / "queue").mess(msgid).write_bytes(
        f"Subject: policy {msgid}\nMessage-ID: <{msgid}@policy.test>\n\nhello\n".encode())
    [outcome] = remote.deliver_batch(job, EqInstance(root), msgid, "sender@mx.test.example", [rcpt])
    return outcome


def _arrived(world: World, msgid: int) -> bool:
    return any(f"<{msgid}@policy.test>".encode() in p.read_bytes()
               for p in world.peer.maildir_files())


def test_dane_ee_matching_the_peers_key_delivers(world: World, capfd: pytest.CaptureFixture[str]) -> None:
    got = deliver(world, 9001, "testuser@dane.test")
    assert got.verdict is Verdict.SUCCESS and got.text.startswith(f"{world.ip} accepted message."), got
    poll(lambda: _arrived(world, 9001), 30, "the message in the peer's Maildir")
    err = capfd.readouterr().err
    assert f"remote: msg 9001 to dane.test: dane TLS to mx.dane.test [{world.ip}]: TLSA 3 1 1 " in err
    received = next(p for p in world.peer.maildir_files() if b"<9001@policy.test>" in p.read_bytes())
    assert b"with ESMTPS" in received.read_bytes()  # the peer's Received line: it was TLS
    assert "new msg" in world.peer.log()  # what the refused cases below must not show


def test_dane_with_another_keys_record_is_deferred_and_nothing_sent(world: World) -> None:
    before = world.peer.log()
    got = deliver(world, 9002, "testuser@wrongkey.test")
    assert got.verdict is Verdict.DEFERRAL, got
    assert got.text.startswith(f"Sorry, no MX host of wrongkey.test meets its TLS policy (dane): "
                               f"mx.wrongkey.test [{world.ip}]: certificate-not-trusted"), got
    time.sleep(0.5)
    assert not _arrived(world, 9002)
    assert "new msg" not in world.peer.log()[len(before):]  # the peer queued nothing


def test_mta_sts_enforce_with_a_valid_certificate_delivers(world: World) -> None:
    got = deliver(world, 9003, "testuser@sts.test")
    assert got.verdict is Verdict.SUCCESS, got
    poll(lambda: _arrived(world, 9003), 30, "the message in the peer's Maildir")


def test_mta_sts_enforce_with_a_certificate_for_other_names_is_deferred(world: World) -> None:
    got = deliver(world, 9004, "testuser@stsbad.test")
    assert got.verdict is Verdict.DEFERRAL, got
    assert got.text.startswith(f"Sorry, no MX host of stsbad.test meets its TLS policy "
                               f"(mta-sts enforce): mx.stsbad.test [{world.ip}]: "
                               "certificate-host-mismatch: received certificate for "), got
    time.sleep(0.5)
    assert not _arrived(world, 9004)
