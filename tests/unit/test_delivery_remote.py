"""qmail-remote as a library (eqmail.delivery.remote), the parts decided before any DNS
or SMTP: the message is found through the queue layout, a message that cannot be read
is a deferral for every recipient, a partial final line bounces, and the TLS name of a
relay given as an address.  The SMTP conversation itself is tested live in
tests/integration/test_remote*.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from eqmail.control import load_controls
from eqmail.delivery.remote import ConnectionCache, RemoteJob, deliver_batch, relay_tls_name
from eqmail.instance import Instance
from eqmail.ipc.delivery import REPORT_MAX, Outcome, Verdict
from eqmail.queue import tcpto
from eqmail.queue.layout import create_queue
from eqmail.smtp.transport import TlsConfig
from eqmail.spp.bfrmtclient import run_chain


def _job(root: Path) -> tuple[RemoteJob, Instance]:
    (root / "control").mkdir(parents=True)
    (root / "control" / "me").write_text("client.test\n")
    instance = Instance(root)
    create_queue(instance.queue)
    job = RemoteJob(load_controls(root), frozenset(), tcpto.Tcpto(instance.queue / "lock" / "tcpto"),
                    ConnectionCache(1), TlsConfig(instance.control), run_chain)
    return job, instance


def test_an_unreadable_message_defers_every_recipient(tmp_path: Path) -> None:
    job, instance = _job(tmp_path)
    assert deliver_batch(job, instance, 4711, "s@client.test", ["a@x.test", "b@x.test"]) == [
        Outcome(Verdict.DEFERRAL, "Unable to read message. (#4.3.0)\n")] * 2


def test_a_partial_final_line_bounces_before_any_lookup(tmp_path: Path) -> None:
    job, instance = _job(tmp_path)
    mess = instance.queue / "mess" / str(4711 % 23) / "4711"
    mess.write_bytes(b"Subject: x\n\nno newline at the end")
    assert deliver_batch(job, instance, 4711, "s@client.test", ["a@x.test"]) == [
        Outcome(Verdict.FAILURE, "SMTP cannot transfer messages with partial final lines. (#5.6.2)\n")]


def test_the_tls_name_of_a_relay_given_as_an_address() -> None:
    assert relay_tls_name("[127.0.0.1]") == "127.0.0.1"
    assert relay_tls_name("127.0.0.1") == "127.0.0.1"
    assert relay_tls_name("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert relay_tls_name("relay.example") == ""


def test_a_hook_failure_is_the_outcome_cut_to_a_report(tmp_path: Path) -> None:
    """What the before-remote chain answers for a recipient is that recipient's outcome,
    its text cut to what a delivery report carries (REPORT_MAX bytes with the verdict)."""
    job, instance = _job(tmp_path)
    (tmp_path / "control" / "beforemote").write_text("cat\n")
    long = Outcome(Verdict.FAILURE, "x" * 20000 + "\n")
    asked: list[str] = []

    def hooks(commands: tuple[str, ...], host: str, sender: str, rcpt: str, *_: object) -> Outcome:
        asked.append(rcpt)
        return long if rcpt.startswith("a@") else Outcome(Verdict.DEFERRAL, "later\n")

    job = replace(job, controls=load_controls(tmp_path), run_hooks=hooks)
    (instance.queue / "mess" / str(4711 % 23) / "4711").write_bytes(b"Subject: x\n\nbody\n")
    assert deliver_batch(job, instance, 4711, "s@client.test", ["a@x.test", "b@x.test"]) == [
        Outcome(Verdict.FAILURE, "x" * (REPORT_MAX - 1)), Outcome(Verdict.DEFERRAL, "later\n")]
    assert asked == ["a@x.test", "b@x.test"]
