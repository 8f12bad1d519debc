"""control/beforemote lines: what eqmail can run, and eQmail's fragments on import."""

from __future__ import annotations

import pytest

from eqmail.delivery.hookcheck import import_fragment, is_stock_fragment, line_problem

STOCK = ('#!/bin/sh\n# config file for qmail-bfrmt\n#\n\n# Enter commands here, like\n\n'
         'export DKREMOTE="$BINDIR/qmail-remote"\n'
         'np="$BINDIR/qmail-remote" ; exec $np "$@"\n')


@pytest.mark.parametrize("line, problem", [
    ("cat", None),
    ("/bin/cat -u", None),
    ("sed -e 's/a/b/'", None),
    (":", None),
    ('export DKREMOTE="$BINDIR/qmail-remote"', "runs qmail-remote itself"),
    ('np="$BINDIR/qmail-remote" ; exec $np "$@"', "runs qmail-remote itself"),
    ('dksign | exec "$DKREMOTE" "$@"', "runs qmail-remote itself"),
    ("FOO=bar", "is shell-fragment syntax (FOO...)"),
    ("exec cat", "is shell-fragment syntax (exec...)"),
    ("/nonexistent/signer", "/nonexistent/signer is not an executable file"),
    ("no-such-program-here --x", "no-such-program-here is not found in the hooks' PATH"),
    ("cat 'unbalanced", "cannot be parsed as a shell command"),
])
def test_line_problem(line: str, problem: str | None) -> None:
    got = line_problem(line)
    if problem is None:
        assert got is None
    else:
        assert got is not None and got.startswith(problem), got


def test_stock_fragment_is_recognised_and_dropped() -> None:
    assert is_stock_fragment(STOCK)
    assert is_stock_fragment('exec "$BINDIR/qmail-remote" "$@"\n')
    assert not is_stock_fragment("")
    assert not is_stock_fragment(STOCK + "logger sent\n")
    got = import_fragment(STOCK)
    assert got.commands is None and "stock qmail-bfrmt fragment" in got.note


def test_a_filter_piped_into_qmail_remote_is_translated() -> None:
    got = import_fragment(STOCK.replace('exec $np "$@"', 'cat | exec $np "$@"'))
    assert got.commands is None  # np=...; cat | ... is one line with a ';': not the simple shape
    got = import_fragment('export DKREMOTE="$BINDIR/qmail-remote"\n'
                          'sed -e "s/^X-Secret:.*//" | "$BINDIR/qmail-remote" "$@"\n')
    assert got.commands == ('sed -e "s/^X-Secret:.*//"',), got
    assert "translated" in got.note


def test_anything_else_is_left_behind_with_a_warning() -> None:
    got = import_fragment('if [ "$1" = x ]; then exec "$BINDIR/qmail-remote" "$@"; fi\n')
    assert got.commands is None
    assert "remote mail goes out WITHOUT it" in got.note
