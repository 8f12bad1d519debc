"""qmail-spp output commands and a section's result (eqmail.spp.protocol)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.smtp.actions import HookStage, HookVerdict
from eqmail.spp.protocol import Section, output_lines, parse_output

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
