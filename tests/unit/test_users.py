"""users/assign parsing and recipient -> user mapping (qmail-users, qmail-getpw)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.control.assign import Assign, UserEntry
from eqmail.delivery.users import getpw_lookup, resolve
from eqmail.errors import ControlFileError

ASSIGN = """\
=joe:joe:1001:1001:/home/joe:::
+joe-:joe:1001:1001:/home/joe:-::
+list-:lists:1002:1002:/home/lists:-:l-:
+list-big-:big:1003:1003:/home/big:-::
=Mixed:mixed:1004:1004:/home/mixed:::
=joe:second:9:9:/nowhere:::
.
=after:ignored:1:1:/x:::
"""

ALIAS = UserEntry("alias", 7790, 2108, "/srv/eqmail/alias", "", "")


def test_exact_entry() -> None:
    entry = Assign.parse(ASSIGN).lookup("joe")
    assert entry == UserEntry("joe", 1001, 1001, "/home/joe", "", "")


def test_exact_is_case_insensitive_and_first_duplicate_wins() -> None:
    assign = Assign.parse(ASSIGN)
    assert assign.lookup("JOE") == UserEntry("joe", 1001, 1001, "/home/joe", "", "")
    assert assign.lookup("mixed") == UserEntry("mixed", 1004, 1004, "/home/mixed", "", "")


def test_wildcard_appends_rest_in_original_case() -> None:
    entry = Assign.parse(ASSIGN).lookup("Joe-Foo.Bar")
    assert entry == UserEntry("joe", 1001, 1001, "/home/joe", "-", "Foo.Bar")


def test_wildcard_prefix_ext_and_longest_wins() -> None:
    assign = Assign.parse(ASSIGN)
    assert assign.lookup("list-x") == UserEntry("lists", 1002, 1002, "/home/lists", "-", "l-x")
    assert assign.lookup("list-big-y") == UserEntry("big", 1003, 1003, "/home/big", "-", "y")
    assert assign.lookup("list-bigger") == UserEntry(
        "lists", 1002, 1002, "/home/lists", "-", "l-bigger"
    )


def test_no_match_and_stop_at_dot() -> None:
    assign = Assign.parse(ASSIGN)
    assert assign.lookup("nobody-here") is None
    assert assign.lookup("after") is None


def test_catch_all_wildcard() -> None:
    assign = Assign.parse("+:alias:7790:2108:/var/qmail/alias:-::\n.\n")
    assert assign.lookup("Postmaster") == UserEntry(
        "alias", 7790, 2108, "/var/qmail/alias", "-", "Postmaster"
    )


def test_exact_beats_wildcard() -> None:
    assign = Assign.parse("+joe:w:1:1:/w:-:w:\n=joe:e:2:2:/e:::\n.\n")
    assert assign.lookup("joe").user == "e"
    assert assign.lookup("joex").ext == "wx"


def test_dot_without_final_newline_is_accepted() -> None:
    assert Assign.parse("=a:a:1:1:/a:::\n.").lookup("a") is not None


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("=a:a:1:1:/a:::\n", 2, "missing final line"),
        ("", 1, "missing final line"),
        ("=a:a:1:1:/a:::\nxyz\n.\n", 2, "must start with"),
        ("\n.\n", 1, "must start with"),
        ("=a:a:1:1:/a::\n.\n", 1, "expected 7 fields"),
        ("=a:a:1:1:/a::::\n.\n", 1, "expected 7 fields"),
        ("=a:a:1:1:/a:::junk\n.\n", 1, "expected 7 fields"),
        ("=a:a:x:1:/a:::\n.\n", 1, "uid 'x'"),
        ("=a:a:1:-1:/a:::\n.\n", 1, "gid '-1'"),
        ("=a:a:1:1:home:::\n.\n", 1, "not an absolute path"),
        ("=a::1:1:/a:::\n.\n", 1, "empty user"),
    ],
)
def test_bad_lines_name_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(ControlFileError) as info:
        Assign.parse(text, "users/assign")
    assert info.value.file == "users/assign"
    assert info.value.line == line
    assert reason in info.value.reason


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("=+.:/0123456789abAB-\n\0 x"), max_size=80) | st.text())
def test_assign_parse_any_text_only_control_file_error(text: str) -> None:
    try:
        assign = Assign.parse(text)
    except ControlFileError as exc:
        assert exc.line >= 1
        return
    assign.lookup(text[:10])  # lookup on any input never raises


# --- qmail-getpw -------------------------------------------------------------------


@pytest.fixture()
def passwd(tmp_path):
    """A fake getpwnam with one mail user whose home is owned by its uid.

    As root the home is chowned to an unprivileged uid; as a normal user the user's own
    uid is used (getpw refuses uid 0 either way).
    """
    uid = os.getuid() if os.getuid() != 0 else 4242
    home = tmp_path / "joe"
    home.mkdir()
    if os.getuid() == 0:
        os.chown(home, uid, uid)
    users = {
        "joe": SimpleNamespace(pw_name="joe", pw_uid=uid, pw_gid=77, pw_dir=str(home)),
        "joe+list": SimpleNamespace(pw_name="joe+list", pw_uid=uid, pw_gid=78, pw_dir=str(home)),
        "root2": SimpleNamespace(pw_name="root2", pw_uid=0, pw_gid=0, pw_dir=str(home)),
        "nohome": SimpleNamespace(pw_name="nohome", pw_uid=uid, pw_gid=1, pw_dir="/nonexistent/x"),
        # home exists but belongs to another uid:
        "wrongowner": SimpleNamespace(pw_name="wrongowner", pw_uid=uid + 1, pw_gid=1, pw_dir=str(home)),
        "a" * 32: SimpleNamespace(pw_name="a" * 32, pw_uid=uid, pw_gid=1, pw_dir=str(home)),
    }

    def getpwnam(name: str) -> SimpleNamespace:
        return users[name]

    return SimpleNamespace(getpwnam=getpwnam, uid=uid, home=str(home))


def test_getpw_bare_name(passwd) -> None:
    entry = getpw_lookup("Joe", getpwnam=passwd.getpwnam)
    assert entry == UserEntry("joe", passwd.uid, 77, passwd.home, "", "")


def test_getpw_extension_after_delimiter_uses_dash(passwd) -> None:
    entry = getpw_lookup("joe+Foo+Bar", getpwnam=passwd.getpwnam)
    assert entry == UserEntry("joe", passwd.uid, 77, passwd.home, "-", "Foo+Bar")


def test_getpw_longest_prefix_first(passwd) -> None:
    entry = getpw_lookup("joe+list+x", getpwnam=passwd.getpwnam)
    assert entry == UserEntry("joe+list", passwd.uid, 78, passwd.home, "-", "x")


def test_getpw_netqmail_delimiter(passwd) -> None:
    assert getpw_lookup("joe-foo", "-", getpwnam=passwd.getpwnam).ext == "foo"
    assert getpw_lookup("joe-foo", "+", getpwnam=passwd.getpwnam) is None


@pytest.mark.parametrize("local", ["root2", "nohome", "wrongowner", "a" * 32, "", "+x", "zz"])
def test_getpw_refusals(passwd, local: str) -> None:
    assert getpw_lookup(local, getpwnam=passwd.getpwnam) is None


def test_getpw_real_root_is_never_a_mail_user() -> None:
    assert getpw_lookup("root") is None
    assert getpw_lookup("root+foo") is None


def test_resolve_order(passwd) -> None:
    assign = Assign.parse("=joe:assigned:5:5:/srv/joe:::\n.\n")
    assert resolve("joe", assign, ALIAS, getpwnam=passwd.getpwnam).user == "assigned"
    assert resolve("joe+x", assign, ALIAS, getpwnam=passwd.getpwnam) == UserEntry(
        "joe", passwd.uid, 77, passwd.home, "-", "x"
    )
    assert resolve("joe+x", None, ALIAS, getpwnam=passwd.getpwnam).user == "joe"


def test_resolve_falls_back_to_alias_with_whole_local_part(passwd) -> None:
    entry = resolve("PostMaster", None, ALIAS, getpwnam=passwd.getpwnam)
    assert entry == UserEntry("alias", 7790, 2108, "/srv/eqmail/alias", "-", "PostMaster")


def test_assign_tables_compare_by_their_entries() -> None:
    """A reload compares Controls.assign: the same assignments are equal."""
    text = "=joe:joe:1000:1000:/home/joe:::\n+list-:lists:1001:1001:/home/lists:-:l-:\n.\n"
    assert Assign.parse(text) == Assign.parse(text + "ignored after the dot\n")
    assert hash(Assign.parse(text)) == hash(Assign.parse(text))
    assert Assign.parse(text) != Assign.parse(text.replace("1000:1000", "1002:1002"))
