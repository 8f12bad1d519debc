"""The RCPT check's one lookup (eqmail.delivery.mailbox.lookup) against real directories.

Every case is also delivered with qmail-local (eqmail.delivery.local.deliver) to show
that the check refuses exactly the addresses delivery would bounce with "Sorry, no
mailbox here by that name" -- the two share their rules, not copies of them.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from eqmail.control.assign import Assign
from eqmail.delivery.local import LocalJob, deliver
from eqmail.delivery.mailbox import LocalUsers, Mailbox, lookup
from eqmail.ipc.delivery import Verdict
from eqmail.queue.rewrite import RewriteRules

ME = "mx.example.org"
IS_ROOT = os.geteuid() == 0
# getpw refuses uid 0, so as root the fake users get another uid (and own their homes)
UID = 4242 if IS_ROOT else os.getuid()
GID = 4242 if IS_ROOT else os.getgid()


class World:
    """An instance's alias directory, two passwd users, users/assign and the rules."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.alias = self.home("alias")
        self.dot(self.alias, ".qmail-postmaster")
        self.joe = self.home("joe")
        self.lists = self.home("lists")
        self.vd = self.home("vd")
        self.passwd = {"joe": self.joe}
        assign = "\n".join([
            f"=bob:bob:{UID}:{GID}:{self.joe}:::",             # exact, own address
            f"=sales:bob:{UID}:{GID}:{self.lists}:-:sales:",    # exact, with an ext
            f"+list-:lists:{UID}:{GID}:{self.lists}:-:l-:",     # wildcard
            f"+vd-:vd:{UID}:{GID}:{self.vd}:-::",               # a virtual domain's user
            f"=rooty:root:0:0:{self.joe}:::",                   # uid 0: delivery defers
            ".", ""])
        self.users = LocalUsers.build(Assign.parse(assign), UID, GID, str(self.alias))
        self.rules = RewriteRules(ME, frozenset({ME, "localhost"}),
                                  (("virt.example", "vd"), ("remote.example", "")))

    def home(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o755)
        os.chown(path, UID, GID)
        return path

    def dot(self, home: Path, name: str, text: str = "./Maildir/\n") -> None:
        (home / name).write_text(text)
        os.chmod(home / name, 0o644)

    def getpwnam(self, name: str) -> SimpleNamespace:
        if name not in self.passwd:
            raise KeyError(name)
        return SimpleNamespace(pw_name=name, pw_uid=UID, pw_gid=GID, pw_dir=str(self.passwd[name]))

    def check(self, address: str) -> Mailbox:
        return lookup(address, self.rules, self.users, getpwnam=self.getpwnam).verdict

    def delivery(self, address: str) -> Verdict:
        """What qmail-local says for the same address (the scanner's rewrite, the
        spawner's resolve, then deliver); every .qmail here says ./Maildir/."""
        from eqmail.queue.rewrite import rewrite

        _channel, rewritten = rewrite(address, self.rules)
        local, _, domain = rewritten.rpartition("@")
        user = self.users.resolve(local, getpwnam=self.getpwnam)
        for sub in ("tmp", "new", "cur"):
            (Path(user.home) / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        job = LocalJob(user.user, user.home, local, user.dash, user.ext, domain, "s@x.example",
                       "./Maildir/")
        report = deliver(job, io.BytesIO(b"Subject: t\n\nx\n"), _no_forwards)
        if report.kind is Verdict.FAILURE:
            assert report.text == "Sorry, no mailbox here by that name. (#5.1.1)\n"
        return report.kind


def _no_forwards(*_args: object) -> tuple[Verdict, str, int | None]:
    raise AssertionError("no forwards here")


@pytest.fixture()
def world() -> Iterator[World]:
    # under /var/tmp, traversable by everyone: pytest's tmp_path is 0700 and the
    # "listener without privileges" cases run as nobody
    root = Path(tempfile.mkdtemp(prefix="eqm-mailbox-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    try:
        yield World(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def agree(world: World, address: str, expected: Mailbox) -> None:
    assert world.check(address) is expected, address
    want = Verdict.FAILURE if expected is Mailbox.UNKNOWN else Verdict.SUCCESS
    assert world.delivery(address) is want, address


def test_passwd_user_and_extensions(world: World) -> None:
    agree(world, f"joe@{ME}", Mailbox.EXISTS)           # the default delivery
    agree(world, f"JOE@{ME.upper()}", Mailbox.EXISTS)
    agree(world, f"joe+ext@{ME}", Mailbox.UNKNOWN)      # no .qmail-ext
    world.dot(world.joe, ".qmail-ext")
    agree(world, f"joe+ext@{ME}", Mailbox.EXISTS)
    agree(world, f"joe+Ext@{ME}", Mailbox.EXISTS)       # safeext is lowercased
    agree(world, f"joe+foo-bar@{ME}", Mailbox.UNKNOWN)
    world.dot(world.joe, ".qmail-foo-default")
    agree(world, f"joe+foo-bar@{ME}", Mailbox.EXISTS)   # parent -default
    agree(world, f"joe+other@{ME}", Mailbox.UNKNOWN)
    world.dot(world.joe, ".qmail-default")
    agree(world, f"joe+anything-at-all@{ME}", Mailbox.EXISTS)
    agree(world, "joe+x@localhost", Mailbox.EXISTS)     # any name in locals
    agree(world, "joe", Mailbox.EXISTS)                  # no @: envnoathost


def test_users_assign_exact_and_wildcard(world: World) -> None:
    agree(world, f"bob@{ME}", Mailbox.EXISTS)        # exact, empty dash: default delivery
    agree(world, f"sales@{ME}", Mailbox.UNKNOWN)     # exact with ext "sales": no .qmail-sales
    world.dot(world.lists, ".qmail-sales")
    agree(world, f"SALES@{ME}", Mailbox.EXISTS)
    agree(world, f"list-x@{ME}", Mailbox.UNKNOWN)    # ext "l-x"
    world.dot(world.lists, ".qmail-l-default")
    agree(world, f"list-x@{ME}", Mailbox.EXISTS)


def test_virtual_domain_users(world: World) -> None:
    # virt.example:vd makes alice@virt.example the local part vd-alice (+vd- in assign)
    agree(world, "alice@virt.example", Mailbox.UNKNOWN)
    world.dot(world.vd, ".qmail-alice")
    agree(world, "alice@virt.example", Mailbox.EXISTS)
    agree(world, "Alice@Virt.Example", Mailbox.EXISTS)
    agree(world, "bob@virt.example", Mailbox.UNKNOWN)
    world.dot(world.vd, ".qmail-default")
    agree(world, "bob@virt.example", Mailbox.EXISTS)


def test_alias_user_is_the_fallback(world: World) -> None:
    agree(world, f"postmaster@{ME}", Mailbox.EXISTS)
    agree(world, "postmaster", Mailbox.EXISTS)
    agree(world, f"nobody@{ME}", Mailbox.UNKNOWN)
    agree(world, f"joe-ext@{ME}", Mailbox.UNKNOWN)   # '-' is not conf-break: alias ext
    world.dot(world.alias, ".qmail-default")
    agree(world, f"nobody@{ME}", Mailbox.EXISTS)


def test_not_local_is_not_checked(world: World) -> None:
    for address in ("nobody@remote.example", "x@elsewhere.example", "joe@mx.example.org.evil"):
        assert world.check(address) is Mailbox.NOT_LOCAL


def test_empty_local_part_is_qmail_lspawns_trash_delivery(world: World) -> None:
    assert world.check(f"@{ME}") is Mailbox.EXISTS


def test_uid_zero_is_undecided_not_refused(world: World) -> None:
    assert world.check(f"rooty@{ME}") is Mailbox.UNDECIDED


def test_a_missing_home_directory_is_undecided(world: World) -> None:
    world.passwd["ghost"] = world.root / "ghost"  # getpw skips it: alias ext "ghost"
    users = LocalUsers.build(Assign.parse(f"=gone:g:{UID}:{GID}:{world.root / 'nothere'}:-:x:\n.\n"),
                             UID, GID, str(world.alias))
    result = lookup(f"gone@{ME}", world.rules, users, getpwnam=world.getpwnam)
    assert result.verdict is Mailbox.UNDECIDED and "nothere" in result.reason


def _as_nobody(fn):  # noqa: ANN001, ANN202 - a tiny fork helper
    """Run fn() in a child as uid nobody (root can search any directory) and return its
    result's value; without root, run it here."""
    if not IS_ROOT:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            os.write(w, fn().encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return data


def test_a_home_it_cannot_search_is_undecided_never_refused(world: World) -> None:
    # the listener runs as eqmaild: joe's home is 0700, so joe+ext cannot be looked up
    os.chmod(world.joe, 0o700 if IS_ROOT else 0o600)
    try:
        got = _as_nobody(lambda: world.check(f"joe+ext@{ME}").value)
        own = _as_nobody(lambda: world.check(f"joe@{ME}").value)
    finally:
        os.chmod(world.joe, 0o755)
    assert got == Mailbox.UNDECIDED.value
    assert own in (Mailbox.EXISTS.value, Mailbox.UNDECIDED.value)  # never UNKNOWN


def test_a_passwd_home_it_cannot_stat_is_undecided_not_the_alias_user(world: World) -> None:
    # qmail-getpw (as root) would find joe; a listener that cannot even stat joe's home
    # must not conclude "no such user" and refuse the address at the alias user
    os.chmod(world.root, 0o700 if IS_ROOT else 0o600)
    try:
        got = _as_nobody(lambda: world.check(f"joe@{ME}").value)
    finally:
        os.chmod(world.root, 0o755)
    assert got == Mailbox.UNDECIDED.value
