"""qmail-spp plugins after SMTP AUTH: they see an authenticated session, not a relay
client (eQmail's AUTH patch set only its internal flag; qmail-spp's AUTH support gives
SMTPRCPTHOSTSOK=1).  The plugin below is written the way third-party [rcpt] plugins
(rcptcheck, chkuser-style scripts) are: skip relay clients, refuse unknown users."""

from __future__ import annotations

import smtplib

import pytest
from harness import Instance, free_port

PLUGIN = """#!/bin/sh
# what the plugin saw, for the test
printf '%s|%s|%s|%s\\n' "${RELAYCLIENT-unset}" "$SMTPAUTHUSER" "$SMTPRCPTHOSTSOK" "$SMTPRCPTTO" >> seen
[ -n "${RELAYCLIENT+x}" ] && exit 0
case "$SMTPRCPTTO" in
  testuser@mx.test.example|friend@far.example) ;;
  *) echo "E550 sorry, no mailbox here by that name (#5.1.1)" ;;
esac
"""

CHECKER = """#!/bin/sh
input=$(tr '\\0' '\\n' <&3)
[ "$(printf '%s\\n' "$input" | sed -n 1p)" = alice ] || exit 1
[ "$(printf '%s\\n' "$input" | sed -n 2p)" = secret ] || exit 1
exec "$@"
"""


@pytest.fixture
def inst() -> Instance:
    port = free_port(("127.0.0.1",))
    inst = Instance.create(listen=None)
    for name, text in (("rcptplugin.sh", PLUGIN), ("checkpw.sh", CHECKER)):
        path = inst.root / name
        path.write_text(text)
        path.chmod(0o755)
    (inst.root / "seen").touch()
    (inst.root / "seen").chmod(0o666)
    inst.write_control("listen", f"smtp 127.0.0.1:{port} checkpassword='{inst.root}/checkpw.sh /bin/true'")
    inst.write_control("smtpplugins", f"[rcpt]\n{inst.root}/rcptplugin.sh\n")
    inst.port = port  # type: ignore[attr-defined]
    inst.start()
    yield inst
    inst.destroy()


def test_rcpt_plugin_still_rejects_unknown_users_after_auth(inst: Instance) -> None:
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=30) as s:  # type: ignore[attr-defined]
        s.ehlo("client.example")
        s.login("alice", "secret")
        s.mail("alice@mx.test.example")
        code, text = s.rcpt("nobody@mx.test.example")
        assert (code, text) == (550, b"sorry, no mailbox here by that name (#5.1.1)")
        assert s.rcpt("testuser@mx.test.example")[0] == 250
        assert s.rcpt("friend@far.example")[0] == 250  # an authenticated client still relays
        code, text = s.rcpt("stranger@far.example")
        assert code == 550
        assert s.data(b"Subject: after auth\r\n\r\nhi\r\n")[0] == 250
    inst.wait_for_mail(1)
    seen = (inst.root / "seen").read_text().splitlines()
    assert seen == ["unset|alice|1|nobody@mx.test.example", "unset|alice|1|testuser@mx.test.example",
                    "unset|alice|1|friend@far.example", "unset|alice|1|stranger@far.example"], seen


def test_without_auth_relaying_is_refused_as_before(inst: Instance) -> None:
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=30) as s:  # type: ignore[attr-defined]
        s.ehlo("client.example")
        s.mail("someone@example.org")
        assert s.rcpt("friend@far.example")[0] == 553  # not in rcpthosts, no AUTH
        assert s.rcpt("testuser@mx.test.example")[0] == 250
    seen = (inst.root / "seen").read_text().splitlines()
    assert seen == ["unset||0|friend@far.example", "unset||1|testuser@mx.test.example"], seen
