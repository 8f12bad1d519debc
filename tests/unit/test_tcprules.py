"""tcp.smtp parsing and tcpserver's lookup order."""

from __future__ import annotations

import pytest

from eqmail.errors import ControlFileError
from eqmail.tcprules import RuleResult, Rules

SAMPLE = """\
# comment
127.:allow,RELAYCLIENT=""
10.1.2.3:deny
10.1.2.:allow,X="a,b",Y=/q"q/
10.1.:allow,TIER=16
10.1.2.10-12:allow,RANGE=1
192.168.0.0/16:allow,CIDR=1
=mail.example.com:allow,HOST=exact
=.example.com:allow,HOST=suffix
=.com:allow,HOST=com
joe@10.9.9.9:allow,WHO=joe
::1:allow,RELAYCLIENT=""
2001:db8::/32:allow,V6=32
2001:db8:1::allow,V6=48,BARE=yes
fe80::1:deny
:deny
10.1.:allow,TIER=duplicate-ignored
"""


@pytest.fixture(scope="module")
def rules() -> Rules:
    return Rules.parse(SAMPLE, "tcp.smtp")


@pytest.mark.parametrize(("ip", "host", "info", "expected"), [
    ("127.0.0.1", None, None, RuleResult(True, {"RELAYCLIENT": ""})),
    ("10.1.2.3", None, None, RuleResult(False, {})),
    ("10.1.2.4", None, None, RuleResult(True, {"X": "a,b", "Y": 'q"q'})),
    ("10.1.3.4", None, None, RuleResult(True, {"TIER": "16"})),
    ("10.1.2.11", None, None, RuleResult(True, {"RANGE": "1"})),
    ("10.1.2.13", None, None, RuleResult(True, {"X": "a,b", "Y": 'q"q'})),
    ("192.168.7.7", None, None, RuleResult(True, {"CIDR": "1"})),
    ("203.0.113.9", None, None, RuleResult(False, {})),
    # exact IP beats =host; =host beats IP prefixes; prefixes beat =.suffix
    ("10.1.2.3", "mail.example.com", None, RuleResult(False, {})),
    ("10.1.2.4", "MAIL.example.com", None, RuleResult(True, {"HOST": "exact"})),
    ("10.1.2.4", "other.example.com", None, RuleResult(True, {"X": "a,b", "Y": 'q"q'})),
    ("203.0.113.9", "a.b.example.com", None, RuleResult(True, {"HOST": "suffix"})),
    ("203.0.113.9", "x.org.com", None, RuleResult(True, {"HOST": "com"})),
    ("10.9.9.9", None, "joe", RuleResult(True, {"WHO": "joe"})),
    ("10.9.9.9", None, "bob", RuleResult(False, {})),
    ("::1", None, None, RuleResult(True, {"RELAYCLIENT": ""})),
    ("0:0::1", None, None, RuleResult(True, {"RELAYCLIENT": ""})),
    ("::ffff:127.0.0.5", None, None, RuleResult(True, {"RELAYCLIENT": ""})),
    ("2001:db8:1::5", None, None, RuleResult(True, {"V6": "48", "BARE": "yes"})),
    ("2001:db8:2::5", None, None, RuleResult(True, {"V6": "32"})),
    ("fe80::1", None, None, RuleResult(False, {})),
    ("2001:db9::1", None, None, RuleResult(False, {})),
])
def test_match(rules: Rules, ip: str, host: str | None, info: str | None,
               expected: RuleResult) -> None:
    assert rules.match(ip, host, info) == expected


def test_no_default_allows() -> None:
    assert Rules.parse("10.:deny\n", "f").match("192.0.2.1", None) == RuleResult(True, {})


def test_host_any() -> None:
    r = Rules.parse("=:allow,KNOWN=1\n:deny\n", "f")
    assert r.match("192.0.2.1", "h.example").env == {"KNOWN": "1"}
    assert not r.match("192.0.2.1", None).allow


@pytest.mark.parametrize(("line", "reason"), [
    ("1.2.3.4", "no ':allow'"),
    ("1.2.3.4:permit", "no ':allow'"),
    ("1.2.3:allow", "four octets"),
    ("1.2.300.:allow", "bad octet"),
    ("1.2.3.9-4:allow", "backwards"),
    ("1.2.3.4:allow,X", "bad variable"),
    ("1.2.3.4:allow,X=\"abc", "unterminated"),
    ("1.2.3.4:allow,X=\"a\"b", "junk"),
    ("2001:zz::1:allow", "bad address"),
    ("@1.2.3.4:allow", "empty info"),
])
def test_errors(line: str, reason: str) -> None:
    with pytest.raises(ControlFileError) as err:
        Rules.parse(f"# ok\n127.:allow\n{line}\n", "control/tcp.smtp")
    assert err.value.file == "control/tcp.smtp"
    assert err.value.line == 3
    assert reason in err.value.reason


def test_rules_are_equal_when_parsed_from_the_same_file_text() -> None:
    """A reload compares configurations: the same text of the same file is the same rules."""
    text = "127.0.0.1:allow,RELAYCLIENT=\"\"\n:deny\n"
    one, two = Rules.parse(text, "control/tcp.smtp"), Rules.parse(text, "control/tcp.smtp")
    assert one == two and hash(one) == hash(two)
    assert one != Rules.parse(text, "control/tcp.other")
    assert one != Rules.parse(text + "10.:allow\n", "control/tcp.smtp")
    assert (one.filename, one.text) == ("control/tcp.smtp", text)
