"""qmail-smtpd address parsing, MAIL parameters, and the rcpthosts/badmailfrom matchers."""

from __future__ import annotations

import pytest

from eqmail.smtp.address import MailParams, domain_of, parse_address, parse_mail_params
from eqmail.smtp.policy import BadMailFrom, RcptHosts


@pytest.mark.parametrize(("arg", "expected"), [
    (b"FROM:<a@b.example>", "a@b.example"),
    (b"FROM:<>", ""),
    (b"", ""),                                   # bare MAIL: null sender, as qmail
    (b"FROM: a@b.example SIZE=5", "a@b.example"),
    (b"FROM:a@b.example", "a@b.example"),
    (b"TO:<@r1,@r2:joe@x.example>", "joe@x.example"),
    (b"TO:<@r1>", ""),                           # route without ':' eats everything
    (b'TO:<"joe smith>"@x.example>', "joe smith>@x.example"),
    (b"TO:<joe\\>x@x.example>", "joe>x@x.example"),
    (b'TO:<"a\\"b"@x>', 'a"b@x'),
    (b"TO:<joe@x.example", "joe@x.example"),     # no '>' : qmail does not care
    (b"TO:<\xff\xfe@x>", "\udcff\udcfe@x"),      # any byte round-trips
])
def test_parse_address(arg: bytes, expected: str) -> None:
    assert parse_address(arg) == expected


def test_length_limit() -> None:
    assert parse_address(b"<" + b"a" * 899 + b">") == "a" * 899
    assert parse_address(b"<" + b"a" * 900 + b">") is None


def test_localiphost() -> None:
    ips = frozenset({"127.0.0.1"})
    assert parse_address(b"<u@[127.0.0.1]>", ips, "me.example") == "u@me.example"
    assert parse_address(b"<u@[127.0.0.2]>", ips, "me.example") == "u@[127.0.0.2]"
    assert parse_address(b"<u@[127.0.0.1]>", ips, None) == "u@[127.0.0.1]"
    assert parse_address(b"<u@[127.0.0.1]x>", ips, "me.example") == "u@[127.0.0.1]x"
    assert parse_address(b"<u@[127.0.0.256]>", ips, "me.example") == "u@[127.0.0.256]"


@pytest.mark.parametrize(("arg", "params"), [
    (b"FROM:<a@b> SIZE=100", MailParams(size=100)),
    (b"FROM:<a@b> size=12x BODY=8BITMIME", MailParams(size=12)),
    (b"FROM:<a@b> SIZE=", MailParams(size=0)),
    (b"FROM:<a@b> AUTH=<>", MailParams(auth="unknown")),
    (b"FROM:<a@b> AUTH=joe+2Bx+3Dy+41", MailParams(auth="joe+x=y+41")),
    (b"FROM:<a@b> auth=joe+2bx", MailParams(auth="joe+x")),
    (b"FROM: a@b SIZE=100", MailParams()),          # no '>': parameters not parsed
    (b"<>  SIZE=1", MailParams()),                  # '>' too early (position <= 4)
    (b"FROM:<a@b> SIZE=" + b"9" * 500, MailParams(size=int("9" * 20))),
])
def test_mail_params(arg: bytes, params: MailParams) -> None:
    assert parse_mail_params(arg) == params


def test_domain_of() -> None:
    assert domain_of("a@b@c") == "c"
    assert domain_of("abc") is None


def test_rcpthosts() -> None:
    hosts = RcptHosts.from_lines(["Example.ORG", ".example.net", "# c", ""],
                                 ["virt.example:prefix", "user@single.example:x"])
    assert hosts.allows("a@example.org")
    assert hosts.allows("a@EXAMPLE.org")
    assert hosts.allows("a@x.y.example.net")
    assert not hosts.allows("a@example.net")
    assert hosts.allows("a@virt.example")
    assert not hosts.allows("a@single.example")
    assert not hosts.allows("a@example.org.evil")
    assert hosts.allows("a@evil@example.org")
    assert not hosts.allows("a@example.org@evil")
    assert hosts.allows("local-only")


def test_badmailfrom() -> None:
    bmf = BadMailFrom.from_lines(["Bad@Example.com", "@spam.example", ".junk.example"])
    assert bmf.matches("bad@example.COM")
    assert not bmf.matches("good@example.com")
    assert bmf.matches("x@SPAM.example")
    assert not bmf.matches("x@a.spam.example")
    assert bmf.matches("x@a.junk.example")
    assert not bmf.matches("x@junk.example")
    assert not bmf.matches("")
    assert not BadMailFrom().matches("x@y")
