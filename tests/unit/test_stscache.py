"""The policy worker's discovery and cache (eqmail.workers.stscache.Policies, RFC 8461
§5.1) over a real directory, with the TXT answers and the fetched bodies given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eqmail.delivery.mtasts import StsError, fetch_error
from eqmail.delivery.tlspolicy import ResultType
from eqmail.dns import LookupHard, LookupSoft
from eqmail.ipc.policy import PolicyText
from eqmail.workers import stscache
from eqmail.workers.stscache import DiskCache, Policies

POLICY = b"version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 3600\n"
TESTING = b"version: STSv1\nmode: testing\nmx: mx.example.test\nmax_age: 3600\n"


class World:
    """The DNS and the web as the worker sees them."""

    def __init__(self) -> None:
        self.txt: dict[str, list[bytes] | Exception] = {}
        self.bodies: dict[str, bytes | StsError] = {}
        self.fetches: list[str] = []
        self.now = 1_000_000.0

    def resolver(self) -> World:
        return self

    def txt_lookup(self, name: str) -> list[bytes]:
        got = self.txt.get(name, LookupHard("NXDOMAIN"))
        if isinstance(got, Exception):
            raise got
        return got

    def fetch(self, domain: str) -> bytes | StsError:
        self.fetches.append(domain)
        return self.bodies.get(domain, fetch_error("unreachable"))


class FakeResolver:
    def __init__(self, world: World) -> None:
        self.world = world

    def txt(self, name: str) -> list[bytes]:
        return self.world.txt_lookup(name)


@pytest.fixture
def world() -> World:
    return World()


def policies(world: World, directory: Path) -> Policies:
    return Policies(DiskCache(directory), lambda: FakeResolver(world),  # type: ignore[arg-type,return-value]
                    world.fetch, clock=lambda: world.now)


def test_fetched_cached_on_disk_and_reused(world: World, tmp_path: Path) -> None:
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=one"]
    world.bodies["example.test"] = POLICY
    p = policies(world, tmp_path)
    a = p.lookup("Example.Test.")
    assert a.policy == PolicyText("one", world.now, POLICY.decode()) and a.failure is None
    assert p.lookup("example.test") == a and world.fetches == ["example.test"]
    # on disk: a new worker (a restart) uses it without fetching
    assert DiskCache(tmp_path).load("example.test") == a.policy
    assert policies(world, tmp_path).lookup("example.test").policy == a.policy
    assert world.fetches == ["example.test"]
    assert sorted(os.listdir(tmp_path)) == ["example.test"]


def test_a_new_id_is_fetched_and_a_failed_refresh_keeps_the_cache(world: World, tmp_path: Path) -> None:
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=one"]
    world.bodies["example.test"] = POLICY
    p = policies(world, tmp_path)
    first = p.lookup("example.test").policy
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=two"]
    world.bodies["example.test"] = TESTING
    world.now += 10
    got = p.lookup("example.test")
    assert got.policy == PolicyText("two", world.now, TESTING.decode())
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=three"]
    world.bodies["example.test"] = b"garbage"
    kept = p.lookup("example.test")
    assert kept.policy == got.policy and kept.failure is None
    assert "refresh failed" in kept.detail and first is not None


def test_nothing_cached_and_the_fetch_fails(world: World, tmp_path: Path) -> None:
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=one"]
    world.bodies["example.test"] = StsError(ResultType.STS_WEBPKI_INVALID, "bad certificate")
    p = policies(world, tmp_path)
    a = p.lookup("example.test")
    assert (a.policy, a.failure, a.detail) == (None, "sts-webpki-invalid", "bad certificate")
    # not retried for the same id for a while: one timeout, not one per message
    assert p.lookup("example.test") == a and world.fetches == ["example.test"]
    world.bodies["example.test"] = b"version: STSv1\nmode: enforce\nmax_age: 1\n"
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=two"]
    b = p.lookup("example.test")
    assert (b.policy, b.failure) == (None, "sts-policy-invalid")
    assert os.listdir(tmp_path) == []


def test_no_txt_record_means_no_policy_unless_one_is_cached(world: World, tmp_path: Path) -> None:
    p = policies(world, tmp_path)
    assert p.lookup("example.test").policy is None and world.fetches == []
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=one"]
    world.bodies["example.test"] = POLICY
    cached = p.lookup("example.test").policy
    del world.txt["_mta-sts.example.test"]
    assert p.lookup("example.test").policy == cached      # TXT gone: kept while unexpired
    world.txt["_mta-sts.example.test"] = LookupSoft("SERVFAIL")
    assert p.lookup("example.test").policy == cached      # DNS down: kept too
    world.now += 3600
    del world.txt["_mta-sts.example.test"]
    assert p.lookup("example.test").policy is None        # expired: gone, file removed
    assert os.listdir(tmp_path) == []


def test_an_expired_policy_is_fetched_again(world: World, tmp_path: Path) -> None:
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=one"]
    world.bodies["example.test"] = POLICY
    p = policies(world, tmp_path)
    p.lookup("example.test")
    world.now += 3600
    assert p.lookup("example.test").policy is not None and len(world.fetches) == 2
    world.now += 3600
    world.bodies["example.test"] = fetch_error("timed out")
    a = p.lookup("example.test")  # expired and no new one: no policy, and why
    assert (a.policy, a.failure) == (None, "sts-policy-fetch-error")


def test_mode_none_is_no_policy(world: World, tmp_path: Path) -> None:
    world.txt["_mta-sts.example.test"] = [b"v=STSv1; id=one"]
    world.bodies["example.test"] = b"version: STSv1\nmode: none\nmax_age: 60\n"
    a = policies(world, tmp_path).lookup("example.test")
    assert (a.policy, a.failure) == (None, None)
    assert (tmp_path / "example.test").exists()  # remembered: no fetch until the id changes


def test_names_that_are_not_domains_are_never_looked_up(world: World, tmp_path: Path) -> None:
    p = policies(world, tmp_path)
    for name in ("[10.0.0.1]", "../etc", "a/b.test", "localhost", ".test"):
        assert p.lookup(name).policy is None
    assert world.fetches == [] and os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        DiskCache(tmp_path).save("../x.test", PolicyText("a", 0.0, ""))


def test_broken_and_leftover_files(world: World, tmp_path: Path) -> None:
    (tmp_path / "example.test").write_bytes(b"\x00garbage")
    (tmp_path / ".tmp-example.test").write_bytes(b"half")
    cache = DiskCache(tmp_path)
    cache.clean()
    assert cache.load("example.test") is None and os.listdir(tmp_path) == ["example.test"]
    (tmp_path / "big.test").write_bytes(b"x" * (stscache.MAX_FILE + 1))
    assert cache.load("big.test") is None
    os.symlink("/etc/passwd", tmp_path / "link.test")
    assert cache.load("link.test") is None
