"""eqmail.migrate without a running daemon: the cdb reader, rc parsing, and
``import_qmail`` from a qmail installation built by hand (tests/harness.QmailTree) into
a fresh or an existing instance — what lands where, with which bytes, owners, modes and
mtimes, what is listed as not carried over, and when the import refuses to run.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import IS_ROOT, QmailTree, cdb_make
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.cdb import CdbError
from eqmail.migrate import (
    ImportRefused,
    assign_from_users_cdb,
    cdb_get,
    cdb_records,
    import_qmail,
    parse_rc_defaultdelivery,
)
from eqmail.queue.envelope import parse_records
from eqmail.queue.layout import QueuePaths
from eqmail.setup import setup_instance

ME = "mx.test.example"
MESSAGE = b"Received: (qmail 4321 invoked by uid 0); 1 Jan 2024 00:00:00 -0000\nSubject: s4\n\nbody\n"


# ---------------------------------------------------------------- cdb


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=40))
def test_cdb_reader_reads_what_cdbmake_wrote(records: list[tuple[bytes, bytes]]) -> None:
    data = cdb_make(records)
    assert list(cdb_records(data)) == records
    for key, _ in records:  # cdb_find returns the first record under a key
        assert cdb_get(data, key) == next(v for k, v in records if k == key)
    assert cdb_get(data, b"\xffnot-a-key\xff") is None or any(k == b"\xffnot-a-key\xff" for k, _ in records)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=20),
       st.data())
def test_truncated_cdb_is_an_error_never_a_short_value(records: list[tuple[bytes, bytes]],
                                                       draw: st.DataObject) -> None:
    data = cdb_make(records)
    cut = draw.draw(st.integers(0, len(data) - 1))
    with pytest.raises(CdbError):
        list(cdb_records(data[:cut]))
    for key, _ in records[:3]:
        with pytest.raises(CdbError):
            cdb_get(data[:cut], key)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), min_size=1, max_size=20),
       st.data())
def test_damaged_cdb_gives_values_or_cdberror(records: list[tuple[bytes, bytes]],
                                              draw: st.DataObject) -> None:
    data = bytearray(cdb_make(records))
    for _ in range(draw.draw(st.integers(1, 8))):
        data[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    try:
        list(cdb_records(bytes(data)))
        for key, _ in records:
            cdb_get(bytes(data), key)
    except CdbError:
        pass  # anything else (struct.error, IndexError) fails the test


def newu(lines: list[str]) -> bytes:
    """qmail-newu, as in qmail-newu.c: ``=`` keys end in NUL, ``+`` keys do not, both
    lowercased; the value is the six fields with their colons turned into NULs; the empty
    key holds the wildcard characters."""
    recs, wild = [], b""
    for ln in lines:
        i = ln.index(":")
        fields = ln[i + 1:].split(":")[:6]
        key = b"!" + ln[1:i].lower().encode() + (b"\0" if ln[0] == "=" else b"")
        if ln[0] == "+" and i >= 2 and ln[i - 1].encode() not in wild:
            wild += ln[i - 1].encode()
        recs.append((key, "\0".join(fields).encode()))
    return cdb_make([*recs, (b"", wild)])


def test_assign_regenerated_from_users_cdb() -> None:
    lines = ["=Joe:joe:1001:100:/home/joe:::", "+joe-:joe:1001:100:/home/joe:-::",
             "+:alias:7790:2108:/var/qmail/alias:-::", "=joe:second:1:1:/x:::"]
    out = assign_from_users_cdb(newu(lines))
    assert out == ["=joe:joe:1001:100:/home/joe:::", "+joe-:joe:1001:100:/home/joe:-::",
                   "+:alias:7790:2108:/var/qmail/alias:-::", "=joe:second:1:1:/x:::"]


@pytest.mark.parametrize(("rc", "expected"), [
    ("#!/bin/sh\nexec env - PATH=\"/var/qmail/bin:$PATH\" \\\nqmail-start ./Maildir/ splogger qmail\n",
     "./Maildir/"),
    ("#!/bin/sh\nexec env - PATH=\"/var/qmail/bin:$PATH\" qmail-start '|preline procmail' splogger qmail\n",
     "|preline procmail"),
    ("#!/bin/sh\nexec env - PATH=\"/var/qmail/bin:$PATH\" \\\n"
     "qmail-start \"`cat /var/qmail/control/defaultdelivery`\"\n", None),
    ("#!/bin/sh\nexec /var/qmail/bin/qmail-start\n", "./Mailbox"),
    ("#!/bin/sh\necho nothing here\n", None),
])
def test_rc_default_delivery(rc: str, expected: str | None) -> None:
    assert parse_rc_defaultdelivery(rc) == expected


# ---------------------------------------------------------------- import


@pytest.fixture
def qmail() -> Iterator[QmailTree]:
    tree = QmailTree.create(big_todo=True)
    try:
        yield tree
    finally:
        tree.destroy()


@pytest.fixture
def root() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="eqm-import-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base / "eqmail"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def populate(tree: QmailTree) -> dict[str, int]:
    """The installation every import test starts from; returns the qmail message ids."""
    tree.write("control/me", f"{ME}\n")
    tree.write("control/locals", f"{ME}\nlocalhost\n")
    tree.write("control/rcpthosts", f"{ME}\n")
    tree.write("control/concurrencylocal", "7\n")
    tree.write("control/smtpgreeting", "qmail greeting\n")
    tree.write("control/frobnicate", "who knows\n")
    tree.write("control/morercpthosts", "stale.example\n")
    tree.write("control/morercpthosts.cdb", cdb_make([(b"more.example", b""), (b"other.example", b"")]))
    tree.write("control/tlshosts/relay.example.pem", "-----BEGIN CERTIFICATE-----\n")
    tree.write("users/cdb", newu(["=testuser:nobody:65534:65534:/nonexistent:::"]))
    tree.write("alias/.qmail-postmaster", "./Maildir/\n")
    tree.write("alias/.qmail-root", "&postmaster\n")
    tree.write("rc", "#!/bin/sh\nexec env - PATH=\"/var/qmail/bin:$PATH\" qmail-start ./Maildir/ splogger qmail\n",
               0o755)
    tree.write("supervise/qmail-smtpd/run", "#!/bin/sh\nexec tcpserver -x /etc/tcp.smtp.cdb 0 smtp qmail-smtpd\n",
               0o755)
    now = time.time()
    ids = {"s4": tree.add_mess(MESSAGE)}
    tree.add_todo(ids["s4"], "sender@remote.example", [f"a@{ME}", "b@remote.example"], uid=0, pid=4321)
    ids["s5"] = tree.add_mess(b"Subject: s5\n\nbody five\n")
    tree.add_info(ids["s5"], "s5@remote.example", now - 5000)
    tree.add_channel(ids["s5"], "local", [(True, f"done@{ME}"), (False, f"todo@{ME}")], now - 100)
    tree.add_channel(ids["s5"], "remote", [(False, "far@remote.example")], now + 3000)
    tree.add_bounce(ids["s5"], "<gone@remote.example>:\nSorry.\n\n")
    ids["s2"] = tree.add_mess(b"Subject: half\n\n")
    ids["s3"] = tree.add_mess(b"Subject: three\n\n")
    tree.add_intd(ids["s3"], "x@y", ["z@w"])
    return ids


def queue_ids(root: Path, name: str) -> list[int]:
    return sorted(QueuePaths(root / "queue").ids_in(name))


def owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


@pytest.mark.parametrize("big_todo", [True, False], ids=["big-todo", "netqmail"])
def test_import_into_fresh_instance(root: Path, big_todo: bool) -> None:
    tree = QmailTree.create(big_todo=big_todo)
    try:
        ids = populate(tree)
        report = import_qmail(tree.home, root)
    finally:
        tree.destroy()
    text = "\n".join(report.lines())
    c = root / "control"
    # control files: carried, regenerated, or listed
    assert (c / "me").read_text() == f"{ME}\n"
    assert (c / "concurrencylocal").read_text() == "7\n"
    assert (c / "smtpgreeting").read_text() == "qmail greeting\n"
    assert (c / "tlshosts" / "relay.example.pem").exists()
    assert (c / "morercpthosts").read_text() == "more.example\nother.example\n"
    assert "differs from morercpthosts.cdb" in text
    assert not (c / "frobnicate").exists()
    assert "not carried over: control/frobnicate" in text
    assert (c / "defaultdelivery").read_text() == "./Maildir/\n"
    assert "not carried over: supervise/qmail-smtpd/run" in text
    assert "control/tcp.smtp" in text and "control/listen" in text
    assert (root / "users" / "assign").read_text() == "=testuser:nobody:65534:65534:/nonexistent:::\n.\n"
    assert (root / "alias" / ".qmail-root").read_text() == "&postmaster\n"
    # set-up filled in what qmail did not have, without touching what was imported
    assert (c / "databytes").exists()
    # the queue: S4 and S5 carried under new ids, S2 and S3 listed
    assert f"not carried over: queue msg {ids['s2']} (S2" in text
    assert f"not carried over: queue msg {ids['s3']} (S3" in text
    q = QueuePaths(root / "queue")
    (todo_id,) = queue_ids(root, "todo")
    assert q.mess(todo_id).read_bytes() == MESSAGE  # the original bytes, no Received line added
    recs = [(r.kind, r.value) for r in parse_records(q.todo(todo_id).read_bytes())]
    assert recs == [("u", "0"), ("p", "4321"), ("F", "sender@remote.example"),
                    ("T", f"a@{ME}"), ("T", "b@remote.example")]
    assert q.intd(todo_id).stat().st_ino == q.todo(todo_id).stat().st_ino
    (info_id,) = queue_ids(root, "info")
    assert sorted(queue_ids(root, "mess")) == sorted([todo_id, info_id])
    assert q.mess(info_id).read_bytes() == b"Subject: s5\n\nbody five\n"
    assert q.info(info_id).read_bytes() == b"Fs5@remote.example\0"
    assert q.local(info_id).read_bytes() == f"Ddone@{ME}\0Ttodo@{ME}\0".encode()
    assert q.remote(info_id).read_bytes() == b"Tfar@remote.example\0"
    assert q.bounce(info_id).read_text() == "<gone@remote.example>:\nSorry.\n\n"
    now = time.time()
    assert abs(q.info(info_id).stat().st_mtime - (now - 5000)) < 60  # birth kept
    assert abs(q.local(info_id).stat().st_mtime - (now - 100)) < 60  # next retry kept
    assert abs(q.remote(info_id).stat().st_mtime - (now + 3000)) < 60
    assert f"imported queue msg {ids['s5']} as msg {info_id} (preprocessed: local 1 to do / 1 done" in text
    if IS_ROOT:
        for p in (q.mess(todo_id), q.todo(todo_id), q.mess(info_id)):
            assert owner(p) == "eqmailq"
        for p in (q.info(info_id), q.local(info_id), q.remote(info_id), q.bounce(info_id)):
            assert owner(p) == "eqmails" and p.stat().st_mode & 0o777 == 0o600
        assert owner(root / "alias" / ".qmail-root") == "alias"


def test_second_import_queues_nothing_twice(qmail: QmailTree, root: Path) -> None:
    ids = populate(qmail)
    import_qmail(qmail.home, root)
    before = queue_ids(root, "mess")
    report = import_qmail(qmail.home, root)
    assert queue_ids(root, "mess") == before
    assert any(f"queue msg {ids['s4']} was imported earlier" in x for x in report.notes)


def test_existing_control_files_replaced_only_with_force(qmail: QmailTree, root: Path) -> None:
    populate(qmail)
    for name in ("mess", "todo", "info", "intd", "local", "remote", "bounce"):
        shutil.rmtree(qmail.home / "queue" / name)
    setup_instance(root, me="old.example")
    report = import_qmail(qmail.home, root)
    assert (root / "control" / "me").read_text() == "old.example\n"
    assert "not carried over: control/me (eqmail already has one; --force replaces it)" in report.lines()
    assert (root / "control" / "smtpgreeting").read_text() == "qmail greeting\n"  # new files are fine
    report = import_qmail(qmail.home, root, force=True)
    assert (root / "control" / "me").read_text() == f"{ME}\n"
    assert "imported control/me (replaced eqmail's)" in report.lines()


def test_refused_while_qmail_send_holds_its_lock(qmail: QmailTree, root: Path) -> None:
    populate(qmail)
    fd = os.open(qmail.home / "queue" / "lock" / "sendmutex", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what qmail-send does at start
        with pytest.raises(ImportRefused, match="qmail-send is running"):
            import_qmail(qmail.home, root)
    finally:
        os.close(fd)
    assert not (root / "control").exists()


def test_refused_while_eqmail_runs(qmail: QmailTree, root: Path) -> None:
    populate(qmail)
    setup_instance(root, me=ME)
    (root / "run").mkdir(exist_ok=True)
    fd = os.open(root / "run" / "eqmail.pid", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the supervisor holds
        os.write(fd, b"4242\n")
        with pytest.raises(ImportRefused, match=r"eqmail is running \(pid 4242\)"):
            import_qmail(qmail.home, root, force=True)
    finally:
        os.close(fd)
    assert (root / "control" / "me").read_text() == f"{ME}\n"
    assert queue_ids(root, "mess") == []


def test_truncated_users_cdb_refuses_the_import_naming_it(qmail: QmailTree, root: Path) -> None:
    populate(qmail)
    whole = (qmail.home / "users" / "cdb").read_bytes()
    qmail.write("users/cdb", whole[:-5])
    with pytest.raises(ImportRefused, match=r"users/cdb: truncated cdb: hash table"):
        import_qmail(qmail.home, root)
    assert not (root / "control" / "me").exists()
    qmail.write("users/cdb", whole)
    qmail.write("control/morercpthosts.cdb", cdb_make([(b"more.example", b"")])[:-3])
    with pytest.raises(ImportRefused, match=r"control/morercpthosts.cdb: truncated cdb"):
        import_qmail(qmail.home, root)


def test_refused_when_eqmail_would_not_load_it(qmail: QmailTree, root: Path) -> None:
    populate(qmail)
    qmail.write("control/databytes", "lots\n")  # qmail silently kept its default
    with pytest.raises(ImportRefused, match=r"control/databytes:1: not a number"):
        import_qmail(qmail.home, root)
    assert not (root / "control" / "me").exists()
