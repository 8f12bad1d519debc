"""qmail-inject's header work (eqmail.inject.headers, eqmail.inject.tokens), checked against
qmail's output."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.inject.headers import (
    Completion,
    Defaults,
    HeaderError,
    HeaderWork,
    envelope_arg,
    field_valid,
    identity_from_env,
    read_header,
)
from eqmail.inject.tokens import T, address_list, quote2, tokenize

DEFAULTS = Defaults(b"example.com", b"host", b"plus.example", b"id.example")
NOW = 1700000000  # 14 Nov 2023 22:13:20 UTC


def complete() -> Completion:
    return Completion(DEFAULTS)


def work(env: dict[str, bytes] | None = None, sender: bytes | None = None) -> HeaderWork:
    return HeaderWork(complete(), identity_from_env({"USER": b"joe"} if env is None else env), sender)


def rewrite(line: bytes) -> bytes:
    w = work()
    return w.rewrite_field(line, None)


# ---------------------------------------------------------------- tokens


def test_tokenize_kinds_and_escapes() -> None:
    toks = tokenize(b'To: "a\\"b" (c (d) e) [1.2] x\\.y')
    assert toks == [
        (T.ATOM, b"To"), (T.COLON, b""), (T.QUOTE, b'a"b'), (T.COMMENT, b"c d e"),
        (T.LITERAL, b"1.2"), (T.ATOM, b"x.y"),
    ]


def test_tokenize_refuses_unbalanced() -> None:
    assert tokenize(b"To: (a") is None
    assert tokenize(b'To: "a') is None
    assert tokenize(b"To: a)") is not None  # ")" inside an atom is kept (as a quote)
    assert tokenize(b"To: )a") is None
    assert tokenize(b"To: ]") is None


def test_eight_bit_atom_becomes_quoted() -> None:
    assert tokenize(b"J\xc3\xb6rg") == [(T.QUOTE, b"J\xc3\xb6rg")]


def test_unparse_folds_after_commas_at_80_columns() -> None:
    line = b"To: " + b", ".join(b"%s@example.com" % (bytes([97 + i]) * 20) for i in range(4)) + b"\n"
    assert rewrite(line) == (
        b"To: aaaaaaaaaaaaaaaaaaaa@example.com, bbbbbbbbbbbbbbbbbbbb@example.com,\n"
        b"  cccccccccccccccccccc@example.com, dddddddddddddddddddd@example.com\n"
    )


def test_comment_moves_after_address_and_adjacent_words_split() -> None:
    assert rewrite(b"To: (lead) z@q.org\n") == b"To: z@q.org (lead)\n"
    # two words with no comma between them are two addresses to qmail
    assert rewrite(b"To: a b\n") == b"To: a@host.example.com, b@host.example.com\n"


def test_groups_and_angle_addresses() -> None:
    assert rewrite(b'To: "Foo Bar" <d@e.f>, grp: x, y@z.org;\n') == (
        b'To: "Foo Bar" <d@e.f>, grp: x@host.example.com, y@z.org;\n'
    )
    assert rewrite(b"To: <>\n") == b"To: <>\n"


def test_address_list_syntax_errors() -> None:
    for bad in (b"To: b>\n", b"To: g: a\n", b"To: g: a; h: b;;\n"):
        toks = tokenize(bad)
        assert toks is not None
        assert address_list(toks, lambda a: a) is None, bad
    # an unopened group is not checked at the left end, as in qmail
    assert rewrite(b"To: a;\n") == b"To: a@host.example.com;\n"


# ---------------------------------------------------------------- completion


def arg(a: str, sender: bool = False) -> bytes:
    return envelope_arg(a.encode(), complete(), sender=sender)


def test_completion_rules() -> None:
    assert arg("joe") == b"joe@host.example.com"
    assert arg("joe@box") == b"joe@box.example.com"
    assert arg("joe@box+") == b"joe@box.plus.example"
    assert arg("joe@a.b.") == b"joe@a.b"
    assert arg("joe@") == b"joe@host.example.com"
    assert arg("joe@[1.2.3.4]") == b"joe@[1.2.3.4]"
    # a source route is dropped in a header; on the command line quote2 quotes it whole
    assert rewrite(b"To: <@r1,@r2:joe@x.org>\n") == b"To: <joe@x.org>\n"
    assert arg("@r1,@r2:joe@x.org") == b"@r1,@r2:joe@x.org"
    assert arg("box-@host-@[]") == b"box-@host-@[]"
    assert arg("a b@c.d") == b"a b@c.d"  # quote2 quotes the local part, unquote drops it
    assert arg("", sender=True) == b""


def test_unparsable_recipient_argument() -> None:
    try:
        arg("x@(y")
    except HeaderError as e:
        assert e.text == b"unable to parse address: x@(y\n"
    else:
        raise AssertionError("no error")


def test_quote2() -> None:
    assert quote2(b"joe@x") == b"joe@x"
    assert quote2(b"a b@x") == b'"a b"@x'
    assert quote2(b'a"b') == b'"a\\"b"'
    assert quote2(b".joe@x") == b'".joe"@x'
    assert quote2(b"") == b""


# ---------------------------------------------------------------- header block


def block(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    s = io.BytesIO(data)
    b = read_header(s)
    return b.fields, b.body_prefix, s.read()


def test_read_header_continuations_and_blank_line() -> None:
    assert block(b"A: 1\n  2\n\tz\nB: 3\n\nbody\n") == ([b"A: 1\n  2\n\tz\n", b"B: 3\n"], b"\n", b"body\n")


def test_read_header_inserts_blank_line_before_non_header() -> None:
    assert block(b"A: 1\nnot a header\nrest") == ([b"A: 1\n"], b"\nnot a header\n", b"rest")
    assert block(b"\r\n") == ([], b"\n\r\n", b"")


def test_read_header_mbox_line_and_eof() -> None:
    assert block(b"From joe Mon\nA: 1") == ([b"MBOX-Line: From joe Mon\n", b"A: 1\n"], b"", b"")


def test_read_header_is_bounded() -> None:
    try:
        read_header(io.BytesIO(b"A: " + b"x" * 100 + b"\n\n"), limit=50)
    except HeaderError as e:
        assert e.text == b"header too long\n"
    else:
        raise AssertionError("no error")
    # a huge first line that cannot be a field is body, not an error
    b = read_header(io.BytesIO(b"x y" * 100), limit=50)
    assert b.fields == [] and b.body_prefix.startswith(b"\nx y")


def test_field_valid() -> None:
    assert field_valid(b"X-A  :v\n")
    assert not field_valid(b"X A: v\n")
    assert not field_valid(b": v\n")
    assert not field_valid(b"novalue\n")


# ---------------------------------------------------------------- the header work


def run(header: bytes, env: dict[str, bytes] | None = None, sender: bytes | None = None,
        show: bool = False) -> tuple[bytes, HeaderWork]:
    w = work(env, sender)
    for f in read_header(io.BytesIO(header)).fields:
        w.field(f)
    return w.finish(NOW, 4242, show_return_path=show), w


def test_added_fields_in_qmail_order(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TZ", "UTC")
    out, w = run(b"Subject: hi\n", {"USER": b"joe", "NAME": b"Joe Q. Public"}, show=True)
    assert out == (
        b"Return-Path: <joe@host.example.com>\n"
        b"Date: 14 Nov 2023 22:13:20 +0000\n"
        b"Message-ID: <20231114221320.4242.qmail@id.example>\n"
        b'From: "Joe Q. Public" <joe@host.example.com>\n'
        b"Cc: recipient list not shown: ;\n"
        b"Subject: hi\n"
    )
    assert w.sender == b"joe@host.example.com"


def test_date_is_local_time_with_offset(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time

    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        out, _ = run(b"To: a\n")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert b"Date: 14 Nov 2023 17:13:20 -0500\n" in out
    assert b"Message-ID: <20231114221320.4242.qmail@id.example>\n" in out  # UTC stamp


def test_removed_fields_and_recipients() -> None:
    out, w = run(b"To: a, b@x.org\nCc: c\nBcc: secret\nApparently-To: app\n"
                 b"Content-Length: 5\nReturn-Path: <rp@x.org>\nDate: d\nMessage-ID: <m>\nFrom: f\n")
    assert out == (b"To: a@host.example.com, b@x.org\nCc: c@host.example.com\n"
                   b"Apparently-To: app@host.example.com\nDate: d\nMessage-ID: <m>\n"
                   b"From: f@host.example.com\n")
    # qmail collects each field's addresses right to left
    assert w.header_recipients() == [b"b@x.org", b"a@host.example.com", b"c@host.example.com",
                                     b"secret@host.example.com", b"app@host.example.com"]
    assert w.sender == b"rp@x.org"


def test_resent_message_uses_resent_fields() -> None:
    out, w = run(b"To: a\nResent-To: r1\nResent-Bcc: r2\n")
    assert out.startswith(b"Resent-Date: ")
    assert b"Resent-Message-ID: <" in out and b"Resent-From: joe@host.example.com\n" in out
    assert b"Cc: recipient list not shown" not in out and b"r2" not in out
    assert w.header_recipients() == [b"r1@host.example.com", b"r2@host.example.com"]


def test_sender_precedence() -> None:
    _, w = run(b"Return-Path: <rp@x.org>\n", sender=b"forced@y.org")
    assert w.sender == b"forced@y.org"
    _, w = run(b"Return-Path: <rp@x.org>\n", {"USER": b"joe", "QMAILINJECT": b"s"})
    assert w.sender == b"joe@host.example.com"
    env = {"QMAILUSER": b"q", "USER": b"u", "QMAILHOST": b"h.org", "QMAILSUSER": b"s", "QMAILSHOST": b"sh.org"}
    out, w = run(b"", env)
    assert w.sender == b"s@sh.org" and b"From: q@h.org\n" in out
    _, w = run(b"", {})
    assert w.sender == b"anonymous@host.example.com"


def test_qmailinject_flags() -> None:
    env = {"USER": b"joe", "NAME": b"Joe (J) Doe", "QMAILINJECT": b"cfi"}
    out, _ = run(b"From: x\nMessage-ID: <m>\nTo: t\n", env)
    assert b"From: joe@host.example.com (Joe \\(J\\) Doe)\n" in out
    assert b"From: x" not in out and b"<m>" not in out and b"Message-ID: <2023" in out
    _, w = run(b"", {"USER": b"joe", "QMAILINJECT": b"m"})
    assert w.sender == b"joe-1700000000.4242@host.example.com"
    _, w = run(b"", {"USER": b"joe", "QMAILINJECT": b"r"})
    assert w.sender == b"joe-@host.example.com-@[]"
    _, w = run(b"Return-Path: <bob@x.org>\n", {"USER": b"joe", "QMAILINJECT": b"r"})
    assert w.sender == b"bob@x.org-@[]"


def test_mail_followup_to() -> None:
    ident = identity_from_env({"USER": b"joe"}, frozenset([b"List@X.org"]))
    w = HeaderWork(complete(), ident)
    for f in (b"To: a@y.org, list@x.org\n", b"Cc: c@z.org\n"):
        w.field(f)
    out = w.finish(NOW, 1)
    assert b"Mail-Followup-To: c@z.org,\n  a@y.org,\n  list@x.org\n" in out


def test_header_syntax_errors() -> None:
    for bad, text in ((b"To: (x\n", b"unable to parse this line:\nTo: (x\n"),
                      (b"Cc: g: a, b\n", b"unable to parse this line:\nCc: g: a, b\n"),
                      (b"Cc: a>\n", b"unable to parse this line:\nCc: a>\n")):
        try:
            run(bad)
        except HeaderError as e:
            assert e.text == text
        else:
            raise AssertionError(bad)


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_header_bytes_give_a_well_formed_header_or_a_header_error(data: bytes) -> None:
    try:
        out, _ = run(data)
    except HeaderError as e:
        assert e.text.endswith(b"\n")
        return
    assert out.endswith(b"\n")
    # every line of the new header is a field or a continuation of one
    for line in out[:-1].split(b"\n"):
        assert line[:1] in (b" ", b"\t") or field_valid(line), line


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(rb"\A[a-z0-9][a-z0-9+]{0,11}(@[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2})?\Z"), min_size=1, max_size=8))
def test_rewritten_to_field_reparses_to_the_same_recipients(boxes: list[bytes]) -> None:
    _, w1 = run(b"To: " + b", ".join(boxes) + b"\n")
    out, _ = run(b"To: " + b", ".join(boxes) + b"\n")
    to = out[out.index(b"To: "):]
    _, w2 = run(to)
    assert w1.header_recipients() == w2.header_recipients()
