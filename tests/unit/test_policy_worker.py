"""The policy worker's own logic (eqmail.workers.policy): the hourly TLS-RPT call goes
on whatever it raises, and a lookup that raises is answered "no policy"."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from harness import parsed_controls

from eqmail.control import Controls
from eqmail.instance import Instance
from eqmail.ipc.policy import LookupAnswer
from eqmail.privsep.ids import SystemIds
from eqmail.workers.base import PolicySettings, WorkerContext, WorkerKind
from eqmail.workers.policy import PolicyServer, tlsrpt_loop


def context(tmp_path: Path) -> WorkerContext[PolicySettings]:
    return WorkerContext(WorkerKind.POLICY, "policy", Instance(tmp_path), parsed_controls(),
                         SystemIds.current_user(), 1, PolicySettings(-1))


def test_the_tlsrpt_call_survives_its_exceptions(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ctx = context(tmp_path)
    stop = threading.Event()
    calls: list[float] = []

    def send_due(instance: Instance, controls: Controls, now: float) -> int:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("report store broken")
        if len(calls) == 3:
            stop.set()
        return 2

    t = threading.Thread(target=tlsrpt_loop, args=(ctx, stop, 0.0, 0.01, send_due))
    t.start()
    t.join(10)
    assert not t.is_alive() and len(calls) == 3 and calls == sorted(calls)
    err = capfd.readouterr().err
    assert "warning: policy: sending TLS-RPT reports failed: RuntimeError('report store broken')" in err
    assert "policy: mailed 2 TLS-RPT report(s)" in err


def test_a_lookup_that_raises_is_no_policy(capfd: pytest.CaptureFixture[str]) -> None:
    class Broken:
        def lookup(self, domain: str) -> LookupAnswer:
            raise KeyError(domain)

    server = PolicyServer(None, Broken(), None)  # type: ignore[arg-type]
    assert server.answer("example.test") == LookupAnswer(
        None, "sts-policy-fetch-error", "MTA-STS policy lookup failed")
    assert "warning: policy: lookup of example.test failed: KeyError('example.test')" in capfd.readouterr().err
    assert PolicyServer(None, None, None).answer("example.test") == LookupAnswer(None)  # type: ignore[arg-type]
