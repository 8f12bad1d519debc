"""qmail-spp through the real sandbox worker: every command letter's effect on the SMTP
transcript, the environment plugins see, S/U persistence, H headers, and every way a
plugin can fail — each answered with the 451 failure while other sessions go on.

The sandbox runs as a subprocess (its own entry point); sessions are pure Sessions
whose hooks go through eqmail.spp.client.run_hook, as in the listener.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spp_harness import Sandbox, converse, make_root, script, session_config  # noqa: E402

SHOW_ENV = ('#!/bin/sh\necho "${TYPE:-P}${CODE:-250}${SEP:--}seen helo=$SMTPHELOHOST from=$SMTPMAILFROM '
            'rcpt=$SMTPRCPTTO n=$SMTPRCPTCOUNT all=$SMTPRCPTCOUNTALL ok=$SMTPRCPTHOSTSOK '
            'ip=$TCPREMOTEIP user=$SMTPAUTHUSER method=$SMTPAUTHMETHOD x=$X"\n')

FDS = """#!/usr/bin/python3 -S
import os
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
print("P250-fds: " + " ".join(str(fd) for fd in range(1024) if is_open(fd)))
"""

CONFIGS = {
    "letters": "[mail]\n:echo P250-first; echo N\n:echo E550 never runs\n"
               "[rcpt]\n:case $SMTPRCPTTO in o@*) echo O;; e@*) echo 'E553 no (#5.7.1)';; "
               "r@*) echo 'R421 bye';; d@*) echo D;; a@*) echo A;; esac\n:echo 'E554 second'\n",
    "helo": "[helo]\n:echo 'E550 bad helo'\n",
    "conn_reject": "[connection]\n:echo 'E554 not welcome'\n",
    "banner": "[connection]\n:echo P220-welcome to the test\n",
    "env": "[connection]\n:echo SX=from-connect\n[helo]\n:CODE=250 exec ./showenv\n"
           "[mail]\n./showenv\n[rcpt]\n:case $SMTPRCPTTO in v@*) TYPE=E CODE=553 SEP=' ' "
           "exec ./showenv;; *) exec ./showenv;; esac\n[data]\n:CODE=354 exec ./showenv\n"
           "[auth]\n:CODE=235 exec ./showenv\n",
    "relay": "[connection]\n:echo SRELAYCLIENT=\n",
    "tlsreq": "[connection]\n:echo STLSREQUIRED=1\n",
    "unset": "[connection]\n:echo URELAYCLIENT\n",
    "header": "[connection]\n:echo 'HX-Connect: 1'\n[mail]\n:echo 'HX-Spp: mail'\n",
    "rewrite": "[mail]\n:echo Cchanged@example.org\n[rcpt]\n:echo Cpostmaster@example.org\n",
    "later": "[mail]\n:echo 'LR550 no rcpt for you'; echo 'LD554 no data'; echo N\n",
    "later_mail": "[helo]\n:echo 'LM550 no mail today'\n",
    "crash": "[mail]\n:kill -SEGV $$\n",
    "exit120": "[mail]\n:exit 120\n",
    "missing": "[mail]\nplugins/does-not-exist\n",
    "timeout": "[mail]\n:sleep 60\n",
    "garbage": "[mail]\n./garbage\n",
    "flood": "[mail]\n:head -c 10485760 /dev/zero | tr '\\0' P\n",
    "fds": "[mail]\n./fds\n",
    "children": "[mail]\n:(sleep 60 >/dev/null 2>&1 & echo $! > child.pid); echo N\n",
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    root = make_root("", {"spptimeout": "2\n"})
    for name, text in CONFIGS.items():
        (root / "control" / f"spp-{name}").write_text(text)
    script(root, "showenv", SHOW_ENV)
    script(root, "garbage", "#!/bin/sh\nprintf '\\001\\377\\000E\\nPnot a reply\\n'\n")
    script(root, "fds", FDS)
    sb = Sandbox(root).start()
    yield sb
    log = sb.stop()
    sb.destroy()
    assert "Traceback" not in log, log


def talk(sb: Sandbox, config: str, commands: list[bytes], **kw):  # type: ignore[no-untyped-def]
    env = {"SPPCONFFILE": f"control/spp-{config}", **kw.pop("env", {})}
    return asyncio.run(converse(sb, commands, env=env, **kw))


MAIL_TXN = [b"HELO c\r\n", b"MAIL FROM:<a@example.net>\r\n"]


def test_p_then_n_skips_remaining_plugins(sandbox: Sandbox) -> None:
    t = talk(sandbox, "letters", MAIL_TXN)
    assert t.text.endswith("250-first\r\n250 ok\r\n")
    assert "never" not in t.text


@pytest.mark.parametrize("rcpt, expect, closed", [
    ("e@example.org", "553 no (#5.7.1)\r\n", False),
    ("r@example.org", "421 bye\r\n", True),
    ("d@example.org", "", True),
])
def test_terminal_letters_at_rcpt(sandbox: Sandbox, rcpt: str, expect: str, closed: bool) -> None:
    t = talk(sandbox, "letters", [*MAIL_TXN, f"RCPT TO:<{rcpt}>\r\n".encode(), b"NOOP\r\n"])
    after_mail = t.text.split("250 ok\r\n", 1)[1]
    assert after_mail == (expect if closed else expect + "250 ok\r\n")
    assert t.closed is closed


def test_o_skips_rcpthosts_but_n_does_not(sandbox: Sandbox) -> None:
    t = talk(sandbox, "letters", [*MAIL_TXN, b"RCPT TO:<o@elsewhere.test>\r\n"])
    assert t.text.endswith("250 ok\r\n250 ok\r\n")
    t = talk(sandbox, "letters", [*MAIL_TXN, b"RCPT TO:<x@elsewhere.test>\r\n"])
    assert t.text.endswith("554 second\r\n")  # no terminal in plugin 1: plugin 2 rejects


def test_a_turns_plugins_off_for_the_session(sandbox: Sandbox) -> None:
    t = talk(sandbox, "letters", [*MAIL_TXN, b"RCPT TO:<a@example.org>\r\n",
                                  b"RCPT TO:<x@example.org>\r\n", b"MAIL FROM:<b@x>\r\n"])
    # after A: the second RCPT and the next MAIL run no plugins (no 554, no 250-first)
    assert t.text.endswith("250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n")
    assert t.text.count("250-first") == 1


def test_helo_reject_keeps_no_helo_name(sandbox: Sandbox) -> None:
    t = talk(sandbox, "helo", [b"HELO bad.example\r\n", b"NOOP\r\n"])
    assert t.text.endswith("550 bad helo\r\n250 ok\r\n")
    assert t.session is not None and t.session.helo is None


def test_connection_reject_replaces_banner_commands_still_read(sandbox: Sandbox) -> None:
    t = talk(sandbox, "conn_reject", [b"NOOP\r\n"])
    assert t.text == "554 not welcome\r\n250 ok\r\n"


def test_multiline_banner_from_p(sandbox: Sandbox) -> None:
    t = talk(sandbox, "banner", [b"QUIT\r\n"])
    assert t.text.startswith("220-welcome to the test\r\n220 mx.test.example ESMTP\r\n")


def test_environment_at_each_hook(sandbox: Sandbox) -> None:
    cfg = session_config(auth_available=True)
    t = talk(sandbox, "env", [b"EHLO client.example\r\n", b"MAIL FROM:<s@example.net>\r\n",
                              b"RCPT TO:<u@example.org>\r\n", b"RCPT TO:<v@outside.test>\r\n",
                              b"DATA\r\n"], cfg=cfg)
    lines = [ln for ln in t.text.split("\r\n") if "seen" in ln]
    base = "ip=192.0.2.10 user= method= x=from-connect"
    assert lines[0] == f"250-seen helo=client.example from= rcpt= n= all= ok= {base}"
    assert lines[1] == f"250-seen helo=client.example from=s@example.net rcpt= n= all= ok= {base}"
    assert lines[2] == ("250-seen helo=client.example from=s@example.net rcpt=u@example.org "
                        f"n=0 all=1 ok=1 {base}")
    # (a refusal is the plugin's own E reply: a 250- line cannot lead the session's 553)
    assert lines[3] == ("553 seen helo=client.example from=s@example.net rcpt=v@outside.test "
                        f"n=1 all=2 ok=0 {base}")
    assert lines[4].startswith("354-seen helo=client.example from=s@example.net")


def test_s_relayclient_at_connect_enables_relaying(sandbox: Sandbox) -> None:
    cmds = [*MAIL_TXN, b"RCPT TO:<someone@outside.test>\r\n"]
    t = talk(sandbox, "relay", cmds)
    assert t.text.endswith("250 ok\r\n250 ok\r\n")
    t = talk(sandbox, "unset", cmds, env={"RELAYCLIENT": ""})
    assert t.text.endswith("553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n")


def test_s_tlsrequired_forces_tls_before_auth(sandbox: Sandbox) -> None:
    cfg = session_config(auth_available=True)
    t = talk(sandbox, "tlsreq", [b"EHLO c\r\n", b"AUTH PLAIN AGZvbwBiYXI=\r\n"], cfg=cfg)
    assert "250 AUTH CRAM-MD5\r\n" in t.text
    assert t.text.endswith("538 AUTH PLAIN/LOGIN not available without TLS (#5.3.3)\r\n")


def test_h_headers_go_into_the_next_message_only(sandbox: Sandbox) -> None:
    msg = [b"RCPT TO:<u@example.org>\r\n", b"DATA\r\n", b"Subject: x\r\n\r\nhi\r\n.\r\n"]
    t = talk(sandbox, "header", [*MAIL_TXN, *msg, b"MAIL FROM:<b@example.net>\r\n", *msg])
    assert len(t.headers) == 2
    assert t.headers[0].endswith(b"\nX-Connect: 1\nX-Spp: mail\n")
    assert t.headers[1].endswith(b"\nX-Spp: mail\n") and b"X-Connect" not in t.headers[1]


def test_c_rewrites_addresses(sandbox: Sandbox) -> None:
    t = talk(sandbox, "rewrite", [*MAIL_TXN, b"RCPT TO:<u@example.org>\r\n"])
    assert t.session is not None
    assert t.session.sender == "changed@example.org"
    assert t.session.recipients == ["postmaster@example.org"]


def test_later_texts_reject_the_next_rcpt_and_data(sandbox: Sandbox) -> None:
    t = talk(sandbox, "later", [*MAIL_TXN, b"RCPT TO:<u@example.org>\r\n",
                                b"RCPT TO:<u@example.org>\r\n", b"DATA\r\n", b"DATA\r\n"])
    assert t.text.endswith("250 ok\r\n550 no rcpt for you\r\n250 ok\r\n554 no data\r\n354 go ahead\r\n")
    t = talk(sandbox, "later_mail", [b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\r\n"])
    assert t.text.endswith("250 mx.test.example\r\n550 no mail today\r\n250 ok\r\n")


def test_rset_clears_headers_and_later(sandbox: Sandbox) -> None:
    t = talk(sandbox, "later_mail", [b"HELO c\r\n", b"RSET\r\n", b"MAIL FROM:<a@b>\r\n"])
    assert t.text.endswith("250 flushed\r\n250 ok\r\n")
    t = talk(sandbox, "header", [*MAIL_TXN, b"RSET\r\n", b"MAIL FROM:<a@b>\r\n",
                                 b"RCPT TO:<u@example.org>\r\n", b"DATA\r\n", b".\r\n"])
    assert t.headers[0].endswith(b"\nX-Spp: mail\n") and b"X-Connect" not in t.headers[0]


FAILURES = [
    ("crash", ":kill -SEGV $$", "child crashed"),
    ("exit120", ":exit 120", "can't execute"),
    ("missing", "plugins/does-not-exist", "can't execute"),
    ("timeout", ":sleep 60", "timeout"),
    ("garbage", "./garbage", "malformed output"),
    ("flood", ":head -c 10485760 /dev/zero | tr '\\0' P", "output too large"),
]


@pytest.mark.parametrize("config, line, reason", FAILURES, ids=[f[0] for f in FAILURES])
def test_failures_get_451_while_other_sessions_proceed(sandbox: Sandbox, config: str,
                                                       line: str, reason: str) -> None:
    async def both() -> tuple[object, list[float]]:
        bad = asyncio.ensure_future(converse(
            sandbox, [*MAIL_TXN, b"MAIL FROM:<again@example.net>\r\n"],
            env={"SPPCONFFILE": f"control/spp-{config}"}))
        await asyncio.sleep(0.05)
        times = []
        for _ in range(5):  # meanwhile, other sessions with plugins run normally
            t0 = time.monotonic()
            ok = await converse(sandbox, MAIL_TXN, env={"SPPCONFFILE": "control/spp-letters"})
            assert ok.text.endswith("250-first\r\n250 ok\r\n")
            times.append(time.monotonic() - t0)
        return await bad, times

    t, times = asyncio.run(both())
    expect = f"451 qmail-spp failure: {line}: {reason} (#4.3.0)\r\n"
    assert t.text.endswith(f"250 mx.test.example\r\n{expect}{expect}")  # type: ignore[attr-defined]
    assert max(times) < 1.5, times  # not held up by the 2 s timeout of the bad plugin


def test_no_fd_leaks_into_plugins(sandbox: Sandbox) -> None:
    t = talk(sandbox, "fds", [*MAIL_TXN])
    fds = t.text.split("fds: ", 1)[1].split("\r\n", 1)[0].split()
    assert fds == ["0", "1", "2"]


def test_children_left_behind_are_killed(sandbox: Sandbox) -> None:
    t = talk(sandbox, "children", MAIL_TXN)
    assert t.text.endswith("250 ok\r\n")
    pid = int((sandbox.root / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()
