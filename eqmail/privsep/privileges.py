"""Dropping privileges completely, and checking that the drop held.

qmail-start checks every set*id call; eqmail does the same and then verifies by reading
the ids back and trying to regain root.  Any doubt is a temporary failure: the process
exits 111 rather than run with more privilege than intended.
"""

from __future__ import annotations

import os


class PrivilegeError(Exception):
    pass


def drop_to(uid: int, gid: int, groups: list[int] | None = None) -> None:
    """Become uid/gid with exactly ``groups`` (default: just gid) as supplementary groups.
    A no-op when not root and already that user."""
    if os.geteuid() != 0:
        if os.getuid() == uid and os.geteuid() == uid:
            return
        raise PrivilegeError(f"not root: cannot switch to uid {uid}")
    if uid == 0:
        raise PrivilegeError("refusing to run a worker as root")
    try:
        os.setgroups(groups if groups is not None else [gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise PrivilegeError(f"cannot switch to uid {uid} gid {gid}: {e}") from e
    verify_dropped(uid, gid)


def verify_dropped(uid: int, gid: int) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError("uid/gid did not change as asked")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("setuid(0) succeeded after dropping privileges")
