""".qmail selection, parsing and NEWSENDER (dot-qmail(5), qmail-local)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.delivery import dotqmail
from eqmail.delivery.dotqmail import (
    Candidate,
    Comment,
    DotQmailError,
    Forward,
    ForwardOnly,
    Maildir,
    Mbox,
    NoMailbox,
    Program,
    candidates,
    find,
    has_mailbox,
    new_sender,
    parse,
    safe_ext,
)
from eqmail.errors import ControlFileError


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


def write(home: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = home / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- selection ---------------------------------------------------------------------


def test_safe_ext_lowercases_ascii_and_maps_dots() -> None:
    assert safe_ext("Foo.Bar-Ä") == "foo:bar-Ä"


@pytest.mark.parametrize(
    ("dash", "ext", "names"),
    [
        ("", "", [".qmail", ".qmaildefault"]),
        ("-", "", [".qmail-", ".qmail-default"]),
        ("-", "a", [".qmail-a", ".qmail-default"]),
        ("-", "a-", [".qmail-a-", ".qmail-a-default", ".qmail-default"]),
        ("-", "foo-bar", [".qmail-foo-bar", ".qmail-foo-default", ".qmail-default"]),
        ("-", "a-b-", [".qmail-a-b-", ".qmail-a-b-default", ".qmail-a-default", ".qmail-default"]),
        ("-", "A.B-C", [".qmail-a:b-c", ".qmail-a:b-default", ".qmail-default"]),
    ],
)
def test_candidate_chain(dash: str, ext: str, names: list[str]) -> None:
    assert [c.name for c in candidates(dash, ext)] == names


def test_candidate_default_values_keep_original_case() -> None:
    assert candidates("-", "List-Foo-Bar") == [
        Candidate(".qmail-list-foo-bar", None),
        Candidate(".qmail-list-foo-default", "Bar"),
        Candidate(".qmail-list-default", "Foo-Bar"),
        Candidate(".qmail-default", "List-Foo-Bar"),
    ]


def test_literal_default_extension_sets_default() -> None:
    assert candidates("-", "x-Default")[0] == Candidate(".qmail-x-default", "Default")


def test_find_exact_then_chain(home: Path) -> None:
    write(home, ".qmail-foo-default", "&a@b\n")
    write(home, ".qmail-default", "&c@d\n")
    found = find(str(home), "-", "Foo-Bar")
    assert found == dotqmail.DotQmail(".qmail-foo-default", b"&a@b\n", False, "Bar")
    write(home, ".qmail-foo-bar", "&e@f\n")
    assert find(str(home), "-", "foo-bar").name == ".qmail-foo-bar"
    assert find(str(home), "-", "other").default == "other"
    assert find(str(home), "-", "other").name == ".qmail-default"


def test_find_nothing(home: Path) -> None:
    # an extension address without a file does not exist; the user's own address
    # falls back to the default delivery
    with pytest.raises(NoMailbox) as info:
        find(str(home), "-", "x")
    assert info.value.text == "Sorry, no mailbox here by that name. (#5.1.1)"
    assert find(str(home), "", "") is None


def test_writable_qmail_is_refused(home: Path) -> None:
    write(home, ".qmail-x", "&a@b\n", 0o602)
    with pytest.raises(DotQmailError) as info:
        find(str(home), "-", "x")
    assert info.value.text == "Uh-oh: .qmail file is writable. (#4.7.0)"


def test_group_writable_is_allowed_conf_patrn_002(home: Path) -> None:
    write(home, ".qmail-x", "&a@b\n", 0o620)
    assert find(str(home), "-", "x") is not None


def test_owner_execute_bit_is_forward_only(home: Path) -> None:
    write(home, ".qmail-x", "&a@b\n", 0o700)
    assert find(str(home), "-", "x").forward_only is True


def test_non_regular_file_counts_as_absent(home: Path) -> None:
    (home / ".qmail-x").mkdir()
    os.mkfifo(home / ".qmail-default")
    with pytest.raises(NoMailbox):
        find(str(home), "-", "x")
    assert not has_mailbox(str(home), "-", "x")


def test_extension_with_slash_never_leaves_home(home: Path, tmp_path: Path) -> None:
    (home / ".qmail-sub").mkdir()
    write(home / ".qmail-sub", "file", "&evil@x\n")
    with pytest.raises(NoMailbox):
        find(str(home), "-", "sub/file")
    assert not has_mailbox(str(home), "-", "sub/file")


# --- NEWSENDER ---------------------------------------------------------------------


def test_new_sender(home: Path) -> None:
    args = (str(home), "joe-list", "example.org", "-", "list")
    assert new_sender(*args, "a@b") == "a@b"
    write(home, ".qmail-list-owner", "&owner@x\n")
    assert new_sender(*args, "a@b") == "joe-list-owner@example.org"
    write(home, ".qmail-list-owner-default", "&owner@x\n")
    assert new_sender(*args, "a@b") == "joe-list-owner-@example.org-@[]"
    assert new_sender(*args, "") == ""
    assert new_sender(*args, "#@[]") == "#@[]"


# --- parsing -----------------------------------------------------------------------


def test_parse_every_kind() -> None:
    text = (
        "# a comment\n"
        "|preline procmail  \t\n"
        "./Maildir/\n"
        "/var/mail/joe\n"
        ".mbox\n"
        "&fred@example.org\n"
        "bob@example.org\n"
        "\n"
        "+list\n"
        "+other\n"
        " leading-space\n"
        "&"
    )
    assert parse(text.encode()) == [
        Comment(1, " a comment"),
        Program(2, "preline procmail"),
        Maildir(3, "./Maildir/"),
        Mbox(4, "/var/mail/joe"),
        Mbox(5, ".mbox"),
        Forward(6, "fred@example.org"),
        Forward(7, "bob@example.org"),
        ForwardOnly(9),
        Forward(11, " leading-space"),
        Forward(12, ""),
    ]


def test_parse_nul_ends_line_text() -> None:
    assert parse(b"|echo hi\0; rm -rf x\n") == [Program(1, "echo hi")]


@pytest.mark.parametrize("text", ["\n&a@b\n", "   \n&a@b\n", "\t", "", "\0x\n"])
def test_first_line_blank(text: str) -> None:
    with pytest.raises(ControlFileError) as info:
        parse(text, ".qmail-x")
    assert (info.value.file, info.value.line) == (".qmail-x", 1)


def test_later_blank_lines_ignored() -> None:
    assert parse("&a@b\n\n   \n&c@d") == [Forward(1, "a@b"), Forward(4, "c@d")]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet=st.sampled_from("#|./&+ \t\n\0ax@"), max_size=60))
def test_parse_any_input_only_control_file_error(data: bytes | str) -> None:
    try:
        result = parse(data)
    except ControlFileError as exc:
        assert exc.line == 1
        return
    for ins in result:
        assert ins.line >= 1
        if isinstance(ins, Maildir):
            assert ins.path.endswith("/")
        if isinstance(ins, Program | Maildir | Mbox):
            assert "\0" not in (ins.command if isinstance(ins, Program) else ins.path)
