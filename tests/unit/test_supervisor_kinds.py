"""The table of worker kinds (eqmail.supervisor.kinds) and the restart policy
(eqmail.supervisor.policy): complete, checked, and the back-off as documented."""

from __future__ import annotations

import dataclasses
import signal

import pytest
from harness import parsed_controls
from hypothesis import given
from hypothesis import strategies as st

from eqmail.control.assign import Assign
from eqmail.privsep.ids import Role
from eqmail.supervisor import kinds
from eqmail.supervisor.kinds import (
    KINDS,
    OnReload,
    Restart,
    StartFailure,
    check_table,
    controls_changed,
    entry_point,
)
from eqmail.supervisor.policy import MAX_DELAY, STABLE_AFTER, RestartState
from eqmail.supervisor.worker import Worker, WorkerState
from eqmail.workers.base import (
    ListenerSettings,
    LocalSettings,
    QueueWriterSettings,
    WorkerKind,
)

ROWS = tuple(KINDS.values())


def test_every_kind_has_a_row_with_its_own_settings_class() -> None:
    assert set(KINDS) == set(WorkerKind)
    for kind, row in KINDS.items():
        assert row.kind is kind
        assert row.settings.__name__.lower().startswith(row.module)  # ListenerSettings: listener


def test_who_runs_as_whom() -> None:
    """Least privilege, per DESIGN §1: only the local spawner stays root."""
    assert {k: r.role for k, r in KINDS.items()} == {
        WorkerKind.LOGGER: Role.LOG, WorkerKind.QUEUEWRITER: Role.QUEUE, WorkerKind.LOCAL: None,
        WorkerKind.REMOTE: Role.REMOTE, WorkerKind.SANDBOX: Role.PLUGIN, WorkerKind.SCANNER: Role.SEND,
        WorkerKind.WATCHER: Role.LOG, WorkerKind.LISTENER: Role.DAEMON, WorkerKind.POLICY: Role.POLICY}


def test_every_kind_is_restarted_and_only_remote_may_fail_to_start() -> None:
    assert all(r.restart is Restart.BACKOFF for r in ROWS)
    assert all(r.ready_timeout == 30.0 for r in ROWS)
    assert {r.kind for r in ROWS if r.start_failure is StartFailure.WAIT} == {
        WorkerKind.REMOTE, WorkerKind.POLICY}


def test_stop_order_and_delivery_niceness() -> None:
    phases: dict[int, set[WorkerKind]] = {}
    for r in ROWS:
        phases.setdefault(r.stop_phase, set()).add(r.kind)
    assert [phases[i] for i in sorted(phases)] == [
        {WorkerKind.LISTENER, WorkerKind.WATCHER}, {WorkerKind.SCANNER},
        {WorkerKind.LOCAL, WorkerKind.REMOTE, WorkerKind.QUEUEWRITER}, {WorkerKind.SANDBOX, WorkerKind.POLICY},
        {WorkerKind.LOGGER}]
    assert kinds.STOP_PHASES == 5
    assert {r.kind for r in ROWS if r.nice} == {WorkerKind.SCANNER, WorkerKind.LOCAL, WorkerKind.REMOTE}


def test_reload_rules() -> None:
    assert {r.kind for r in ROWS if r.on_reload is OnReload.REPLACE} == {
        WorkerKind.SCANNER, WorkerKind.LOCAL, WorkerKind.REMOTE, WorkerKind.SANDBOX, WorkerKind.POLICY}
    assert KINDS[WorkerKind.LISTENER].on_reload is OnReload.LISTENER_DIFF
    assert KINDS[WorkerKind.SCANNER].handover is signal.SIGUSR1
    assert all(r.handover is signal.SIGTERM for r in ROWS if r.kind is not WorkerKind.SCANNER)


def test_a_misspelt_control_is_refused_not_ignored() -> None:
    bad = dataclasses.replace(KINDS[WorkerKind.SCANNER], reload_controls=("me", "queuelifetme"))
    with pytest.raises(ValueError, match="no such control: queuelifetme"):
        check_table(tuple(KINDS[k] if k is not WorkerKind.SCANNER else bad for k in KINDS))


def test_a_missing_or_doubled_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="without a row: watcher"):
        check_table(tuple(r for r in ROWS if r.kind is not WorkerKind.WATCHER))
    with pytest.raises(ValueError, match="listed twice"):
        check_table((*ROWS, KINDS[WorkerKind.LOGGER]))


def test_replaced_exactly_when_controls_are_named() -> None:
    no_controls = dataclasses.replace(KINDS[WorkerKind.SANDBOX], reload_controls=())
    with pytest.raises(ValueError, match="exactly when"):
        check_table(tuple(no_controls if r.kind is WorkerKind.SANDBOX else r for r in ROWS))
    kept_with_controls = dataclasses.replace(KINDS[WorkerKind.LOGGER], reload_controls=("me",))
    with pytest.raises(ValueError, match="exactly when"):
        check_table(tuple(kept_with_controls if r.kind is WorkerKind.LOGGER else r for r in ROWS))


def test_only_the_local_spawner_stays_root() -> None:
    as_root = dataclasses.replace(KINDS[WorkerKind.LISTENER], role=None)
    with pytest.raises(ValueError, match="only the local spawner may stay root"):
        check_table(tuple(as_root if r.kind is WorkerKind.LISTENER else r for r in ROWS))


def test_controls_changed() -> None:
    old = parsed_controls()
    assert controls_changed(WorkerKind.SCANNER, old, dataclasses.replace(old, queuelifetime=1))
    assert not controls_changed(WorkerKind.SCANNER, old, dataclasses.replace(old, databytes=1))
    assert controls_changed(WorkerKind.SANDBOX, old, dataclasses.replace(old, spptimeout=5))
    # issue 17: turning DANE or MTA-STS on or off, or a new control/tlsca.pem, must reach
    # the remote worker on a reload (it decides each delivery's TLS policy)
    for name in ("dnssec", "mtasts", "tlsca"):
        flipped = dataclasses.replace(old, **{name: not getattr(old, name)})
        assert controls_changed(WorkerKind.REMOTE, old, flipped), name
    assert controls_changed(WorkerKind.LOCAL, old, dataclasses.replace(old, assign=Assign.parse("+:u:1:1:/h:::\n.\n")))
    # kept kinds and listeners never through this rule
    assert not controls_changed(WorkerKind.LOGGER, old, dataclasses.replace(old, me="b.example"))
    assert not controls_changed(WorkerKind.LISTENER, old, dataclasses.replace(old, me="b.example"))


def test_entry_points_are_each_modules_run() -> None:
    for kind in WorkerKind:
        run = entry_point(kind)
        assert run.__name__ == "run" and run.__module__ == f"eqmail.workers.{KINDS[kind].module}"


def test_a_worker_record_takes_only_its_kinds_settings() -> None:
    w = Worker(WorkerKind.LOCAL, "local delivery", LocalSettings(5), keep_fds=(5,))
    assert w.state is WorkerState.STARTING and w.policy is KINDS[WorkerKind.LOCAL]
    assert w.title == "eqmail: local delivery"
    with pytest.raises(TypeError, match="local needs LocalSettings, not QueueWriterSettings"):
        Worker(WorkerKind.LOCAL, "local delivery", QueueWriterSettings(5))
    with pytest.raises(TypeError):
        Worker(WorkerKind.LISTENER, "listener", LocalSettings(5))
    assert ListenerSettings.__dataclass_params__.frozen  # type: ignore[attr-defined]


# ------------------------------------------------------------------ restart policy


def test_backoff_doubles_to_the_cap() -> None:
    r = RestartState()
    r.on_start(1000.0)
    delays = []
    now = 1000.0
    for _ in range(9):
        now += 1.0  # dies a second after each start
        delays.append(r.on_exit(now))
        r.on_start(now + delays[-1])
        now += delays[-1]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_DELAY, MAX_DELAY]
    assert r.restarts == 9


def test_a_stable_run_forgives_past_crashes() -> None:
    r = RestartState()
    r.on_start(0.0)
    assert [r.on_exit(1.0), r.on_exit(2.0), r.on_exit(3.0)] == [0.0, 1.0, 2.0]
    r.on_start(10.0)
    assert r.on_exit(10.0 + STABLE_AFTER) == 0.0  # up long enough: a fresh start
    r.on_start(50.0)
    assert r.on_exit(51.0) == 1.0


@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=30))
def test_delays_are_bounded_and_grow_only_within_a_crash_loop(uptimes: list[float]) -> None:
    r = RestartState()
    now = 1.0
    r.on_start(now)
    started = now
    previous = None
    for up in uptimes:
        now += up
        delay = r.on_exit(now)
        assert 0.0 <= delay <= MAX_DELAY
        # the uptime as the policy sees it: `up` itself can differ by a rounding error
        if now - started >= STABLE_AFTER:
            assert delay == 0.0  # a stable run starts the count again
        elif previous is not None:
            assert delay >= previous and delay <= max(1.0, 2 * previous)
        previous = delay
        now += delay
        r.on_start(now)
        started = now
    assert r.restarts == len(uptimes)


def test_first_start_is_not_a_restart() -> None:
    r = RestartState()
    r.on_start(5.0)
    assert r.restarts == 0 and r.started_at == 5.0
    r.on_start(6.0)
    assert r.restarts == 1
