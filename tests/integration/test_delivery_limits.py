"""Local delivery cannot hang the system (issue 12, item 14), with real processes: a
hung ``|program`` is killed with its whole process group after control/timeoutprogram
and deferred while other mail to the same user goes on; a scanner restart (a reload
that changes its controls, or kill -9) neither holds other mail back nor starts a
delivery that is still running a second time."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from harness import ME, Instance, dotqmail, group_members, poll, status
from smtpsink import SmtpSink

pytestmark = pytest.mark.timeout(150)

TESTUSER = f"testuser@{ME}"


def send(inst: Instance, rcpt: str, subject: str) -> None:
    res = inst.sendmail(["-f", TESTUSER, rcpt], f"Subject: {subject}\n\n{subject}\n".encode())
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)


def scanner_pid(inst: Instance) -> int | None:
    for w in status(inst)["workers"]:
        if w["kind"] == "scanner" and w["state"] == "running":
            return int(w["pid"])
    return None


def delivered_within(inst: Instance, count: int, seconds: float) -> float:
    """Seconds until ``count`` messages are in the test user's Maildir (at most ``seconds``)."""
    start = time.monotonic()
    inst.wait_for_mail(count, timeout=seconds)
    return time.monotonic() - start


def test_hung_program_is_killed_with_its_group_and_deferred(instance: Instance) -> None:
    instance.write_control("timeoutprogram", "2")
    instance.start()
    # shell and children ignore SIGTERM; one grandchild lets go of the output pipe
    dotqmail(instance, ".qmail-hang", "|trap '' TERM; echo $$ > hang.pgid; "
             "(exec >/dev/null 2>&1; sleep 100000) & sleep 100000\n")
    send(instance, f"testuser+hang@{ME}", "hang")
    pgid = int(poll(lambda: (instance.home / "hang.pgid").exists()
                    and (instance.home / "hang.pgid").read_text().strip(),
                    what="the hung program", inst=instance))
    assert group_members(pgid)
    # the same user's next message is delivered while the program hangs
    send(instance, TESTUSER, "meanwhile")
    delivered_within(instance, 1, 20)
    line = poll(lambda: re.search(r"delivery \d+: deferral: Timeout: program ran longer than 2 "
                                  r"seconds\. \(#4\.3\.0\)/", instance.log()),
                timeout=30, what="the deferral", inst=instance)
    assert line
    poll(lambda: not group_members(pgid), timeout=10, what="the process group gone", inst=instance)
    assert "testuser+hang" in instance.ctl("queue", "list").stdout  # deferred, still queued
    # the user's delivery process is healthy: more mail gets through
    send(instance, TESTUSER, "after")
    delivered_within(instance, 2, 20)
    assert re.search(r"^timeoutprogram: 2 +\[\S*control/timeoutprogram\]$",
                     instance.ctl("check").stdout, re.M)


SLOW = "|echo run >> runs.log; sleep 20; echo done >> runs.log\n"


def start_slow(inst: Instance) -> None:
    dotqmail(inst, ".qmail-slow", SLOW)
    send(inst, f"testuser+slow@{ME}", "slow")
    poll(lambda: (inst.home / "runs.log").exists(), what="the slow program", inst=inst)


def finish_slow(inst: Instance) -> None:
    poll(lambda: re.search(r"delivery \d+: success: did 0\+0\+1/", inst.log()), timeout=60,
         what="the slow delivery's success", inst=inst)
    inst.wait_queue_empty(timeout=30)
    inst.ctl("queue", "flush")
    time.sleep(1)
    assert (inst.home / "runs.log").read_text() == "run\ndone\n", inst.log()[-6000:]


def restart_scanner_and_send(inst: Instance, how: str) -> None:
    """Restart the scanner (``reload`` with a changed scanner control, or ``kill`` -9),
    send a message to the test user at once: it must arrive within seconds, not
    when the running program or SMTP transaction ends."""
    old = scanner_pid(inst)
    assert old is not None
    if how == "reload":
        inst.write_control("queuelifetime", "604801")  # a scanner control: it is replaced
        inst.ctl("reload")
    else:
        os.kill(old, signal.SIGKILL)
    start = time.monotonic()
    send(inst, TESTUSER, f"sent right after the {how}")
    inst.wait_for_mail(1, timeout=40)
    took = time.monotonic() - start
    assert took < 8, (took, inst.log()[-4000:])  # ~20 s when the scanner waits
    assert scanner_pid(inst) != old


def test_reload_that_restarts_the_scanner_keeps_mail_flowing_and_runs_a_program_once(
        running: Instance) -> None:
    start_slow(running)
    restart_scanner_and_send(running, "reload")
    assert (running.home / "runs.log").read_text() == "run\n"  # still running, not restarted
    finish_slow(running)


def test_kill_9_of_the_scanner_keeps_mail_flowing_and_runs_a_program_once(
        running: Instance) -> None:
    start_slow(running)
    restart_scanner_and_send(running, "kill")
    assert (running.home / "runs.log").read_text() == "run\n"
    finish_slow(running)


class SlowSink(SmtpSink):
    """Takes its time (20 s) before the 250 to the end of data."""

    def __init__(self) -> None:
        super().__init__()
        self.data_seen = 0

    def _reply(self, io, stage, normal):  # type: ignore[no-untyped-def]
        if stage == "final":
            self.data_seen += 1
            time.sleep(20)
        super()._reply(io, stage, normal)


@pytest.mark.parametrize("how", ["reload", "kill"])
def test_a_remote_delivery_running_across_a_scanner_restart_is_sent_once(
        instance: Instance, how: str) -> None:
    sink = SlowSink()
    port = sink.listen("127.0.0.1")
    try:
        instance.write_control("smtproutes", f"slow.example:[127.0.0.1]:{port}\n")
        instance.start()
        send(instance, "someone@slow.example", "remote")
        poll(lambda: sink.data_seen, what="the message at the slow server", inst=instance)
        restart_scanner_and_send(instance, how)
        poll(lambda: "accepted message./Remote host said: 250 ok" in instance.log(), timeout=60,
             what="the remote success", inst=instance)
        instance.wait_queue_empty(timeout=30)
        instance.ctl("queue", "flush")
        time.sleep(1)
        assert sink.data_seen == 1 and len(sink.transactions) == 1, instance.log()[-6000:]
    finally:
        sink.stop()
