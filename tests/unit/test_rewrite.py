"""qmail-send's recipient rewriting and VERP sender expansion (qmail-core §1.5)."""

from __future__ import annotations

from eqmail.queue.rewrite import RewriteRules, rewrite, strip_virtual_prepend, verp_sender
from eqmail.queue.schedule import Channel

L, R = Channel.LOCAL, Channel.REMOTE


def rules(virtual: tuple[tuple[str, str], ...] = (), percent: frozenset[str] = frozenset(),
          local: frozenset[str] = frozenset({"mx.test.example", "localhost"})) -> RewriteRules:
    return RewriteRules(envnoathost="envhost.example", locals=local, virtualdomains=virtual,
                        percenthack=percent)


def test_no_at_gets_envnoathost() -> None:
    assert rewrite("joe", rules()) == (R, "joe@envhost.example")
    assert rewrite("joe", rules(local=frozenset({"envhost.example"}))) == (L, "joe@envhost.example")


def test_locals_exact_case_insensitive_address_unchanged() -> None:
    assert rewrite("Joe@MX.Test.Example", rules()) == (L, "Joe@MX.Test.Example")
    assert rewrite("joe@localhost", rules()) == (L, "joe@localhost")
    # locals is exact: a subdomain is not local
    assert rewrite("joe@sub.mx.test.example", rules()) == (R, "joe@sub.mx.test.example")
    assert rewrite("joe@elsewhere.example", rules()) == (R, "joe@elsewhere.example")


def test_last_at_splits_the_address() -> None:
    assert rewrite('"a@b"@mx.test.example', rules()) == (L, '"a@b"@mx.test.example')


def test_virtualdomain_by_domain_prepends_with_literal_dash() -> None:
    r = rules((("virt.example", "vuser"),))
    assert rewrite("Box@Virt.Example", r) == (L, "vuser-Box@Virt.Example")


def test_virtualdomain_whole_address_wins_over_domain() -> None:
    r = rules((("virt.example", "vuser"), ("joe@virt.example", "joeuser")))
    assert rewrite("joe@virt.example", r) == (L, "joeuser-joe@virt.example")
    assert rewrite("JOE@virt.example", r) == (L, "joeuser-JOE@virt.example")
    assert rewrite("ann@virt.example", r) == (L, "vuser-ann@virt.example")


def test_virtualdomain_suffix_keys_longest_first() -> None:
    r = rules(((".c.example", "short"), (".b.c.example", "long")))
    assert rewrite("x@a.b.c.example", r) == (L, "long-x@a.b.c.example")
    assert rewrite("x@z.c.example", r) == (L, "short-x@z.c.example")
    # the suffix key needs the leading dot: it does not match the bare domain
    assert rewrite("x@c.example", r) == (R, "x@c.example")


def test_virtualdomain_catch_all_and_empty_prepend() -> None:
    r = rules((("", "catchall"),))
    assert rewrite("x@anything.example", r) == (L, "catchall-x@anything.example")
    # an empty prepend means "not virtual" and stops the search: the catch-all is not used
    r = rules((("novirt.example", ""), ("", "catchall")))
    assert rewrite("x@novirt.example", r) == (R, "x@novirt.example")
    assert rewrite("x@other.example", r) == (L, "catchall-x@other.example")
    # locals beat virtualdomains
    assert rewrite("x@mx.test.example", r) == (L, "x@mx.test.example")


def test_virtualdomains_first_line_wins() -> None:
    r = rules((("virt.example", "first"), ("virt.example", "second")))
    assert rewrite("x@virt.example", r) == (L, "first-x@virt.example")


def test_percenthack_last_percent_repeatedly() -> None:
    r = rules(percent=frozenset({"hack.example", "c.example"}))
    assert rewrite("a%b.example@hack.example", r) == (R, "a@b.example")
    assert rewrite("a%mx.test.example@HACK.example", r) == (L, "a@mx.test.example")
    # repeatable: the new domain c.example is listed too
    assert rewrite("a%b.example%c.example@hack.example", r) == (R, "a@b.example")
    # stops when the new domain is not listed
    assert rewrite("a%b%d.example@hack.example", r) == (R, "a%b@d.example")
    # domains not listed are left alone
    assert rewrite("a%b@other.example", r) == (R, "a%b@other.example")
    # no % at all: unchanged
    assert rewrite("a@hack.example", r) == (R, "a@hack.example")


def test_percenthack_then_virtualdomains() -> None:
    r = rules((("virt.example", "v"),), percent=frozenset({"hack.example"}))
    assert rewrite("box%virt.example@hack.example", r) == (L, "v-box@virt.example")


def test_strip_virtual_prepend_for_bounce_notes() -> None:
    r = rules((("virt.example", "vuser"), (".sub.example", "s")))
    assert strip_virtual_prepend("vuser-box@virt.example", r) == "box@virt.example"
    assert strip_virtual_prepend("s-box@a.sub.example", r) == "box@a.sub.example"
    # a prefix that is not the domain's prepend stays
    assert strip_virtual_prepend("other-box@virt.example", r) == "other-box@virt.example"
    assert strip_virtual_prepend("box@mx.test.example", r) == "box@mx.test.example"
    assert strip_virtual_prepend("nohost", r) == "nohost"


def test_verp_sender_expansion() -> None:
    assert verp_sender("owner-@list.example-@[]", "box@dom.example") == "owner-box=dom.example@list.example"
    assert verp_sender("pre@host-@[]", "box@domain") == "prebox=domain@host"
    # the recipient needs an @
    assert verp_sender("pre@host-@[]", "nobox") == "pre@host-@[]"
    # the sender needs an @ before the marker
    assert verp_sender("nohost-@[]", "box@domain") == "nohost-@[]"
    # ordinary, null and double-bounce senders pass unchanged
    for s in ("joe@example.org", "", "#@[]"):
        assert verp_sender(s, "box@domain") == s
    # last @ of the recipient
    assert verp_sender("p@h-@[]", '"a@b"@c.example') == 'p"a@b"=c.example@h'
