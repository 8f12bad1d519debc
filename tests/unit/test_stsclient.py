"""The remote worker's client of run/policy.sock (eqmail.delivery.stsclient): what an
answer means, the short cache, and a worker that is down or talks nonsense."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from eqmail.delivery.stsclient import StsClient, to_lookup
from eqmail.delivery.tlspolicy import ResultType, StsLookup, StsMode
from eqmail.ipc.policy import (
    ANSWER,
    REQUEST,
    LookupAnswer,
    LookupRequest,
    PolicyText,
    read_frame,
    write_frame,
)

POLICY = "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 3600\n"


def test_answers_mean_lookups() -> None:
    got = to_lookup(LookupAnswer(PolicyText("one", 5.0, POLICY)))
    assert got.policy is not None and got.failure is None
    assert (got.policy.mode, got.policy.mx, got.policy.id, got.policy.fetched) == (
        StsMode.ENFORCE, ("mx.example.test",), "one", 5.0)
    assert to_lookup(LookupAnswer(None, "sts-webpki-invalid", "x")) == StsLookup(
        None, ResultType.STS_WEBPKI_INVALID, "x")
    assert to_lookup(LookupAnswer(None, "no-such-type", "")).failure is ResultType.STS_POLICY_FETCH_ERROR
    bad = to_lookup(LookupAnswer(PolicyText("one", 5.0, "nonsense")))
    assert (bad.policy, bad.failure) == (None, ResultType.STS_POLICY_INVALID)
    none = to_lookup(LookupAnswer(PolicyText("one", 5.0, "version: STSv1\nmode: none\nmax_age: 9\n")))
    assert none.policy is None


class Worker:
    """A stand-in policy worker on a real Unix socket, counting the questions."""

    def __init__(self, path: Path, answer: bytes, kind: bytes = ANSWER) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.asked: list[str] = []
        self.answer, self.kind = answer, kind
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.asked.append(LookupRequest.decode(read_frame(conn, REQUEST)).domain)
                if self.answer:
                    write_frame(conn, self.kind, self.answer)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "policy.sock"


def test_a_lookup_and_the_cache(sock_path: Path) -> None:
    w = Worker(sock_path, LookupAnswer(PolicyText("one", 1e12, POLICY)).encode())
    c = StsClient(sock_path, 2.0)
    first = c.lookup("Example.Test")
    assert first.policy is not None and first.policy.id == "one"
    assert c.lookup("example.test.") == first and w.asked == ["example.test"]
    assert StsClient(sock_path, 2.0, cache_seconds=0).lookup("example.test") == first
    assert w.asked == ["example.test", "example.test"]
    assert c.lookup("[10.0.0.1]") == StsLookup(None) and len(w.asked) == 2


def test_a_worker_that_is_down_slow_or_broken_is_no_policy(sock_path: Path) -> None:
    down = StsClient(sock_path, 1.0).lookup("example.test")
    assert (down.policy, down.failure) == (None, ResultType.STS_POLICY_FETCH_ERROR)
    assert "unavailable" in down.detail
    w = Worker(sock_path, b"")  # answers nothing: the client's time bound
    slow = StsClient(sock_path, 0.5).lookup("example.test")
    assert (slow.policy, slow.failure) == (None, ResultType.STS_POLICY_FETCH_ERROR)
    w.answer = b"{not json"
    c = StsClient(sock_path, 1.0)
    assert c.lookup("example.test").failure is ResultType.STS_POLICY_FETCH_ERROR
    w.answer = LookupAnswer(None).encode()
    assert c.lookup("example.test") == StsLookup(None)  # failures were not cached
