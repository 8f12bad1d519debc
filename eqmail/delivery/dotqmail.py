"""The user's .qmail files: which one applies, what it says, and NEWSENDER.

What it owns (qmail-core.md §3.4, dot-qmail(5)):

* selection -- :func:`candidates` lists ``.qmail<dash><safeext>`` and then the
  ``-default`` chain (``foo-bar`` -> ``.qmail-foo-bar``, ``.qmail-foo-default``,
  ``.qmail-default``) with the DEFAULT value each would set; :func:`select` is qmail-
  local's one rule over them (the first file a probe finds applies; none found with a
  non-empty dash is :class:`NoMailbox`, "Sorry, no mailbox here by that name.");
  :func:`find` is that rule with the delivery's probe (open it, refuse a world-writable
  one (conf-patrn 002), note the owner-execute bit (forward-only)), :func:`has_mailbox`
  the same rule with a stat probe for the SMTP listener's RCPT check;
* parsing -- :func:`parse` turns the file's bytes into typed instructions
  (:class:`Comment`, :class:`Program`, :class:`Maildir`, :class:`Mbox`,
  :class:`Forward`, :class:`ForwardOnly` for ``+list``);
* :func:`new_sender` -- the envelope sender for forwards (``-owner`` / ``-owner-default``).

Privilege: :func:`find` runs as the recipient (the caller has already switched uid/gid)
and only reads files under the recipient's home directory; :func:`has_mailbox` runs in
the SMTP listener (eqmaild) and only stats names there (search permission on the home
is enough; without it the answer is "cannot tell", never "no mailbox").

Failures: :class:`DotQmailError` (always temporary, text in qmail's words) when a
.qmail file exists but cannot be used (or, for :func:`has_mailbox`, cannot be looked
at); :class:`NoMailbox` (permanent) as above; :class:`~eqmail.errors.ControlFileError` from
:func:`parse` when the first line is blank -- the only malformed .qmail qmail refuses.
Names built from the address extension never contain ``/``: such an extension simply has
no .qmail file, so an address cannot point outside the home directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from eqmail import textio
from eqmail.control.assign import ascii_lower
from eqmail.errors import ControlFileError

#: conf-patrn: mode bits that make qmail-local refuse a home directory or .qmail file.
PATRN = 0o002
#: The owner-execute bit marks a .qmail file "forward-only".
FORWARD_ONLY_BIT = 0o100
#: Bound on a .qmail file read into memory (qmail reads it whole; long lists stay tiny).
MAX_DOTQMAIL_BYTES = 16 * 1024 * 1024

# Open errors that mean "there is no such .qmail file" (qmail: any non-temporary error
# except EACCES/EPERM).  Everything else is temporary: it may exist and must not be
# skipped in favour of a -default file or the default delivery.
_ABSENT_ERRNOS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO, errno.ENODEV,
})


#: qmail-local's permanent failure when no .qmail file matches an extension address.
NO_MAILBOX_TEXT = "Sorry, no mailbox here by that name. (#5.1.1)"

_Found = TypeVar("_Found")


class NoMailbox(Exception):
    """No .qmail file applies to an address with an extension: it does not exist."""

    text = NO_MAILBOX_TEXT


class DotQmailError(Exception):
    """A .qmail file exists but cannot be used; ``text`` is the temporary-failure text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass(frozen=True)
class Comment:
    line: int
    text: str


@dataclass(frozen=True)
class Program:
    """``|command``: run ``/bin/sh -c command`` in the home directory."""

    line: int
    command: str


@dataclass(frozen=True)
class Maildir:
    """A line starting with ``.`` or ``/`` and ending in ``/``; relative to home."""

    line: int
    path: str


@dataclass(frozen=True)
class Mbox:
    """A line starting with ``.`` or ``/`` not ending in ``/``; relative to home."""

    line: int
    path: str


@dataclass(frozen=True)
class Forward:
    """``&address`` or a line starting with any other character."""

    line: int
    address: str


@dataclass(frozen=True)
class ForwardOnly:
    """``+list`` (undocumented, in qmail too): later file/program lines are refused."""

    line: int


Instruction = Comment | Program | Maildir | Mbox | Forward | ForwardOnly


@dataclass(frozen=True)
class Candidate:
    name: str
    default: str | None  # value of $DEFAULT if this file is used, None: leave unset


@dataclass(frozen=True)
class DotQmail:
    """The .qmail file that applies to a delivery."""

    name: str  # relative to home, e.g. ".qmail-foo-default"
    data: bytes
    forward_only: bool  # owner-execute bit set
    default: str | None


def safe_ext(ext: str) -> str:
    """The extension as used in file names: ASCII-lowercased, ``.`` -> ``:``."""
    return ascii_lower(ext).replace(".", ":")


def candidates(dash: str, ext: str) -> list[Candidate]:
    """Every .qmail name qmail-local would try, in order, with its DEFAULT value."""
    safe = safe_ext(ext)
    exact_default: str | None = None
    if safe.endswith("default"):
        # A literal "...default" extension still sets DEFAULT, as in qmail.
        exact_default = ext[len(safe) - 7:]
    found = [Candidate(f".qmail{dash}{safe}", exact_default)]
    # Cut points: the start, and just after each '-' (longest prefix first).
    for cut in range(len(safe), -1, -1):
        if cut == 0 or safe[cut - 1] == "-":
            found.append(Candidate(f".qmail{dash}{safe[:cut]}default", ext[cut:]))
    return found


def _open_regular(home: str, name: str) -> tuple[int, os.stat_result] | None:
    """Open home/name for reading if it is a regular file; None if it does not exist."""
    if "/" in name or "\0" in name:
        return None  # extension text never names a path outside home
    path = os.path.join(home, name)
    try:
        # O_NONBLOCK: opening a FIFO someone left there must not hang the delivery.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return None
        raise DotQmailError(f"Unable to open {name}: {exc.strerror}. (#4.3.0)") from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise DotQmailError(f"Unable to open {name}: {exc.strerror}. (#4.3.0)") from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None  # a directory or device named .qmail-foo counts as absent
    return fd, st


def _read_bounded(fd: int, name: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > MAX_DOTQMAIL_BYTES:
                raise DotQmailError(f"Uh-oh: {name} is too big. (#4.2.1)")
            chunks.append(chunk)
    except OSError as exc:
        raise DotQmailError(f"Unable to read {name}: {exc.strerror}. (#4.3.0)") from exc
    return b"".join(chunks)


def select(home: str, dash: str, ext: str,
           probe: Callable[[str, str], _Found | None]) -> tuple[Candidate, _Found] | None:
    """qmail-local's choice of .qmail file: the first of :func:`candidates` for which
    ``probe(home, name)`` returns something (None means "no such file").

    Returns None when nothing was found and ``dash`` is empty (the user's own address:
    the default delivery applies).  Raises :class:`NoMailbox` when nothing was found
    for an address with a dash -- the one rule that makes a local address not exist.
    The probe's own exceptions (DotQmailError) pass through.
    """
    for cand in candidates(dash, ext):
        got = probe(home, cand.name)
        if got is not None:
            return cand, got
    if dash:
        raise NoMailbox(NO_MAILBOX_TEXT)
    return None


def find(home: str, dash: str, ext: str) -> DotQmail | None:
    """The .qmail file that applies (:func:`select` with open), read; None when the
    default delivery applies.

    Raises NoMailbox (see :func:`select`), DotQmailError for a world-writable file
    (``Uh-oh: .qmail file is writable. (#4.7.0)``) or an open/read error other than
    "does not exist".
    """
    hit = select(home, dash, ext, _open_regular)
    if hit is None:
        return None
    cand, (fd, st) = hit
    try:
        if st.st_mode & PATRN:
            raise DotQmailError("Uh-oh: .qmail file is writable. (#4.7.0)")
        data = _read_bounded(fd, cand.name)
    finally:
        os.close(fd)
    return DotQmail(cand.name, data, bool(st.st_mode & FORWARD_ONLY_BIT), cand.default)


def _stat_regular(home: str, name: str) -> bool | None:
    """True if home/name is a regular file (following links, as open does); None if it
    does not exist or is something else; DotQmailError when that cannot be told."""
    if "/" in name or "\0" in name:
        return None
    try:
        st = os.stat(os.path.join(home, name))
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return None
        # One text per home directory and error (the listener logs each text once).
        raise DotQmailError(f"Unable to look for .qmail files: {exc.strerror}. (#4.3.0)") from exc
    return True if stat.S_ISREG(st.st_mode) else None


def has_mailbox(home: str, dash: str, ext: str) -> bool:
    """Whether delivery would find a .qmail file or the default delivery for this
    address (:func:`select` with stat, no file is opened).  False only when delivery
    would bounce with NO_MAILBOX_TEXT; DotQmailError when it cannot be told (no search
    permission on the home directory, an I/O error)."""
    try:
        select(home, dash, ext, _stat_regular)
    except NoMailbox:
        return False
    return True


def _exists(home: str, name: str) -> bool:
    if "/" in name or "\0" in name:
        return False
    try:
        os.stat(os.path.join(home, name))
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return False
        raise DotQmailError(f"Unable to open {name}: {exc.strerror}. (#4.3.0)") from exc
    return True


def new_sender(home: str, local: str, domain: str, dash: str, ext: str, sender: str) -> str:
    """NEWSENDER: the envelope sender for forwarded copies.

    A mailing list ``.qmail-list`` with a ``.qmail-list-owner`` gets bounces sent to
    ``local-owner@domain``; with ``.qmail-list-owner-default`` as well they come back
    VERP-style (``local-owner-@domain-@[]``).  Bounces (sender ``""``/``#@[]``) stay
    bounces.
    """
    if sender in ("", "#@[]"):
        return sender
    base = f".qmail{dash}{safe_ext(ext)}"
    if not _exists(home, base + "-owner"):
        return sender
    if _exists(home, base + "-owner-default"):
        return f"{local}-owner-@{domain}-@[]"
    return f"{local}-owner@{domain}"


def _parse_line(text: str, number: int) -> Instruction | None:
    first = text[0]
    if first == "#":
        return Comment(number, text[1:])
    if first in "./":
        if text.endswith("/"):
            return Maildir(number, text)
        return Mbox(number, text)
    if first == "|":
        return Program(number, text[1:])
    if first == "+":
        # Only "+list" means anything; other '+' lines are ignored, as in qmail.
        return ForwardOnly(number) if text == "+list" else None
    if first == "&":
        return Forward(number, text[1:])
    return Forward(number, text)


def parse(data: bytes | str, filename: str = ".qmail") -> list[Instruction]:
    """The instructions of a .qmail file (or of the default delivery text), in order.

    Trailing spaces and tabs are stripped; a NUL ends a line's text (qmail handles each
    line as a C string); empty lines after the first are ignored.  Raises
    ControlFileError(filename, 1, ...) if the first line is blank.
    """
    text = textio.decode(data) if isinstance(data, bytes) else data
    if text.endswith("\n"):
        text = text[:-1]  # the final newline ends the last line, it does not add one
    result: list[Instruction] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("\0", 1)[0].rstrip(" \t")
        if not line:
            if number == 1:
                raise ControlFileError(filename, 1, "first line of .qmail file is blank")
            continue
        instruction = _parse_line(line, number)
        if instruction is not None:
            result.append(instruction)
    return result
