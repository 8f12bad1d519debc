"""Is a control/beforemote line something eqmail can run?  And eQmail's own fragments.

eqmail runs each line of control/beforemote as a filter command (message on stdin,
message to send on stdout; see eqmail.spp.beforemote).  eQmail 1.09 instead *sourced*
the file as a shell fragment that had to end by exec'ing qmail-remote itself; its
installer writes one that does nothing else::

    export DKREMOTE="$BINDIR/qmail-remote"
    np="$BINDIR/qmail-remote" ; exec $np "$@"

Run as eqmail commands, such lines print nothing and every remote delivery defers.
This module tells them apart -- for ``eqmailctl check`` (:func:`line_problem`) and for
``import-qmail`` (:func:`import_fragment`: drop the stock fragment, translate the one
shape that maps cleanly, refuse the rest with a reason).  Pure functions on text, plus
one PATH look-up (shutil.which) for the command word.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass

HOOK_PATH = "/usr/local/bin:/usr/bin:/bin"  # eqmail.delivery.bfrmt.HOOK_ENV's PATH

# Shell words that make a line a fragment for /bin/sh to source, not a command.
_FRAGMENT_WORDS = {"export", "exec", "set", "unset", ".", "source", "return", "exit", "eval",
                   "if", "then", "fi", "case", "esac", "for", "while", "do", "done"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SH_BUILTINS = {":", "true", "false", "echo", "printf", "test", "[", "read", "cd", "umask"}
# "$BINDIR/qmail-remote" "$@", $np "$@", "$DKREMOTE" "$@": eQmail's ways to call it
_REMOTE_CALL = re.compile(r'^(exec\s+)?("?\$\{?(np|DKREMOTE)\}?"?|"?\$\{?BINDIR\}?/qmail-remote"?|'
                          r'\S*/qmail-remote)\s+"\$@"\s*$')


def _significant(text: str) -> list[str]:
    """qmail's control_readfile: blank lines and lines starting with # do not count."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def line_problem(line: str) -> str | None:
    """Why this control/beforemote line cannot work as an eqmail hook command, or None."""
    if "qmail-remote" in line or "$@" in line or "$BINDIR" in line or "${BINDIR}" in line:
        return ("runs qmail-remote itself (an eQmail qmail-bfrmt fragment); an eqmail hook only "
                "filters the message: write the filter command alone")
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        return f"cannot be parsed as a shell command ({e})"
    if not words:
        return None
    first = words[0]
    if first in _FRAGMENT_WORDS or _ASSIGNMENT.match(first):
        return f"is shell-fragment syntax ({first.split('=')[0]}...), not a command that filters the message"
    if first in _SH_BUILTINS:
        return None
    if "/" in first:
        if not (os.path.isfile(first) and os.access(first, os.X_OK)):
            return f"{first} is not an executable file"
        return None
    if shutil.which(first, path=HOOK_PATH) is None:
        return f"{first} is not found in the hooks' PATH ({HOOK_PATH})"
    return None


def is_stock_fragment(text: str) -> bool:
    """eQmail's installer default (or any fragment that only hands over to qmail-remote)."""
    lines = _significant(text)
    if not lines:
        return False
    for ln in lines:
        if re.fullmatch(r'export\s+DKREMOTE="?\$\{?BINDIR\}?/qmail-remote"?', ln):
            continue
        parts = [p.strip() for p in ln.split(";")]
        if all(re.fullmatch(r'np="?\$\{?BINDIR\}?/qmail-remote"?', p) or _REMOTE_CALL.match(p)
               for p in parts if p):
            continue
        return False
    return True


@dataclass(frozen=True)
class Imported:
    """What import-qmail does with an eQmail control/beforemote."""
    commands: tuple[str, ...] | None  # the eqmail hook lines to install, or None: drop it
    note: str


def import_fragment(text: str) -> Imported:
    """The stock fragment is dropped; ``FILTER | <qmail-remote call>`` (plus the stock
    lines) becomes the hook ``FILTER``; anything else is not carried over, with why."""
    if is_stock_fragment(text):
        return Imported(None, "control/beforemote is eQmail's stock qmail-bfrmt fragment (it only "
                              "runs qmail-remote): not carried over, eqmail sends directly")
    filters: list[str] = []
    for ln in _significant(text):
        if is_stock_fragment(ln):
            continue
        head, bar, tail = ln.rpartition("|")
        if bar and _REMOTE_CALL.match(tail.strip()) and head.strip() and line_problem(head) is None:
            filters.append(head.strip())
            continue
        return Imported(None, f"control/beforemote is a qmail-bfrmt shell fragment eqmail cannot run "
                              f"(line {ln!r}: {line_problem(ln) or 'not a filter piped into qmail-remote'}): "
                              f"not carried over, so remote mail goes out WITHOUT it; rewrite it as "
                              f"eqmail before-remote commands (one filter per line)")
    if not filters:
        return Imported(None, "control/beforemote has no command: not carried over")
    return Imported(tuple(filters), "control/beforemote translated from a qmail-bfrmt fragment to "
                                    f"eqmail hook commands: {'; '.join(filters)}")
