"""``|program`` deliveries cannot hang local delivery: control/timeoutprogram kills the
program's whole process group and defers, and a background child that keeps the output
pipe open does not hold the delivery (eqmail.delivery.local, real /bin/sh processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from harness import group_members, poll

from eqmail.delivery.local import LocalJob, Report, deliver
from eqmail.ipc.delivery import Verdict

pytestmark = pytest.mark.timeout(60)


def no_forward(*_args: object) -> tuple[Verdict, str, int | None]:
    raise AssertionError("no forward expected")


def run_program(tmp_path: Path, line: str, limit: float) -> tuple[Report, float]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / ".qmail").write_text(line + "\n")
    os.chmod(home / ".qmail", 0o600)
    (tmp_path / "mess").write_bytes(b"Subject: hi\n\nbody\n")
    job = LocalJob("joe", str(home), "joe", "", "", "example.org", "a@b.example", "./Maildir/")
    start = time.monotonic()
    with open(tmp_path / "mess", "rb") as msg:
        report = deliver(job, msg, no_forward, program_limit=limit)
    return report, time.monotonic() - start


def test_hung_program_group_is_killed_and_deferred(tmp_path: Path) -> None:
    # The shell and its children ignore SIGTERM; one grandchild lets go of the output
    # pipe, another keeps it: all of them must be gone, and the delivery deferred.
    line = ("|trap '' TERM; echo $$ > pgid; echo partial output; "
            "(exec >/dev/null 2>&1; sleep 100000) & sleep 100000 & sleep 100000")
    report, took = run_program(tmp_path, line, limit=1)
    assert report.kind is Verdict.DEFERRAL
    assert report.text == ("partial output\n"
                           "Timeout: program ran longer than 1 seconds. (#4.3.0)\n")
    assert 1 <= took < 15, took  # the limit, the SIGTERM grace, then SIGKILL
    pgid = int((tmp_path / "home" / "pgid").read_text())
    # SIGKILL has been sent to the group; a killed process may take a moment to exit
    poll(lambda: group_members(pgid) == [], timeout=5, what="the killed process group gone")


def test_program_that_exits_within_the_limit_is_not_touched(tmp_path: Path) -> None:
    report, _ = run_program(tmp_path, "|sleep 0.3; echo fine", limit=5)
    assert report == Report(Verdict.SUCCESS, "fine\ndid 0+0+1\n")


def test_background_child_holding_the_pipe_does_not_hold_the_delivery(tmp_path: Path) -> None:
    # qmail-local would read the pipe until the background sleep ends; here the
    # delivery ends shortly after the program itself, with its exit status.
    line = "|echo $$ > pgid; sleep 100000 & echo started; exit 0"
    report, took = run_program(tmp_path, line, limit=100)
    try:
        assert report == Report(Verdict.SUCCESS, "started\ndid 0+0+1\n")
        assert took < 10, took
    finally:
        pgid = int((tmp_path / "home" / "pgid").read_text())
        for pid in group_members(pgid):
            os.kill(pid, 9)


def test_exit_status_still_decides_after_a_background_child(tmp_path: Path) -> None:
    report, took = run_program(tmp_path, "|echo $$ > pgid; sleep 100000 & exit 100", limit=100)
    try:
        assert report.kind is Verdict.FAILURE and took < 10
    finally:
        for pid in group_members(int((tmp_path / "home" / "pgid").read_text())):
            os.kill(pid, 9)
