"""Moving over from qmail, end to end: a qmail installation built by hand from the
documented layout (qmail-core §1.1: control files, users/assign, alias/.qmail-postmaster,
a queue with one S4 message in todo, one S5 message whose local file has a done ``D``
recipient and a pending ``T`` one, and a stale S2 mess) is imported with
``eqmailctl import-qmail``, eqmail is started, and the pending recipients are delivered
exactly once — the done one not again — and the queue ends empty.  Both queue layouts:
eQmail's big-todo and netqmail's flat todo/intd.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest
from harness import ME, Instance, QmailTree

pytestmark = pytest.mark.timeout(120)

SENDER = f"testuser@{ME}"
S4_MESSAGE = (b"Received: (qmail 4321 invoked by uid 0); 1 Jan 2024 00:00:00 -0000\n"
              b"From: someone\nSubject: queued in qmail (S4)\n\nfour\n")
S5_MESSAGE = b"Received: (qmail 99 invoked by uid 0); 1 Jan 2024 00:00:00 -0000\nSubject: preprocessed (S5)\n\nfive\n"


@pytest.fixture
def instance() -> Iterator[Instance]:
    inst = Instance.create()
    try:
        yield inst
    finally:
        inst.destroy()


def dotqmail(inst: Instance, name: str) -> None:
    path = inst.home / name
    path.write_text("./Maildir/\n")
    os.chmod(path, 0o644)
    os.chown(path, inst.uid, inst.gid)


def build_qmail(inst: Instance, big_todo: bool) -> tuple[QmailTree, dict[str, int]]:
    tree = QmailTree.create(big_todo=big_todo)
    tree.write("control/me", f"{ME}\n")
    tree.write("control/locals", f"{ME}\nlocalhost\n")
    tree.write("control/rcpthosts", f"{ME}\n")
    tree.write("control/smtpgreeting", "imported greeting\n")
    tree.write("control/concurrencylocal", "5\n")
    tree.write("control/qmail-legacy-knob", "1\n")
    tree.write("users/assign", (inst.root / "users" / "assign").read_text())  # same mailbox owner
    tree.write("alias/.qmail-postmaster", "./Maildir/\n")
    tree.write("rc", "#!/bin/sh\nexec env - PATH=\"/var/qmail/bin:$PATH\" \\\nqmail-start ./Maildir/ splogger qmail\n",
               0o755)
    now = time.time()
    ids = {"s4": tree.add_mess(S4_MESSAGE)}
    tree.add_todo(ids["s4"], SENDER, [f"testuser@{ME}", f"postmaster@{ME}"], uid=0, pid=4321)
    ids["s5"] = tree.add_mess(S5_MESSAGE)
    tree.add_info(ids["s5"], SENDER, now - 600)
    tree.add_channel(ids["s5"], "local", [(True, f"testuser+done@{ME}"), (False, f"testuser+pending@{ME}")],
                     now - 10)
    ids["s2"] = tree.add_mess(b"Subject: never finished\n\n")
    return tree, ids


def queue_files(inst: Instance) -> list[str]:
    q = inst.root / "queue"
    out = []
    for name in ("mess", "todo", "intd", "info", "local", "remote"):
        for i in range(23):
            out += [f"{name}/{i}/{f}" for f in os.listdir(q / name / str(i))]
    return out + [f"bounce/{f}" for f in os.listdir(q / "bounce")]


def wait_empty(inst: Instance, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while queue_files(inst):
        if time.monotonic() > deadline:
            raise AssertionError(f"queue not empty: {queue_files(inst)}\n--- log:\n{inst.log()}")
        time.sleep(0.1)


def delivered_to(inst: Instance, maildir: os.PathLike[str] | None = None) -> list[bytes]:
    out = []
    for f in inst.maildir_files(None if maildir is None else inst.root / maildir):
        m = re.search(rb"^Delivered-To: (.*)$", f.read_bytes(), re.M)
        assert m, f.read_bytes()
        out.append(m.group(1))
    return sorted(out)


@pytest.mark.parametrize("big_todo", [True, False], ids=["big-todo", "netqmail"])
def test_imported_queue_is_delivered_exactly_once(instance: Instance, big_todo: bool) -> None:
    dotqmail(instance, ".qmail-done")
    dotqmail(instance, ".qmail-pending")
    tree, ids = build_qmail(instance, big_todo)
    try:
        res = instance.ctl("import-qmail", str(tree.home), "--force")
    finally:
        tree.destroy()
    out = res.stdout
    assert "imported control/smtpgreeting" in out
    assert "imported control/defaultdelivery (from qmail-start's argument in rc)" in out
    assert "imported alias/.qmail-postmaster" in out
    assert "not carried over: control/qmail-legacy-knob" in out
    assert re.search(rf"imported queue msg {ids['s4']} as msg \d+ \(not yet preprocessed, "
                     rf"{'big-todo' if big_todo else 'plain'} todo\)", out), out
    assert f"imported queue msg {ids['s5']} as msg" in out
    assert "local 1 to do / 1 done" in out
    assert f"not carried over: queue msg {ids['s2']} (S2, mess only" in out
    new_s5 = int(re.search(rf"queue msg {ids['s5']} as msg (\d+)", out).group(1))  # type: ignore[union-attr]

    instance.start()
    instance.wait_for_mail(2)
    instance.wait_for_mail(1, instance.alias_maildir)
    wait_empty(instance)
    time.sleep(0.5)  # anything delivered twice would show up by now
    assert delivered_to(instance) == [f"testuser+pending@{ME}".encode(), f"testuser@{ME}".encode()]
    assert delivered_to(instance, "alias/Maildir") == [f"postmaster@{ME}".encode()]
    for f in instance.maildir_files():
        data = f.read_bytes()
        # the queued bytes as qmail wrote them: no second qmail-queue Received line
        assert data.count(b"Received: (qmail") == 1, data
        assert data.endswith(b"\n\nfour\n") or data.endswith(b"\n\nfive\n")
    log = instance.log()
    assert "starting delivery" in log and f"msg {new_s5} to local testuser+pending@{ME}" in log
    assert "testuser+done" not in log

    # the instance now runs: a second import must refuse and change nothing
    again = instance.ctl("import-qmail", "/nonexistent-qmail", check=False)
    assert again.returncode == 1 and "not a qmail installation" in again.stderr
    tree2, _ = build_qmail(instance, big_todo)
    try:
        again = instance.ctl("import-qmail", str(tree2.home), "--force", check=False)
    finally:
        tree2.destroy()
    assert again.returncode == 1
    assert "eqmail is running" in again.stderr
    assert queue_files(instance) == []


# What eQmail 1.09's installer (config-bfrmt) writes into control/beforemote, mode 644.
EQMAIL_STOCK_BEFOREMOTE = ('#!/bin/sh\n# config file for qmail-bfrmt\n#\n\n# Enter commands here, like\n\n'
                           'export DKREMOTE="$BINDIR/qmail-remote"\n'
                           'np="$BINDIR/qmail-remote" ; exec $np "$@"\n')


def test_eqmail_stock_beforemote_is_dropped_and_remote_mail_flows(instance: Instance) -> None:
    """An eQmail 1.09 installation as its installer leaves it (stock control/beforemote)
    with a queued remote message: the import drops the fragment and says so, `check`
    is quiet about it, and the message goes out instead of deferring forever."""
    from smtpsink import SmtpSink

    sink = SmtpSink()
    port = sink.listen("127.0.0.1")
    tree = QmailTree.create(big_todo=True)
    try:
        tree.write("control/me", f"{ME}\n")
        tree.write("control/locals", f"{ME}\n")
        tree.write("control/rcpthosts", f"{ME}\n")
        tree.write("control/smtproutes", f"remote.example:[127.0.0.1]:{port}\n")
        tree.write("control/beforemote", EQMAIL_STOCK_BEFOREMOTE, 0o644)
        tree.write("users/assign", (instance.root / "users" / "assign").read_text())
        msg = tree.add_mess(b"Received: (qmail 1 invoked by uid 0); 1 Jan 2024 00:00:00 -0000\n"
                            b"Subject: to the world\n\nout\n")
        tree.add_todo(msg, SENDER, ["friend@remote.example"], uid=0, pid=1)
        res = instance.ctl("import-qmail", str(tree.home), "--force")
    finally:
        tree.destroy()
    assert ("not carried over: control/beforemote is eQmail's stock qmail-bfrmt fragment "
            "(it only runs qmail-remote): not carried over, eqmail sends directly") in res.stdout, res.stdout
    assert not (instance.root / "control" / "beforemote").exists()
    assert "beforemote" not in instance.ctl("check").stdout
    instance.start()
    try:
        deadline = time.monotonic() + 30
        while not sink.transactions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [t.rcpts for t in sink.transactions] == [["friend@remote.example"]], instance.log()
        assert sink.transactions[0].data.endswith(b"\r\nout\r\n")
        wait_empty(instance)
    finally:
        sink.stop()


def test_check_flags_a_beforemote_line_that_is_not_a_command(instance: Instance) -> None:
    instance.write_control("beforemote", 'export DKREMOTE="$BINDIR/qmail-remote"\ncat\n/nonexistent/signer -k x\n')
    out = instance.ctl("check").stdout
    assert ("warning: control/beforemote: 'export DKREMOTE=\"$BINDIR/qmail-remote\"' runs qmail-remote "
            "itself (an eQmail qmail-bfrmt fragment)") in out, out
    assert "warning: control/beforemote: '/nonexistent/signer -k x' /nonexistent/signer is not an executable file" in out
    assert "'cat'" not in out
