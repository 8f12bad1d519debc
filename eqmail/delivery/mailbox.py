"""Does this recipient have a mailbox here?  The SMTP listener's RCPT check.

What it owns: :func:`lookup`, the one answer to "would local delivery find a mailbox
for this address", made of the very functions delivery runs -- nothing here restates a
rule:

1. :func:`eqmail.queue.rewrite.rewrite` (qmail-send): ``locals``, ``virtualdomains``
   (the ``prepend-`` local part), ``percenthack``, ``envnoathost``.  An address that is
   not delivered locally (relay, smtproutes) is :attr:`Mailbox.NOT_LOCAL`: not checked.
2. :meth:`LocalUsers.resolve` = :func:`eqmail.delivery.users.resolve` (qmail-lspawn):
   users/assign exact and wildcard entries, the password database with the ``+``
   extension split, the alias user as the fallback with the whole local part as ext.
   The local delivery worker resolves recipients through the same LocalUsers.
3. :func:`eqmail.delivery.dotqmail.has_mailbox` = :func:`~eqmail.delivery.dotqmail.select`
   (qmail-local): ``.qmail-ext``, the ``-default`` chain, and the rule that an address
   with a dash and no matching file does not exist (``Sorry, no mailbox here by that
   name. (#5.1.1)``).  Delivery's :func:`~eqmail.delivery.dotqmail.find` is the same
   select with an opening probe.

Privilege: none beyond what the listener (eqmaild) has: it reads the password database
and stats home directories and names in them.  It never opens a user's file.

Failure modes: none raise.  Whenever the answer cannot be decided -- a home directory
without search permission (EACCES), an I/O error, a temporary password-database failure,
a user with uid 0 (delivery defers those) -- the result is :attr:`Mailbox.UNDECIDED`,
which the caller must treat as "accept": a check that cannot look must never refuse mail
that delivery would take.
"""

from __future__ import annotations

import enum
import errno
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eqmail.control.assign import Assign, UserEntry
from eqmail.delivery import dotqmail
from eqmail.delivery.users import CONF_BREAK, TemporaryLookupError, resolve
from eqmail.queue.rewrite import RewriteRules, rewrite
from eqmail.queue.schedule import Channel

_NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM})


class Mailbox(enum.Enum):
    EXISTS = "exists"          # delivery finds a .qmail file or the default delivery
    UNKNOWN = "unknown"        # delivery would bounce: no mailbox here by that name
    UNDECIDED = "undecided"    # cannot be told now: accept
    NOT_LOCAL = "not local"    # delivered remotely: not checked


@dataclass(frozen=True)
class Lookup:
    verdict: Mailbox
    reason: str = ""  # why UNDECIDED (for the log)

    @property
    def refuse(self) -> bool:
        return self.verdict is Mailbox.UNKNOWN


@dataclass(frozen=True)
class LocalUsers:
    """What maps a local part to a user: users/assign (compiled once by eqmail.control),
    the alias user and conf-break."""

    assign: Assign | None
    alias: UserEntry
    delimiter: str = CONF_BREAK

    @classmethod
    def build(cls, assign: Assign | None, alias_uid: int, alias_gid: int,
              alias_home: str) -> LocalUsers:
        """From Controls.assign (parsed by eqmail.control) and the alias account of the
        instance (home = the instance's alias/ directory)."""
        return cls(assign, UserEntry("alias", alias_uid, alias_gid, alias_home, "-", ""))

    def resolve(self, local: str, *, getpwnam: Callable[[str], Any] = pwd.getpwnam,
                also_temporary: frozenset[int] = frozenset()) -> UserEntry:
        return resolve(local, self.assign, self.alias, self.delimiter, getpwnam=getpwnam,
                       also_temporary=also_temporary)


def lookup(address: str, rules: RewriteRules, users: LocalUsers, *,
           vmap: dict[str, str] | None = None,
           getpwnam: Callable[[str], Any] = pwd.getpwnam) -> Lookup:
    """Would local delivery find a mailbox for ``address`` (an SMTP envelope address)?

    See the module docstring for the steps.  ``vmap`` is ``rules.vmap()`` computed once
    by the caller; ``getpwnam`` is injectable for tests.
    """
    channel, rewritten = rewrite(address, rules, vmap)
    if channel is not Channel.LOCAL:
        return Lookup(Mailbox.NOT_LOCAL)
    local = rewritten.rpartition("@")[0]
    if local == "":
        return Lookup(Mailbox.EXISTS)  # qmail-lspawn: a successful trash delivery
    try:
        # A home the listener may not stat is "cannot tell", not "no such user" (which
        # would send the address to the alias user and refuse it there).
        user = users.resolve(local, getpwnam=getpwnam, also_temporary=_NO_PERMISSION)
    except TemporaryLookupError as exc:
        return Lookup(Mailbox.UNDECIDED, str(exc))
    except (OSError, ValueError) as exc:  # a password database that cannot be read
        return Lookup(Mailbox.UNDECIDED, f"user lookup failed: {exc}")
    if user.uid == 0:
        return Lookup(Mailbox.UNDECIDED, "mail for uid 0 is deferred by delivery")
    try:
        if not stat.S_ISDIR(os.stat(user.home).st_mode):
            return Lookup(Mailbox.UNDECIDED, f"home directory {user.home} is not a directory")
        found = dotqmail.has_mailbox(user.home, user.dash, user.ext)
    except (OSError, ValueError) as exc:  # the home itself: delivery defers, so accept
        return Lookup(Mailbox.UNDECIDED, f"home directory {user.home}: {exc}")
    except dotqmail.DotQmailError as exc:
        return Lookup(Mailbox.UNDECIDED, f"{user.home}: {exc.text}")
    return Lookup(Mailbox.EXISTS if found else Mailbox.UNKNOWN)
