"""The users and groups of the privilege model (qmail-core §7, DESIGN §1).

| role    | user     | primary group | qmail counterpart       |
|---------|----------|---------------|-------------------------|
| daemon  | eqmaild  | nofiles       | qmaild (qmail-smtpd)    |
| queue   | eqmailq  | eqmail        | qmailq (qmail-queue)    |
| send    | eqmails  | eqmail        | qmails (qmail-send)     |
| remote  | eqmailr  | eqmail        | qmailr (qmail-remote)   |
| plugin  | eqmailp  | nofiles       | qmailp (sandbox)        |
| log     | eqmaill  | nofiles       | qmaill (logger)         |
| alias   | alias    | nofiles       | alias (catch-all user)  |
| policy  | eqmailt  | nofiles       | (none: MTA-STS fetches) |

When eqmail does not run as root every role is the invoking user: there is no
privilege change and nothing else differs.  ``create_system_users`` (root, at set-up)
runs groupadd/useradd with fixed argument vectors — no shell.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
import subprocess
from dataclasses import dataclass


class Role(enum.StrEnum):
    """A role of the privilege model; equal to its name, so ``ids["daemon"]`` works too."""

    DAEMON = "daemon"
    QUEUE = "queue"
    SEND = "send"
    REMOTE = "remote"
    PLUGIN = "plugin"
    LOG = "log"
    ALIAS = "alias"
    POLICY = "policy"  # the MTA-STS policy worker: network only, owns <root>/sts/


ROLE_USERS: dict[Role, tuple[str, str]] = {
    Role.DAEMON: ("eqmaild", "nofiles"),
    Role.QUEUE: ("eqmailq", "eqmail"),
    Role.SEND: ("eqmails", "eqmail"),
    Role.REMOTE: ("eqmailr", "eqmail"),
    Role.PLUGIN: ("eqmailp", "nofiles"),
    Role.LOG: ("eqmaill", "nofiles"),
    Role.ALIAS: ("alias", "nofiles"),
    Role.POLICY: ("eqmailt", "nofiles"),
}
GROUPS = ("eqmail", "nofiles")


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int
    name: str


@dataclass(frozen=True)
class SystemIds:
    privileged: bool  # True when started as root and roles map to distinct users
    roles: dict[str, Ids]

    def __getitem__(self, role: str) -> Ids:
        return self.roles[role]

    def who_for_uid(self, uid: int) -> str:
        """qmail-queue's ``invoked <who>`` for a peer uid."""
        if self.privileged:
            if uid == self.roles["alias"].uid:
                return "by alias"
            if uid == self.roles["daemon"].uid:
                return "from network"
            if uid == self.roles["send"].uid:
                return "for bounce"
        return f"by uid {uid}"

    @classmethod
    def current_user(cls) -> SystemIds:
        uid, gid = os.getuid(), os.getgid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        ids = Ids(uid, gid, name)
        return cls(False, {role: ids for role in ROLE_USERS})

    @classmethod
    def lookup(cls) -> SystemIds:
        """Root: the system users (KeyError naming the missing one if absent)."""
        if os.geteuid() != 0:
            return cls.current_user()
        roles: dict[str, Ids] = {}
        for role, (user, group) in ROLE_USERS.items():
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise KeyError(f"system user {user!r} missing: run 'eqmailctl setup' as root") from None
            gid = grp.getgrnam(group).gr_gid
            roles[role] = Ids(pw.pw_uid, gid, user)
        return cls(True, roles)


def create_system_users(alias_home: str) -> list[str]:
    """Create the groups and users that are missing.  Returns what was created."""
    created: list[str] = []
    for group in GROUPS:
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", "--system", group], check=True)
            created.append(f"group {group}")
    for role, (user, group) in ROLE_USERS.items():
        try:
            pwd.getpwnam(user)
            continue
        except KeyError:
            pass
        home = alias_home if role == "alias" else "/nonexistent"
        subprocess.run(
            ["useradd", "--system", "--gid", group, "--home-dir", home, "--no-create-home",
             "--shell", "/usr/sbin/nologin", user],
            check=True,
        )
        created.append(f"user {user}")
    return created
