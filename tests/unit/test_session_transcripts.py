"""Every tests/cases/smtp/*.txt transcript, replayed against the pure Session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smtp_transcript  # noqa: E402


@pytest.mark.parametrize("path", smtp_transcript.all_cases(), ids=lambda p: p.stem)
def test_transcript(path: Path) -> None:
    smtp_transcript.run_pure(smtp_transcript.load(path))


def test_transcripts_exist() -> None:
    assert len(smtp_transcript.all_cases()) >= 20


# ---- the qmail-spp hook API (effects a transcript cannot express) ---------------------

def _session(**config: str):
    t = smtp_transcript.Transcript("hooks", config={"plugins": "1", **config})
    session, _ = smtp_transcript.build_session(t)
    return session


def test_hook_effects() -> None:
    from eqmail.smtp import actions as a

    s = _session()
    assert s.start() == [a.RunHook(a.HookStage.CONNECTION, "")]
    out = s.hook_result(a.HookOutcome(
        headers=("X-Spp: one",), env=(("FOO", "1"), ("TCPREMOTEIP", None)),
        later=((a.HookStage.RCPT, b"550 later\r\n"),)))
    assert out == [a.Send(b"220 mx.example.org ESMTP\r\n")]
    assert s.env["FOO"] == "1" and "TCPREMOTEIP" not in s.env
    assert s.feed(b"HELO h\r\n") == [a.RunHook(a.HookStage.HELO, "h")]
    assert s.env["SMTPHELOHOST"] == "h"
    s.hook_result(a.HookOutcome())
    assert s.feed(b"MAIL FROM:<a@b>\r\n") == [a.RunHook(a.HookStage.MAIL, "a@b")]
    assert s.env["SMTPMAILFROM"] == "a@b"
    assert s.hook_result(a.HookOutcome(address="c@d")) == [a.Send(b"250 ok\r\n")]
    assert s.sender == "c@d"
    # the LR text rejects the next RCPT without running plugins
    assert s.feed(b"RCPT TO:<joe@example.org>\r\n") == [a.Send(b"550 later\r\n")]
    assert s.feed(b"RCPT TO:<joe@example.org>\r\n") == [
        a.RunHook(a.HookStage.RCPT, "joe@example.org")]
    assert s.env["SMTPRCPTCOUNTALL"] == "1" and s.env["SMTPRCPTCOUNT"] == "0"
    assert s.env["SMTPRCPTHOSTSOK"] == "1"
    s.hook_result(a.HookOutcome())
    assert s.feed(b"DATA\r\n") == [a.RunHook(a.HookStage.DATA, "")]
    out = s.hook_result(a.HookOutcome(disable=True))
    begin = out[0]
    assert isinstance(begin, a.BeginMessage)
    assert begin.header_prefix.endswith(b"\nX-Spp: one\n")
    assert begin.sender == "c@d" and begin.recipients == ("joe@example.org",)
    # plugins were disabled: no more hooks
    out = s.feed(b".\r\n")
    assert out[-1] == a.EndMessage()
    assert s.feed(b"HELO again\r\n") == []  # waiting for the queue: buffered
    out = s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=7))
    assert a.Send(b"250 ok 1700000000 qp 7\r\n250 mx.example.org\r\n") in out


def test_auth_hook_reject_keeps_client_unauthenticated() -> None:
    from eqmail.smtp import actions as a

    s = _session(auth="1")
    s.hook_result(a.HookOutcome())  # connection
    out = s.feed(b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n")
    assert out == [a.CheckPassword("plain", b"joe", b"secret", b"")]
    assert s.auth_result(True) == [a.RunHook(a.HookStage.AUTH, "joe")]
    assert s.env["SMTPAUTHUSER"] == "joe" and s.env["SMTPAUTHMETHOD"] == "plain"
    out = s.hook_result(a.HookOutcome(a.HookVerdict.REJECT, output=b"535 no\r\n"))
    assert out == [a.Send(b"535 no\r\n")]
    assert not s.authenticated and "RELAYCLIENT" not in s.env


def test_late_results_are_ignored() -> None:
    from eqmail.smtp import actions as a

    s = _session(plugins="0")
    s.start()
    assert s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED)) == []
    assert s.auth_result(True) == []
    assert s.hook_result(a.HookOutcome()) == []
