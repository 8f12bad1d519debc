"""qmail-spp output commands and a section's result (eqmail.spp.protocol)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.ipc import ProtocolError
from eqmail.ipc.sandbox import decode_outcome, encode_outcome
from eqmail.smtp.actions import HookOutcome, HookStage, HookVerdict
from eqmail.spp.protocol import (
    MAX_HEADER,
    SUCCESS_CODE,
    Section,
    output_lines,
    parse_output,
    valid_header,
    wire_shape,
)

MAIL = HookStage.MAIL


def run(*outputs: bytes, stage: HookStage = MAIL, env: dict[str, str] | None = None):
    s = Section(stage, env or {})
    for n, out in enumerate(outputs):
        if s.add(f"plugins/p{n}", out):
            break
    return s.outcome()


def test_getln_rules() -> None:
    assert output_lines(b"Pa\nPb\n") == [b"Pa", b"Pb"]
    assert output_lines(b"E553 no") == [b"E553 n"]      # unterminated: last char lost
    assert output_lines(b"N") == []                     # bare one-byte line ignored
    assert output_lines(b"\n\nN\n") == [b"N"]           # empty lines ignored


def test_no_output_is_normal() -> None:
    o = run(b"", b"Xunknown command\n")
    assert o.verdict is HookVerdict.NORMAL and o.output == b""


def test_a_n_o_terminal_verdicts() -> None:
    assert run(b"A\n").verdict is HookVerdict.NORMAL and run(b"A\n").disable
    assert run(b"N\n", b"E550 never\n").verdict is HookVerdict.NORMAL
    assert run(b"O\n", b"E550 never\n").verdict is HookVerdict.OK_SKIP
    assert not run(b"N\n").disable


def test_e_rejects_with_text_and_stops() -> None:
    o = run(b"E553 sorry (#5.7.1)\nPignored\n", b"E550 second plugin never runs\n")
    assert o.verdict is HookVerdict.REJECT
    assert o.output == b"553 sorry (#5.7.1)\r\n"


def test_r_and_d_terminate() -> None:
    o = run(b"R421 go away\n")
    assert o.verdict is HookVerdict.TERMINATE and o.output == b"421 go away\r\n"
    o = run(b"D\n")
    assert o.verdict is HookVerdict.TERMINATE and o.output == b""


def test_p_texts_accumulate_and_multiline_reply() -> None:
    o = run(b"P250-one\n", b"E553-two\nE553 three\n")
    # E is terminal at its first line: "553-two" left open -> malformed -> 451
    assert o.verdict is HookVerdict.REJECT
    assert o.output.endswith(b"malformed output (#4.3.0)\r\n")
    o = run(b"P553-two\nE553 three\n")
    assert o.output == b"553-two\r\n553 three\r\n" and o.verdict is HookVerdict.REJECT


def test_open_continuation_allowed_for_the_sessions_own_reply() -> None:
    o = run(b"P220-welcome\n", stage=HookStage.CONNECTION)
    assert o.verdict is HookVerdict.NORMAL and o.output == b"220-welcome\r\n"
    o = run(b"P250-hi\n", stage=HookStage.CONNECTION)
    assert o.verdict is HookVerdict.REJECT and b"malformed output" in o.output


def test_h_s_u_c_and_later() -> None:
    o = run(b"HX-One: 1\nSFOO=bar\nUBAZ\nCnew@example.org\nLM550 no mail\nLR550 no rcpt\n"
            b"LD554 no data\nLX ignored\nH\nSNOEQUALS\n")
    assert o.verdict is HookVerdict.NORMAL
    assert o.headers == ("X-One: 1",)
    assert o.env == (("FOO", "bar"), ("BAZ", None), ("SMTPMAILFROM", "new@example.org"))
    assert o.address == "new@example.org"
    assert o.later == ((HookStage.MAIL, b"550 no mail\r\n"), (HookStage.RCPT, b"550 no rcpt\r\n"),
                       (HookStage.DATA, b"554 no data\r\n"))


def test_c_ignored_outside_mail_and_rcpt() -> None:
    for stage in (HookStage.CONNECTION, HookStage.HELO, HookStage.DATA, HookStage.AUTH):
        assert run(b"Cx@y\n", stage=stage).address is None
    o = run(b"Cx@y\n", stage=HookStage.RCPT)
    assert o.address == "x@y" and ("SMTPRCPTTO", "x@y") in o.env


def test_env_changes_visible_to_later_plugins() -> None:
    s = Section(MAIL, {"A": "1"})
    assert not s.add("p1", b"SB=2\nUA\n")
    assert s.env == {"B": "2"}


def test_failure_text_and_earlier_effects_kept() -> None:
    s = Section(MAIL, {})
    s.add("p1", b"P250-hello\nSX=1\n")
    assert s.add(":plugins/p2 arg", b"SY=2\n", "child crashed")
    o = s.outcome()
    assert o.verdict is HookVerdict.REJECT
    # the open 250- line cannot precede the 451; the failing plugin's S is dropped
    assert o.output == b"451 qmail-spp failure: :plugins/p2 arg: child crashed (#4.3.0)\r\n"
    assert o.env == (("X", "1"),)


def test_malformed_texts_fail() -> None:
    for bad in (b"Egarbage\n", b"E55 short\n", b"E553x\n", b"Pnot a reply\n", b"E\n",
                b"E553 a\rb\n", b"LM550-open\n"):
        o = run(bad)
        assert o.verdict is HookVerdict.REJECT, bad
        assert o.output == b"451 qmail-spp failure: plugins/p0: malformed output (#4.3.0)\r\n"


def test_nul_cuts_text() -> None:
    assert run(b"E553 ok\0junk\n").output == b"553 ok\r\n"


REPLY = re.compile(rb"(\d{3}([ -][^\r\n]*)?\r\n)*")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4),
       st.sampled_from(list(HookStage)))
def test_any_output_gives_a_sane_outcome(outputs: list[bytes], stage: HookStage) -> None:
    o = run(*outputs, stage=stage)
    assert REPLY.fullmatch(o.output), o.output
    for _, text in o.later:
        assert REPLY.fullmatch(text)
    if o.verdict in (HookVerdict.REJECT, HookVerdict.TERMINATE) and o.output:
        assert o.output.split(b"\r\n")[-2][3:4] != b"-"  # finished reply
    for name, value in o.env:
        assert name and "=" not in name and "\0" not in name
        assert value is None or "\0" not in value


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parse_stops_at_first_terminal(data: bytes) -> None:
    cmds = parse_output(data, MAIL)
    lines = [ln.split(b"\0", 1)[0] for ln in output_lines(data)]
    firsts = [ln[:1] for ln in lines if ln]
    terminals = [c for c in firsts if c and c in b"ANOERD"]
    assert cmds.terminal == (terminals[0].decode() if terminals else None)


# ---- one reply per command (issue 12, item 12) ------------------------------------------

FAILED = b"451 qmail-spp failure: plugins/p%d: malformed output (#4.3.0)\r\n"


def test_a_p_text_that_is_a_complete_reply_fails() -> None:
    # The session sends its own reply after P lines: a finished P reply would be a
    # second reply to the command.
    for stage in HookStage:
        code = SUCCESS_CODE[stage]
        for outputs in ([b"P" + code + b" done\n"], [b"P" + code + b"\n"],
                        [b"P" + code + b"-a\nP" + code + b" done\nN\n"],
                        [b"P" + code + b"-a\n", b"P" + code + b" done\n"]):
            o = run(*outputs, stage=stage)
            assert o.verdict is HookVerdict.REJECT, (stage, outputs)
            assert o.output == FAILED % (len(outputs) - 1), (stage, o.output)


def test_a_complete_p_reply_before_e_or_d_fails() -> None:
    assert run(b"P553 first\nE553 second\n").output == FAILED % 0
    assert run(b"P250-a\n", b"P250 b\n", b"E553 no\n").output == FAILED % 1
    o = run(b"P421 bye\nD\n")  # one finished reply, then the silent close: one reply
    assert o.verdict is HookVerdict.TERMINATE and o.output == b"421 bye\r\n"
    assert run(b"P421 a\nP421 b\nD\n").output == FAILED % 0
    assert run(b"P421-a\nD\n").output == FAILED % 0


def test_embedded_cr_lf_never_reach_the_client() -> None:
    for bad in (b"P250 ok\r\n250 second\n", b"E553 no\r\n250 ok\n", b"R421 x\r\n",
                b"P250-ok\r\nN\n"):
        o = run(bad)
        assert o.output == FAILED % 0, bad


def test_a_code_change_fails_and_only_the_451_is_sent() -> None:
    o = run(b"P250-one\n", b"P553-two\n")
    assert o.output == FAILED % 1
    o = run(b"P250-one\n", b"E553 no\n")
    assert o.output == FAILED % 1


def test_later_texts_are_one_reply_per_command() -> None:
    o = run(b"LM550-one\nLM550 two\nLR550 r\n")
    assert o.later == ((HookStage.MAIL, b"550-one\r\n550 two\r\n"),
                       (HookStage.RCPT, b"550 r\r\n"))
    assert run(b"LM550 one\nLM550 two\n").output == FAILED % 0
    assert run(b"LM550 one\n", b"LM550 two\n").output == FAILED % 1
    assert run(b"LM550-one\nLM551 two\n").output == FAILED % 0


BAD_HEADERS = [b"no colon here", b": empty name", b"Bad Name: space in name",
               b"X-\x01Ctl: v", b"\tcontinued: folded", b"X-A: b\rc", b"X-A: b\x1b[31m",
               b"X-A: nul\x7f", b"X-Long: " + b"x" * (MAX_HEADER - 7),
               "X-\u00e9: 8-bit name".encode()]


def test_invalid_headers_fail_the_plugin() -> None:
    for bad in BAD_HEADERS:
        o = run(b"HX-Good: 1\n", b"H" + bad + b"\nN\n")
        assert o.verdict is HookVerdict.REJECT, bad
        assert o.output == b"451 qmail-spp failure: plugins/p1: malformed header (#4.3.0)\r\n"
        assert o.headers == ("X-Good: 1",), bad
        assert not valid_header(bad)


def test_valid_headers_pass() -> None:
    good = [b"X-A: b", b"X-A:", b"X-A:\tb c", b"Received: from x (y) by z", "X-U: \u00e9t\u00e9".encode(),
            b"X-Long: " + b"x" * (MAX_HEADER - 8)]
    for field in good:
        assert valid_header(field), field
    o = run(b"".join(b"H" + h + b"\n" for h in good))
    assert o.verdict is HookVerdict.NORMAL and len(o.headers) == len(good)


def test_decoded_answers_are_checked_again_in_the_listener() -> None:
    def answer(**kw: object) -> bytes:
        base = {"verdict": "normal", "output": "", "env": [], "headers": [], "later": [],
                "disable": False, "address": None}
        base.update(kw)
        return json.dumps(base).encode()

    assert decode_outcome(answer(output="250-hi\r\n")).output == b"250-hi\r\n"
    assert decode_outcome(answer(verdict="reject", output="553-a\r\n553 b\r\n"))
    for bad in (dict(output="250 hi\r\n"), dict(verdict="reject", output="553 a\r\n553 b\r\n"),
                dict(verdict="reject", output="553 a\r\nx"), dict(verdict="terminate",
                                                                   output="421-a\r\n"),
                dict(output="250-a\n250 b\r\n"), dict(headers=["X-A: b\r\nBcc: x"]),
                dict(headers=["nocolon"]), dict(later=[["mail", "550 a\r\n550 b\r\n"]]),
                dict(later=[["mail", "550 a\r\n"], ["mail", "550 b\r\n"]])):
        with pytest.raises(ProtocolError):
            decode_outcome(answer(**bad))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4),
       st.sampled_from(list(HookStage)))
def test_any_output_is_at_most_one_reply(outputs: list[bytes], stage: HookStage) -> None:
    o = run(*outputs, stage=stage)
    shape = wire_shape(o.output)
    assert shape is not None
    if o.verdict in (HookVerdict.NORMAL, HookVerdict.OK_SKIP):
        assert shape[0] == 0 and shape[1] in (None, SUCCESS_CODE[stage])
    else:
        assert shape[0] <= 1 and shape[1] is None
    for _, text in o.later:
        assert wire_shape(text) == (1, None)
    for h in o.headers:
        assert valid_header(h.encode("utf-8", "surrogateescape"))
    encode_outcome(o)  # and the listener takes it
    assert decode_outcome(encode_outcome(o)) == o


def _session_replies(outcomes: dict[HookStage, HookOutcome], commands: list[bytes]) -> bytes:
    """The bytes a client sees from a pure session whose hooks answer ``outcomes``."""
    from eqmail.smtp import actions as A
    from eqmail.smtp.policy import RcptHosts
    from eqmail.smtp.session import Session, SessionConfig

    cfg = SessionConfig(greeting="mx.test.example", local_host="mx.test.example",
                        databytes=0, rcpthosts=RcptHosts.from_lines(["mx.test.example"]),
                        plugins_enabled=True)
    session = Session(cfg, {"TCPREMOTEIP": "192.0.2.1"}, lambda: 0.0)
    seen = b""

    def perform(actions: list[A.Action]) -> None:
        nonlocal seen
        for action in actions:
            if isinstance(action, A.Send):
                seen += action.data
            elif isinstance(action, A.RunHook):
                perform(session.hook_result(outcomes.get(action.stage, HookOutcome())))

    perform(session.start())
    for command in commands:
        perform(session.feed(command + b"\r\n"))
    return seen


def test_session_finishes_open_p_lines_only_with_its_own_code() -> None:
    seen = _session_replies(
        {HookStage.CONNECTION: run(b"P220-welcome\n", stage=HookStage.CONNECTION),
         HookStage.RCPT: run(b"P250-checked\n", stage=HookStage.RCPT)},
        [b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<u@elsewhere.example>",
         b"RCPT TO:<u@mx.test.example>"])
    assert seen == (b"220-welcome\r\n220 mx.test.example ESMTP\r\n"
                    b"250 mx.test.example\r\n250 ok\r\n"
                    # relay refused: the plugin's 250- line cannot lead a 553
                    b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
                    b"250-checked\r\n250 ok\r\n")


def test_session_shows_one_queued_text_per_command() -> None:
    seen = _session_replies(
        {HookStage.CONNECTION: HookOutcome(later=((HookStage.MAIL, b"550 first\r\n"),)),
         HookStage.HELO: HookOutcome(later=((HookStage.MAIL, b"550 second\r\n"),))},
        [b"HELO x", b"MAIL FROM:<a@b.example>"])
    assert seen.endswith(b"250 mx.test.example\r\n550 first\r\n")
