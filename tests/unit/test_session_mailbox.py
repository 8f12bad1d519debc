"""The RCPT check in the pure session (control/rcptchecklocal): when it is asked, in
which order with the relay check, RELAYCLIENT and [rcpt] plugins, and what the client
sees."""

from __future__ import annotations

from collections.abc import Callable

from eqmail.smtp import actions as a
from eqmail.smtp import replies
from eqmail.smtp.policy import RcptHosts
from eqmail.smtp.session import Session, SessionConfig

KNOWN = {"joe@example.org", "postmaster", "friend@remote.example"}


class Driver:
    """Performs a session's actions; CheckMailbox answers from KNOWN and is recorded."""

    def __init__(self, check: bool = True, plugins: bool = False, env: dict[str, str] | None = None,
                 hook: Callable[[a.RunHook], a.HookOutcome] | None = None) -> None:
        cfg = SessionConfig(greeting="mx.example", local_host="mx.example", databytes=0,
                            rcpthosts=RcptHosts.from_lines(["example.org"]), utcoffset=0,
                            plugins_enabled=plugins, check_mailbox=check)
        self.s = Session(cfg, {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALPORT": "25", **(env or {})},
                         lambda: 1e9)
        self.hook = hook or (lambda _action: a.HookOutcome())
        self.asked: list[str] = []
        self.logs: list[str] = []
        self.envelopes: list[tuple[str, tuple[str, ...]]] = []
        self.out = bytearray()
        self.run(self.s.start())
        self.out.clear()

    def run(self, actions: list[a.Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, a.Send):
                self.out += action.data
            elif isinstance(action, a.Log):
                self.logs.append(action.line)
            elif isinstance(action, a.CheckMailbox):
                self.asked.append(action.address)
                pending[:0] = self.s.mailbox_result(action.address in KNOWN)
            elif isinstance(action, a.RunHook):
                pending[:0] = self.s.hook_result(self.hook(action))
            elif isinstance(action, a.BeginMessage):
                self.envelopes.append((action.sender, action.recipients))
            elif isinstance(action, a.EndMessage):
                pending[:0] = self.s.queue_result(a.QueueOutcome(a.QueueStatus.ACCEPTED, qp=1))

    def say(self, data: bytes) -> list[bytes]:
        self.out.clear()
        self.run(self.s.feed(data))
        return bytes(self.out).splitlines()


NO = replies.NO_MAILBOX.wire().rstrip(b"\r\n")


def test_unknown_local_recipient_gets_550_and_is_not_queued() -> None:
    d = Driver()
    got = d.say(b"MAIL FROM:<s@client.example>\r\nRCPT TO:<nobody@example.org>\r\n"
                b"RCPT TO:<joe@example.org>\r\nRCPT TO:<postmaster>\r\nDATA\r\nhi\r\n.\r\n")
    assert got[:4] == [b"250 ok", b"550 sorry, no mailbox here by that name (#5.1.1)",
                       b"250 ok", b"250 ok"]
    assert got[4].startswith(b"354") and got[5].startswith(b"250 ok")
    assert d.asked == ["nobody@example.org", "joe@example.org", "postmaster"]
    assert d.envelopes == [("s@client.example", ("joe@example.org", "postmaster"))]
    assert d.logs[0] == ("qmail-smtpd: no mailbox: s@client.example from 192.0.2.1 "
                         "to nobody@example.org helo (null)")


def test_relay_refusal_comes_first_and_asks_nothing() -> None:
    d = Driver()
    got = d.say(b"MAIL FROM:<>\r\nRCPT TO:<x@remote.example>\r\n")
    assert got[1] == replies.NO_RCPTHOSTS.wire().rstrip(b"\r\n") and d.asked == []


def test_relay_clients_are_checked_too_with_their_suffix() -> None:
    # the lookup decides for remote addresses itself (not local: accepted), so a relay
    # client's local recipients are still checked
    d = Driver(env={"RELAYCLIENT": ""})
    got = d.say(b"MAIL FROM:<>\r\nRCPT TO:<friend@remote.example>\r\nRCPT TO:<nobody@example.org>\r\n")
    assert got[1:] == [b"250 ok", NO]
    assert d.asked == ["friend@remote.example", "nobody@example.org"]


def test_check_off_is_qmails_accept_everything() -> None:
    d = Driver(check=False)
    got = d.say(b"MAIL FROM:<>\r\nRCPT TO:<nobody@example.org>\r\n")
    assert got[1] == b"250 ok" and d.asked == []


def test_rcpt_plugins_run_first_their_address_is_checked_and_O_skips_the_check() -> None:
    def hook(action: a.RunHook) -> a.HookOutcome:
        if action.stage is not a.HookStage.RCPT:
            return a.HookOutcome()
        if action.arg == "vip@example.org":
            return a.HookOutcome(a.HookVerdict.OK_SKIP)
        if action.arg == "rewrite@example.org":
            return a.HookOutcome(address="joe@example.org")
        if action.arg == "spam@example.org":
            return a.HookOutcome(a.HookVerdict.REJECT, output=b"550 go away\r\n")
        return a.HookOutcome()

    d = Driver(plugins=True, hook=hook)
    got = d.say(b"MAIL FROM:<s@c.example>\r\nRCPT TO:<vip@example.org>\r\n"
                b"RCPT TO:<rewrite@example.org>\r\nRCPT TO:<spam@example.org>\r\n"
                b"RCPT TO:<nobody@example.org>\r\n")
    assert got[1:] == [b"250 ok", b"250 ok", b"550 go away", NO]
    assert d.asked == ["joe@example.org", "nobody@example.org"]


def test_pipelined_commands_wait_for_the_lookup_and_keep_their_order() -> None:
    cfg = SessionConfig(greeting="mx.example", local_host="mx.example", databytes=0,
                        rcpthosts=RcptHosts.from_lines(["example.org"]), check_mailbox=True)
    s = Session(cfg, {"TCPREMOTEIP": "192.0.2.1"}, lambda: 1e9)
    s.start()
    actions = s.feed(b"MAIL FROM:<>\r\nRCPT TO:<nobody@example.org>\r\nNOOP\r\n")
    assert isinstance(actions[-1], a.CheckMailbox)
    assert b"".join(x.data for x in actions if isinstance(x, a.Send)) == b"250 ok\r\n"
    after = s.mailbox_result(False)
    sent = b"".join(x.data for x in after if isinstance(x, a.Send))
    assert sent == replies.NO_MAILBOX.wire() + b"250 ok\r\n"
