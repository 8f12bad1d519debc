"""Recipient local part -> delivery user (qmail-users, qmail-getpw, qmail-lspawn's lookup).

What it owns: the mapping from the local part of a local recipient to the six values that
qmail-lspawn hands to qmail-local -- user, uid, gid, home, dash, ext (qmail-core.md
§3.1-§3.3).  Three sources are tried in qmail's order by :func:`resolve`:

1. ``users/assign`` (qmail-users(5) syntax), compiled in memory by :meth:`Assign.parse`
   instead of into ``users/cdb``; exact ``=`` entries beat ``+`` wildcards, a longer
   wildcard beats a shorter one, the first of two duplicates wins.
2. The password database (qmail-getpw): the longest prefix of the local part that ends just
   before a conf-break character (eQmail 1.09: ``+``), lowercased and shorter than 32
   characters, naming a user with uid != 0 whose home directory exists and is owned by
   that uid.
3. The alias user (in eqmail: the instance's ``alias/`` directory), with dash ``-`` and
   the whole local part as ext.

Privilege: none needed.  It reads the password database and stats home directories; the
caller (the root spawner) is the one that refuses uid 0 before switching to the user.

Failures: :class:`~eqmail.errors.ControlFileError` (file, line, reason) for a bad
``users/assign`` line; :class:`TemporaryLookupError` when a home directory cannot be
checked for a temporary reason (qmail-getpw's exit 115, "NFS failure"), so the delivery
is deferred rather than sent to the alias user by mistake.
"""

from __future__ import annotations

import errno
import os
import pwd
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from eqmail.control.assign import Assign, UserEntry, ascii_lower

#: qmail-getpw ignores passwd names this long or longer.
MAX_USERNAME = 32
#: conf-break: the address-extension delimiter (eQmail 1.09: ``+``).
CONF_BREAK = "+"

# errno values qmail's error_temp() treats as temporary: a home directory we cannot stat
# for one of these reasons may well exist, so guessing "no such user" would misdeliver.
_TEMPORARY_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EINTR", "ENOMEM", "ETXTBSY", "EIO", "ETIMEDOUT", "EAGAIN", "ENFILE", "EMFILE",
        "ENOSPC", "ENOLCK", "ESTALE", "EDQUOT", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN",
        "ENETUNREACH", "ECONNREFUSED", "EREMOTEIO",
    )
    if hasattr(errno, name)
)

class TemporaryLookupError(Exception):
    """The user could not be determined right now (qmail-getpw exit 115); defer."""


def _prefixes(local: str, delimiter: str) -> list[tuple[str, str | None]]:
    """(candidate name, ext or None for the bare name), longest candidate first."""
    found: list[tuple[str, str | None]] = [(local, None)]
    for index in range(len(local) - 1, -1, -1):
        if local[index] == delimiter:
            found.append((local[:index], local[index + 1:]))
    return found


def getpw_lookup(
    local: str,
    delimiter: str = CONF_BREAK,
    *,
    getpwnam: Callable[[str], Any] = pwd.getpwnam,
    also_temporary: frozenset[int] = frozenset(),
) -> UserEntry | None:
    """qmail-getpw's mapping through the password database; None if no user fits.

    ``getpwnam`` is injectable so tests need not create system accounts; it must raise
    KeyError for an unknown name and return an object with pw_name, pw_uid, pw_gid and
    pw_dir.  Raises TemporaryLookupError if a home directory cannot be checked.
    ``also_temporary``: more errno values that count as "cannot be checked" -- the
    SMTP listener's RCPT check, which has less privilege than delivery, passes EACCES.
    """
    for prefix, ext in _prefixes(local, delimiter):
        name = ascii_lower(prefix)
        if not name or len(name) >= MAX_USERNAME or "\0" in name:
            continue
        try:
            pw = getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid == 0:
            continue  # root never gets mail
        try:
            owner = os.stat(pw.pw_dir).st_uid
        except OSError as exc:
            if exc.errno in _TEMPORARY_ERRNOS or exc.errno in also_temporary:
                raise TemporaryLookupError(
                    f"Unable to stat home directory of {name}: {exc.strerror}"
                ) from exc
            continue
        except ValueError:  # NUL in pw_dir: cannot exist
            continue
        if owner != pw.pw_uid:
            continue
        if ext is None:
            return UserEntry(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "", "")
        # The dash used to build .qmail names is always '-', whatever conf-break is.
        return UserEntry(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "-", ext)
    return None


def resolve(
    local: str,
    assign: Assign | None,
    alias: UserEntry,
    delimiter: str = CONF_BREAK,
    *,
    getpwnam: Callable[[str], Any] = pwd.getpwnam,
    also_temporary: frozenset[int] = frozenset(),
) -> UserEntry:
    """users/assign, then the password database, then the alias user.

    ``alias`` supplies user, uid, gid and home of the alias account; its dash and ext
    are replaced by ``-`` and the whole local part, so ``postmaster`` is delivered by
    ``alias/.qmail-postmaster`` and anything else by ``alias/.qmail-default``.
    """
    if assign is not None:
        entry = assign.lookup(local)
        if entry is not None:
            return entry
    entry = getpw_lookup(local, delimiter, getpwnam=getpwnam, also_temporary=also_temporary)
    if entry is not None:
        return entry
    return replace(alias, dash="-", ext=local)
